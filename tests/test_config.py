"""The config schema: every mistake a user can make is one line naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from asyncps.config import Config, apply_override, from_dict, load_config
from asyncps.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_round_trip_through_dict():
    cfg = from_dict({"optimizer": {"name": "adam"}, "train": {"frozen": ["*.bias"]}})
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("raw, message", [
    ({"optimizer": {"lr": 0.1}}, "unknown key optimizer.lr"),
    ({"train": {"batch_size": "big"}}, "train.batch_size must be an integer"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be at least 1"),
    ({"model": {"name": "rnn"}}, "model.name must be one of"),
    ({"optimizer": {"learning_rate": -1}}, "optimizer.learning_rate must be positive"),
    ({"train": {"frozen": "*.bias"}}, "train.frozen must be a list"),
    ({"cluster": {"workers": 2, "backup_workers": 2}}, "cluster.backup_workers must be less than workers"),
    ({"optimizer": {"schedule": {"name": "piecewise", "boundaries": [10], "values": [1.0]}}},
     "optimizer.schedule.values must have"),
    ({"train": {"graph_mode": "yes"}}, "train.graph_mode must be true or false"),
    ({"model": 3}, "model must be a mapping"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(raw)


def test_overrides_are_typed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {name: sgd}\n")
    cfg = load_config(path, ["optimizer.learning_rate=0.05", "train.frozen=['*.bias']", "cluster.mode=ssp"])
    assert cfg.optimizer.learning_rate == 0.05 and cfg.train.frozen == ["*.bias"] and cfg.cluster.mode == "ssp"


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: [mlp\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ is not valid YAML"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override({}, "optimizer.learning_rate")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {batch_sise: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "unknown key train.batch_sise" in proc.stderr


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["model", "data", "optimizer", "train", "cluster", "optimizer.schedule"]),
       key=st.sampled_from(["name", "batch_size", "hidden", "learning_rate", "frozen", "mode", "ps", "x"]),
       value=_yaml_values)
def test_random_mutations_give_a_config_or_a_config_error(section, key, value):
    raw = {}
    apply_override(raw, f"{section}.{key}=0")
    node = raw
    for part in section.split("."):
        node = node[part]
    node[key] = value
    try:
        from_dict(raw)
    except ConfigError as exc:
        assert "\n" not in str(exc)
