"""Server-side optimizers, learning-rate schedules and staleness policies: pure numpy.

These run on the parameter-server shard and in the single-process trainer, with no knowledge of
the transport. One update of a variable at version ``step`` (updates already applied)::

    grad, lr_scale = policy.adjust(grad, staleness, value, value_read, policy_state)
    if grad is not None:
        optimizer.apply_dense(value, grad, slots, schedule(step) * lr_scale, step)
"""
from asyncps.ps.optim.optimizers import (
    OPTIMIZERS,
    SGD,
    Adagrad,
    Adam,
    Momentum,
    Nesterov,
    Optimizer,
    RMSProp,
    make_optimizer,
)
from asyncps.ps.optim.schedules import SCHEDULES, Schedule, make_schedule
from asyncps.ps.optim.staleness import (
    DROPPED,
    POLICIES,
    AdaptiveDelayCompensation,
    Adjusted,
    DelayCompensation,
    Drop,
    LrScale,
    NoPolicy,
    StalenessPolicy,
    make_staleness_policy,
)

__all__ = [
    "OPTIMIZERS", "SGD", "Adagrad", "Adam", "Momentum", "Nesterov", "Optimizer", "RMSProp",
    "make_optimizer", "SCHEDULES", "Schedule", "make_schedule", "DROPPED", "POLICIES",
    "AdaptiveDelayCompensation", "Adjusted", "DelayCompensation", "Drop", "LrScale", "NoPolicy",
    "StalenessPolicy", "make_staleness_policy",
]
