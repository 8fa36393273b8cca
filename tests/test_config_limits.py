"""Hostile configs (issue 12, items 8 and 9): every one is refused in one line, exit 2, quickly.

Item 8 is about the YAML itself: deep nesting, alias bombs, huge or endless files, bytes that are
not text. Item 9 is about numbers the schema accepted although no run can use them: every
numeric field is range-checked, and the message names the key, the value and the allowed range.

The subprocess timeout is a correctness guard (the bad cases used to run for minutes or hang);
no test asserts a tight timing.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest

from asyncps.config import Config, apply_override, from_dict, load_config
from asyncps.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
GUARD_S = 20  # a child that has not answered by then is a hang, not a slow machine


def cli_train(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=GUARD_S, cwd=REPO)
    return proc, time.monotonic() - start


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr tail: {err[-2000:]}"
    assert err.count("\n") == 0, f"{err.count(chr(10)) + 1} lines on stderr: {err[:2000]}"
    assert err.startswith("asyncps train: error: "), err[:2000]
    assert len(err) < 600, f"{len(err)} characters: {err[:2000]}"
    for fragment in fragments:
        assert fragment in err, err
    return err


def config_error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message[:2000]
    return message


def billion_laughs(depth: int = 9, width: int = 10, indent: str = "    ") -> str:
    """Anchors `depth` deep, each a list of `width` aliases of the previous: width**depth leaves."""
    lines = [f"{indent}- &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"{indent}- &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Item 8: the YAML itself


@pytest.mark.parametrize("name, text", [
    ("lists", "[" * 200_000 + "]" * 200_000 + "\n"),
    ("maps", "{a: " * 100_000 + "1" + "}" * 100_000 + "\n"),
    ("as_a_value", "model:\n  hidden: " + "[" * 200_000 + "]" * 200_000 + "\n"),
])
def test_deep_nesting_is_one_line(tmp_path, name, text):
    path = tmp_path / f"deep-{name}.yaml"
    path.write_text(text)
    proc, _ = cli_train(path)
    assert_one_line_exit_2(proc, "nest")


def test_billion_laughs_as_a_value_is_one_line(tmp_path):
    path = tmp_path / "lol.yaml"
    path.write_text("train:\n  batch_size:\n" + billion_laughs())
    proc, _ = cli_train(path)
    assert_one_line_exit_2(proc, "alias")


def test_billion_laughs_in_an_override_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_steps: 10}\n")
    value = "[" + ", ".join([f"&a0 [{', '.join(['1'] * 10)}]"]
                            + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]) + "]"
    proc, _ = cli_train(path, f"model.hidden={value}")
    assert_one_line_exit_2(proc, "alias")


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden: &w [8, 8]}\ntrain:\n  batch_size: &b 16\n  eval_every: *b\n")
    cfg = load_config(path)
    assert cfg.model.hidden == [8, 8] and cfg.train.eval_every == 16


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden: &a [1, *a]\n")
    assert "alias" in config_error(load_config, path)


def test_a_50_mb_yaml_is_refused_without_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    line = "    1: 0.5\n"
    with path.open("w") as f:
        f.write("staleness:\n  histogram:\n")
        chunk = line * 100_000
        for _ in range(50_000_000 // len(chunk) + 1):
            f.write(chunk)
    proc, _ = cli_train(path)
    assert_one_line_exit_2(proc, "larger than")


def test_dev_zero_is_refused():
    proc, _ = cli_train("/dev/zero")
    assert_one_line_exit_2(proc, "/dev/zero")


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "blob.yaml"
    path.write_bytes(bytes(range(256)) * 64)
    proc, _ = cli_train(path)
    assert_one_line_exit_2(proc, "UTF-8")


def test_nul_bytes_in_utf8_are_refused(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"name: a\x00b\n")
    config_error(load_config, path)


def test_a_directory_is_refused(tmp_path):
    assert "cannot read" in config_error(load_config, tmp_path)


def test_a_long_key_path_in_an_override_is_refused():
    message = config_error(apply_override, {}, "a." * 50_000 + "b=1")
    assert "nest" in message


def test_a_deep_override_value_is_refused_in_process():
    message = config_error(apply_override, {}, "model.hidden=" + "[" * 60_000 + "]" * 60_000)
    assert "nest" in message


def test_deep_values_built_in_python_are_not_formatted_recursively():
    value: list = []
    for _ in range(100_000):
        value = [value]
    assert "model.hidden" in config_error(from_dict, {"model": {"hidden": value}})


def test_a_huge_value_is_truncated_in_the_message():
    message = config_error(from_dict, {"train": {"batch_size": "x" * 1_000_000}})
    assert "train.batch_size" in message


def test_a_huge_unknown_key_is_truncated():
    message = config_error(from_dict, {"train": {"y" * 1_000_000: 1}})
    assert "unknown key" in message


def test_keys_of_mixed_types_are_one_line():
    config_error(from_dict, {1: "a", "b": "c"})


def test_an_integer_with_ten_thousand_digits_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: " + "9" * 10_000 + "\n")
    config_error(load_config, path)
    path.write_text("staleness:\n  histogram: {'" + "7" * 10_000 + "': 1.0}\n")
    config_error(load_config, path)


def test_a_shipped_size_config_still_loads(tmp_path):
    """A histogram over every staleness up to the s limit (the largest honest config) loads."""
    path = tmp_path / "c.yaml"
    path.write_text("staleness:\n  controlled: true\n  distribution: histogram\n  histogram:\n"
                    + "".join(f"    {k}: 1.0\n" for k in range(10_001)))
    assert len(load_config(path).staleness.histogram) == 10_001


def test_a_run_dirs_config_yaml_goes_through_the_same_limits(tmp_path):
    """replay, sample and resume read RUN_DIR/config.yaml with load_config."""
    (tmp_path / "config.yaml").write_text("[" * 200_000 + "]" * 200_000)
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", "replay", str(tmp_path)], capture_output=True,
                          text=True, timeout=GUARD_S, cwd=REPO)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "nest" in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# Item 9: every number in range


@pytest.mark.parametrize("override, key", [
    ("cluster.chief_port=70000", "cluster.chief_port"),
    ("cluster.chief_port=-1", "cluster.chief_port"),
    ("cluster.ps_ports=[99999, 4000]", "cluster.ps_ports[0]"),
    ("cluster.ps_ports=[-3, 4000]", "cluster.ps_ports[0]"),
    ("cluster.ps_ports=[0, 4000]", "cluster.ps_ports[0]"),
    ("cluster.workers=100000", "cluster.workers"),
    ("cluster.ps=100000", "cluster.ps"),
    ("cluster.heartbeat_timeout=-1", "cluster.heartbeat_timeout"),
    ("cluster.heartbeat_interval=0", "cluster.heartbeat_interval"),
    ("cluster.rpc_timeout=.inf", "cluster.rpc_timeout"),
    ("checkpoint.every_seconds=-1", "checkpoint.every_seconds"),
    ("train.max_seconds=-1", "train.max_seconds"),
    ("train.max_steps=1e23", "train.max_steps"),
    ("train.max_steps=1.0e+23", "train.max_steps"),
    ("train.max_steps=100000000000000000000000", "train.max_steps"),
    ("optimizer.learning_rate=.nan", "optimizer.learning_rate"),
    ("optimizer.learning_rate=.inf", "optimizer.learning_rate"),
    ("telemetry.prometheus_port=70000", "telemetry.prometheus_port"),
    ("telemetry.prometheus_port=65534", "telemetry.prometheus_port"),  # + ps + workers > 65535
    ("seed=-1", "seed"),
    ("model.hidden=[0]", "model.hidden[0]"),
    ("staleness.histogram={-1: 1.0}", "staleness.histogram"),
    ("delay.max_ms=.inf", "delay.max_ms"),
    ("optimizer.schedule.boundaries=[10, 5]", "optimizer.schedule.boundaries"),
])
def test_out_of_range_numbers_name_key_value_and_range(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text("cluster: {ps: 2, workers: 2}\n")
    message = config_error(load_config, path, [override])
    assert f" {key} " in message, message
    assert "must" in message and "got" in message, message


@pytest.mark.parametrize("override", ["cluster.chief_port=70000", "cluster.workers=100000",
                                      "train.max_steps=100000000000000000000000"])
def test_out_of_range_numbers_exit_2_on_the_cli(tmp_path, override):
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_steps: 10}\n")
    proc, _ = cli_train(path, override)
    assert_one_line_exit_2(proc, override.split("=")[0])


def _numeric_leaves(cls=Config, prefix=""):
    """(dotted key, kind) of every number in the schema: kind int, float, list[int], list[float], dict."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _numeric_leaves(tp, key + ".")
        elif tp in (int, float):
            yield key, tp.__name__
        elif typing.get_origin(tp) is list and typing.get_args(tp)[0] in (int, float):
            yield key, f"list[{typing.get_args(tp)[0].__name__}]"
        elif typing.get_origin(tp) is dict:
            yield key, "dict"


NUMERIC = list(_numeric_leaves())
MAY_BE_NEGATIVE = {"train.target.value"}  # a metric value: any finite number


def _set(key: str, value) -> dict:
    raw: dict = {}
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def _wrap(kind: str, value):
    return [value] if kind.startswith("list") else {0: value} if kind == "dict" else value


def test_the_schema_walk_finds_every_number():
    keys = {k for k, _ in NUMERIC}
    assert {"cluster.chief_port", "cluster.ps_ports", "train.max_steps", "delay.straggler.factor",
            "staleness.histogram", "telemetry.prometheus_port", "seed"} <= keys
    assert len(keys) >= 55


def test_every_number_has_a_range_entry():
    """A number added to the schema without a range fails here (the histogram has its own check)."""
    from asyncps import config

    ranged = {(cls, name) for cls, name, _, _ in config._RANGES}

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, prefix + f.name + ".")
            elif tp in (int, float) or typing.get_origin(tp) is list and typing.get_args(tp)[0] in (int, float):
                yield prefix + f.name, cls, f.name

    missing = [key for key, cls, name in walk(Config) if (cls, name) not in ranged and key not in MAY_BE_NEGATIVE]
    assert not missing, missing


@pytest.mark.parametrize("key, kind", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_number_is_range_checked(key, kind):
    short = key.rsplit(".", 1)[-1]
    bad = [2**63, -(2**63) - 1] if kind in ("int", "list[int]") else [float("nan"), float("inf"), -float("inf")]
    if kind == "dict":
        bad = [float("nan"), float("inf"), -1.0]
    if key not in MAY_BE_NEGATIVE and kind != "dict":
        bad.append(-1)
    for value in bad:
        message = config_error(from_dict, _set(key, _wrap(kind, value)))
        assert short in message and "got" in message, (key, value, message)


def test_range_checks_do_not_reject_the_defaults_or_edges():
    from_dict({})
    cfg = from_dict({"cluster": {"chief_port": 65535, "ps_ports": [1, 65534], "workers": 1024, "ps": 2},
                     "checkpoint": {"every_seconds": 0}, "train": {"max_steps": 2**63 - 1, "max_seconds": 0.5},
                     "telemetry": {"prometheus_port": 0}, "seed": 2**32})
    assert cfg.cluster.chief_port == 65535 and cfg.train.max_steps == 2**63 - 1


def test_validation_does_not_mutate():
    cfg = from_dict({"cluster": {"security": {"mtls": True, "dir": "/tmp/certs"}}})
    assert cfg.cluster.security.mtls and not cfg.cluster.security.tls  # mtls implies tls where it is used


def test_launch_resume_reads_the_recorded_config_within_the_limits(tmp_path):
    """`launch --resume DIR` reads DIR/config.yaml for the run_dir it names: a hostile one is no config."""
    from asyncps.cli.launch import _recorded_config

    (tmp_path / "config.yaml").write_text("[" * 200_000 + "]" * 200_000)
    assert _recorded_config(tmp_path) == {}
    (tmp_path / "config.yaml").write_bytes(bytes(range(256)) * 8)
    assert _recorded_config(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("run_dir: /somewhere\n")
    assert _recorded_config(tmp_path) == {"run_dir": "/somewhere"}


def test_a_merge_key_bomb_is_refused(tmp_path):
    """`<<: [*a, *a, ...]` copies the merged pairs: counted like any other alias expansion."""
    lines = ["x0: &x0 {" + ", ".join(f"k{i}: 1" for i in range(10)) + "}"]
    lines += [f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 10)}]}}" for i in range(1, 9)]
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert "alias" in config_error(load_config, path)


def test_a_named_pipe_without_a_writer_is_one_error_not_a_hang(tmp_path):
    """(The command waits PIPE_SECONDS; here the wait is shortened.)"""
    import os

    from asyncps import config as config_module

    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(config_module.ConfigError, match="a pipe that sent nothing"):
        config_module._read_at_most(fifo, 1024, pipe_seconds=0.2)
