"""Names defined once: the config schema's choices are the registries' keys.

The schema lives in `asyncps` (common/), which imports no role, so it cannot read the
registries; this test ties each Literal (or name tuple) of the schema to the registry that
implements it, so adding an optimizer, a schedule, a policy, a mode, a model, a data set or a
compression kind on one side only fails here.
"""
from typing import get_args, get_type_hints

import pytest

from asyncps import config as c
from asyncps.ps.consistency import MODES
from asyncps.ps.optim.optimizers import OPTIMIZERS
from asyncps.ps.optim.schedules import SCHEDULES
from asyncps.ps.optim.staleness import POLICIES
from asyncps.compression import KINDS
from asyncps.worker.models import MODELS


def choices(cls, field: str) -> set[str]:
    return set(get_args(get_type_hints(cls)[field]))


@pytest.mark.parametrize("schema, registry", [
    (choices(c.OptimizerConfig, "name"), set(OPTIMIZERS)),
    (choices(c.ScheduleConfig, "name"), set(SCHEDULES)),
    (choices(c.StalenessPolicyConfig, "name"), set(POLICIES)),
    (choices(c.ClusterConfig, "mode"), set(MODES)),
    (choices(c.ClusterConfig, "compression"), set(KINDS)),
    (set(c.MODEL_NAMES), set(MODELS)),
], ids=["optimizers", "schedules", "staleness policies", "consistency modes", "compression", "models"])
def test_the_schema_offers_exactly_what_is_implemented(schema, registry):
    assert schema == registry
