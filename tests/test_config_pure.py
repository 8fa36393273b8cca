"""Validation never changes what it validates (issue 13 item 3): building a Config from a dict
leaves the dict as it was, `validate` leaves the Config as it was, and both give what a file gives."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from asyncps.config import Config, from_dict, load_config, validate
from asyncps.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validate_leaves_every_shipped_config_unchanged(path):
    cfg = load_config(path)
    before = copy.deepcopy(cfg)
    result = validate(cfg, source=str(path))
    assert cfg == before
    assert result == before and result is not cfg
    # nothing mutable is shared: editing the result leaves the input alone
    result.cluster.ps_ports.append(1)
    result.train.frozen.append("x")
    assert cfg == before


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_from_dict_leaves_its_input_unchanged(path):
    raw = load_config(path).to_dict()
    before = copy.deepcopy(raw)
    cfg = from_dict(raw, source=str(path))
    assert raw == before
    assert cfg == load_config(path)


EDGE = [
    {},
    {"model": {"name": "mypkg.models:Net", "width": 3, "layers": [1, {"a": None}]}},
    {"data": {"name": "mypkg.data:load", "n": 5}},
    {"staleness": {"controlled": True, "distribution": "histogram", "histogram": {0: 0.5, 8: 0.5}}},
    {"staleness": {"simulate": {"workers": 3, "straggler": {"worker": 1, "factor": 2.0}}}},
    {"delay": {"kind": "uniform", "min_ms": 1, "max_ms": 2, "straggler": {"worker": 1}}},
    {"cluster": {"ps": 2, "ps_ports": [5001, 5002], "security": {"mtls": True, "dir": "certs"}}},
    {"optimizer": {"schedule": {"name": "piecewise", "boundaries": [10, 20], "values": [0.1, 0.01, 0.001]}}},
]


@pytest.mark.parametrize("raw", EDGE)
def test_edge_cases_round_trip_without_mutation(raw):
    raw_before = copy.deepcopy(raw)
    cfg = from_dict(raw)
    assert raw == raw_before
    before = copy.deepcopy(cfg)
    assert validate(cfg) == before
    assert cfg == before


def test_validate_refuses_an_edit_with_the_files_message_and_leaves_it():
    cfg = Config()
    cfg.cluster.backup_workers = cfg.cluster.workers
    before = copy.deepcopy(cfg)
    with pytest.raises(ConfigError) as exc:
        validate(cfg, source="run.yaml")
    assert str(exc.value) == "run.yaml: cluster.backup_workers must be less than workers (2)"
    assert cfg == before
