"""The update rule of a shard: optimizer + learning-rate schedule + staleness policy.

The shard core (ps/shard.py) knows values, versions and locks; what an update does to a value is
this object's business, injected at construction (ps-lite's server handle, in spirit). A
`Variable` is a value plus the state the rule keeps for it (optimizer slots, staleness-policy
state, its update count, the optimizer's step).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from asyncps.sparse import SparseRows
from asyncps.ps.errors import FailedPrecondition

POLICY_SLOT = "policy:"  # prefix of staleness-policy state in snapshots


@dataclass
class Variable:
    """One variable (or block of rows) on the shard."""

    value: np.ndarray
    frozen: bool
    slots: dict[str, np.ndarray] = field(default_factory=dict)  # optimizer slots, like value
    policy_state: dict[str, np.ndarray] = field(default_factory=dict)  # staleness-policy state
    updates: int = 0  # updates applied to this variable (the optimizer's step)

    def saved_slots(self) -> dict[str, np.ndarray]:
        """Copies of the optimizer slots and the policy state (prefixed), as snapshots keep them."""
        out = {k: a.copy() for k, a in self.slots.items()}
        out.update({POLICY_SLOT + k: a.copy() for k, a in self.policy_state.items()})
        return out

    def fill_slots(self, name: str, saved: Mapping[str, np.ndarray], updates: int) -> None:
        """Overwrites the slots and policy state with saved ones (same names, shapes)."""
        expected = set(self.slots) | {POLICY_SLOT + k for k in self.policy_state}
        if set(saved) != expected:
            raise FailedPrecondition(f"variable {name!r}: snapshot slots {sorted(saved)}, expected {sorted(expected)}")
        for key, array in saved.items():
            target = self.policy_state[key[len(POLICY_SLOT):]] if key.startswith(POLICY_SLOT) else self.slots[key]
            if target.shape != array.shape:
                raise FailedPrecondition(f"variable {name!r} slot {key!r}: shape {array.shape}, expected {target.shape}")
            target[...] = array
        self.updates = int(updates)


class UpdateRule:
    """How a gradient changes a variable: the staleness policy adjusts it (or drops it), the
    optimizer applies it at the schedule's learning rate for the shard's version."""

    def __init__(self, optimizer, schedule, policy):
        self.optimizer, self.schedule, self.policy = optimizer, schedule, policy

    @classmethod
    def from_config(cls, optimizer_cfg) -> "UpdateRule":
        from asyncps.ps.optim import make_optimizer, make_schedule, make_staleness_policy  # (ps.optim imports the registry)

        return cls(make_optimizer(optimizer_cfg), make_schedule(optimizer_cfg),
                   make_staleness_policy(optimizer_cfg.staleness_policy))

    @property
    def name(self) -> str:
        """The optimizer's name (what a snapshot's slots belong to)."""
        return self.optimizer.name

    @property
    def needs_value_read(self) -> bool:
        """The policy needs the value a worker read (DC-ASGD)."""
        return self.policy.needs_value_read

    def new_variable(self, value: np.ndarray, frozen: bool) -> Variable:
        value = np.array(value, copy=True)  # writable, owned by the shard
        if frozen:
            return Variable(value, frozen=True)
        return Variable(value, False, self.optimizer.init_slots(value), self.policy.init_state(value))

    def learning_rate(self, version: int) -> float:
        return self.schedule(version)

    def apply_combined(self, var: Variable, grads: list, lr: float) -> int:
        """n-softsync: each of several gradients goes through the staleness policy with its own
        staleness (`grads`: (gradient, staleness) pairs), the kept ones are averaged, weighted
        by their learning-rate scales, and the optimizer takes ONE step; the number kept."""
        kept = []
        for grad, staleness in grads:
            sparse = isinstance(grad, SparseRows)
            adjusted = self.policy.adjust(grad.values if sparse else grad, staleness, var.value, None,
                                          var.policy_state, grad.rows if sparse else None)
            if adjusted.grad is not None:
                kept.append((adjusted.lr_scale, SparseRows(grad.rows, adjusted.grad) if sparse else adjusted.grad))
        if not kept:
            return 0
        combined = _weighted_mean(kept)
        if isinstance(combined, SparseRows):
            self.optimizer.apply_sparse(var.value, combined.rows, combined.values, var.slots, lr, var.updates)
        else:
            self.optimizer.apply_dense(var.value, combined, var.slots, lr, var.updates)
        var.updates += 1
        return len(kept)

    def apply(self, var: Variable, grad, lr: float, staleness: int, value_read) -> bool:
        """One optimizer update of one variable, through the staleness policy; False if dropped."""
        sparse = isinstance(grad, SparseRows)
        rows, g = (grad.rows, grad.values) if sparse else (None, grad)
        adjusted = self.policy.adjust(g, staleness, var.value, value_read, var.policy_state, rows)
        if adjusted.grad is None:
            return False
        rate = lr * adjusted.lr_scale
        if sparse:
            self.optimizer.apply_sparse(var.value, rows, adjusted.grad, var.slots, rate, var.updates)
        else:
            self.optimizer.apply_dense(var.value, adjusted.grad, var.slots, rate, var.updates)
        var.updates += 1
        return True


def _weighted_mean(scaled: list):
    """sum(scale_i * g_i) / len: dense arrays, or sparse rows (summed per row)."""
    if not isinstance(scaled[0][1], SparseRows):
        total = scaled[0][1] * np.float32(scaled[0][0])
        for scale, g in scaled[1:]:
            total += g * np.float32(scale)
        total /= len(scaled)
        return total
    rows = np.concatenate([g.rows for _, g in scaled])
    values = np.concatenate([g.values * np.float32(scale) for scale, g in scaled])
    unique, inverse = np.unique(rows, return_inverse=True)
    summed = np.zeros((len(unique), *values.shape[1:]), dtype=values.dtype)
    np.add.at(summed, inverse, values)
    summed /= len(scaled)
    return SparseRows(unique, summed)
