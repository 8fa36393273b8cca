"""Staleness policies: what the shard does with a gradient computed on old weights.

The staleness of a push is the shard's version (updates applied to the variable) when the push is
applied minus the version the worker read. Before the optimizer runs, the shard asks the policy::

    grad, lr_scale = policy.adjust(grad, staleness, value_now, value_read, state, rows)
    if grad is None:
        ...  # dropped: count it, leave the variable alone
    else:
        optimizer.apply_dense(value, grad, slots, schedule(version) * lr_scale, version)

so a policy sees the raw gradient (weight decay is added later, by the optimizer) and may
return a compensated gradient, a learning-rate multiplier, or a drop.

Array conventions: ``value_now``, ``value_read`` and the arrays of ``state`` are whole-variable
arrays (the shard's value, the weights the worker read, the policy's per-variable slots);
``grad`` is the whole gradient when ``rows`` is None, or the gradient of rows ``rows`` (unique
indices into axis 0) of a sparse push. The caller's ``grad`` is never written to; ``state`` is
updated in place (only its ``rows`` for a sparse push).

Policies: ``none``; ``drop`` (staleness > ``max_staleness``); ``lr_scale`` (learning rate divided
by the staleness, Zhang et al. 2016); ``dcasgd`` and ``dcasgd_adaptive`` (delay compensation,
Zheng et al. 2017), which need ``value_read``, so the shard must keep what each worker read
(``needs_value_read``).
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np

from asyncps.config import StalenessPolicyConfig

State = dict[str, np.ndarray]


class Adjusted(NamedTuple):
    """The answer of a policy: the gradient to apply (None: drop the push) and a factor on the
    learning rate of this one update."""

    grad: np.ndarray | None
    lr_scale: float


DROPPED = Adjusted(None, 0.0)


class StalenessPolicy:
    """Base: validates the staleness and supplies the (empty) per-variable state.

    Subclasses implement ``_adjust`` and, when they keep state, ``slot_names``.
    """

    name: ClassVar[str]
    slot_names: tuple[str, ...] = ()
    needs_value_read: ClassVar[bool] = False  # True: `value_read` must be passed when staleness > 0

    def __init__(self, cfg: StalenessPolicyConfig):
        self.cfg = cfg

    def init_state(self, value: np.ndarray) -> State:
        """Fresh per-variable state (float32 zeros shaped like ``value``, one per slot name)."""
        return {name: np.zeros(value.shape, dtype=np.float32) for name in self.slot_names}

    def adjust(self, grad: np.ndarray, staleness: int, value_now: np.ndarray | None = None,
               value_read: np.ndarray | None = None, state: State | None = None,
               rows: np.ndarray | None = None) -> Adjusted:
        """The gradient to apply and the learning-rate factor for a push of this staleness."""
        if staleness < 0:
            raise ValueError(f"staleness must be 0 or more, got {staleness}")
        return self._adjust(grad, int(staleness), value_now, value_read, state, rows)

    def _adjust(self, grad, staleness, value_now, value_read, state, rows) -> Adjusted:
        raise NotImplementedError


class NoPolicy(StalenessPolicy):
    """Apply every gradient as it is, at the full learning rate (plain asynchronous SGD)."""

    name = "none"

    def _adjust(self, grad, staleness, value_now, value_read, state, rows):
        return Adjusted(grad, 1.0)


class Drop(StalenessPolicy):
    """Drop a push whose staleness exceeds ``max_staleness``; apply the others unchanged.

    Staleness equal to ``max_staleness`` is still applied. The caller counts the drops.
    """

    name = "drop"

    def _adjust(self, grad, staleness, value_now, value_read, state, rows):
        return DROPPED if staleness > self.cfg.max_staleness else Adjusted(grad, 1.0)


class LrScale(StalenessPolicy):
    """Staleness-dependent learning rate: ``lr / staleness`` for staleness >= 1, ``lr`` at 0.

    Zhang, Gupta, Lian & Liu, "Staleness-aware Async-SGD for Distributed Deep Learning",
    IJCAI 2016, eq. (3): alpha(tau) = alpha_0 / tau.
    """

    name = "lr_scale"

    def _adjust(self, grad, staleness, value_now, value_read, state, rows):
        return Adjusted(grad, 1.0 / max(staleness, 1))


class DelayCompensation(StalenessPolicy):
    """DC-ASGD with a constant lambda: a first-order Taylor correction of the stale gradient::

        g_dc = g + lambda * g * g * (w_now - w_read)      (elementwise)

    where ``g`` was computed at ``w_read`` (the paper's ``w_bak``) and ``g * g`` approximates the
    diagonal of the Hessian. Zheng, Meng, Wang, Chen, Yu, Ma & Liu, "Asynchronous Stochastic
    Gradient Descent with Delay Compensation", ICML 2017, eq. (9) and Algorithm 1 (DC-ASGD-c).
    At staleness 0 the correction is zero and ``g`` is returned as is.
    """

    name = "dcasgd"
    needs_value_read: ClassVar[bool] = True

    def _adjust(self, grad, staleness, value_now, value_read, state, rows):
        mean_square = self._observe(grad, state, rows)
        if staleness == 0:
            return Adjusted(grad, 1.0)
        if value_now is None or value_read is None:
            raise ValueError(f"staleness policy {self.name} needs value_now and value_read")
        g = _delta(value_now, value_read, rows)
        g *= grad
        g *= grad
        self._scale(g, mean_square)
        g += grad
        return Adjusted(g, 1.0)

    def _observe(self, grad, state, rows) -> np.ndarray | None:
        """Update the policy's statistics with this gradient; returns what ``_scale`` needs."""
        return None

    def _scale(self, correction: np.ndarray, mean_square) -> None:
        correction *= self.cfg.dc_lambda


class AdaptiveDelayCompensation(DelayCompensation):
    """DC-ASGD-a: the lambda of ``DelayCompensation`` divided by the gradient's running RMS::

        meansquare = m * meansquare + (1 - m) * g^2       (updated first, on every push)
        lambda_t   = lambda_0 / sqrt(meansquare + epsilon)
        g_dc       = g + lambda_t * g * g * (w_now - w_read)

    with ``m = dc_momentum``, ``lambda_0 = dc_lambda``, ``epsilon = dc_epsilon``. Zheng et al.,
    ICML 2017, section 4 ("DC-ASGD-a"). ``meansquare`` is the per-variable slot
    ``dc_meansquare``, starting at 0; a sparse push updates only its rows.
    """

    name = "dcasgd_adaptive"
    slot_names = ("dc_meansquare",)

    def _observe(self, grad, state, rows):
        if state is None:
            raise ValueError(f"staleness policy {self.name} needs its state (init_state)")
        whole = state["dc_meansquare"]
        ms = whole if rows is None else whole[rows]
        new_part = np.square(grad, dtype=np.float32)
        new_part *= 1.0 - self.cfg.dc_momentum
        ms *= self.cfg.dc_momentum
        ms += new_part
        if rows is not None:
            whole[rows] = ms
        return ms

    def _scale(self, correction, mean_square):
        denominator = np.add(mean_square, self.cfg.dc_epsilon, dtype=np.float32)
        np.sqrt(denominator, out=denominator)
        correction *= self.cfg.dc_lambda
        correction /= denominator


def _delta(value_now: np.ndarray, value_read: np.ndarray, rows) -> np.ndarray:
    """``w_now - w_read`` on the gradient's rows, as a new float32 array."""
    if rows is None:
        return np.subtract(value_now, value_read, dtype=np.float32)
    d = value_now[rows]
    d -= value_read[rows]
    return d


POLICIES: dict[str, type[StalenessPolicy]] = {
    cls.name: cls for cls in (NoPolicy, Drop, LrScale, DelayCompensation, AdaptiveDelayCompensation)
}


def make_staleness_policy(cfg: StalenessPolicyConfig) -> StalenessPolicy:
    """The policy named by ``cfg.name`` (the config section ``optimizer.staleness_policy``)."""
    try:
        cls = POLICIES[cfg.name]
    except KeyError:
        raise ValueError(
            f"optimizer.staleness_policy.name must be one of {', '.join(POLICIES)}, got {cfg.name!r}"
        ) from None
    return cls(cfg)
