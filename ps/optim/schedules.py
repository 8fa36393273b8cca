"""Learning-rate schedules: the learning rate as a function of the shard's update count.

``make_schedule(cfg)`` returns a callable ``step -> lr``, where ``step`` is the number of updates
already applied (0 for the first). The formulas are TensorFlow's functions of the same names
(TF1 ``tf.compat.v1.train.*_decay`` and ``tf.keras.optimizers.schedules``); ``staircase`` floors
the exponent ``step / decay_steps`` to an integer, so the rate changes in steps every
``decay_steps`` updates.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

from asyncps.config import OptimizerConfig, ScheduleConfig
from asyncps.errors import ConfigError

Schedule = Callable[[int], float]


def _progress(step: int, s: ScheduleConfig) -> float:
    """``step / decay_steps``, floored when ``staircase``."""
    p = step / s.decay_steps
    return math.floor(p) if s.staircase else p


def constant(lr: float, s: ScheduleConfig) -> Schedule:
    """``lr`` at every step."""
    return lambda step: lr


def exponential(lr: float, s: ScheduleConfig) -> Schedule:
    """``lr * decay_rate ^ (step / decay_steps)``.

    ``tf.compat.v1.train.exponential_decay`` / ``tf.keras.optimizers.schedules.ExponentialDecay``.
    """
    return lambda step: lr * s.decay_rate ** _progress(step, s)


def natural_exp(lr: float, s: ScheduleConfig) -> Schedule:
    """``lr * exp(-decay_rate * step / decay_steps)``. ``tf.compat.v1.train.natural_exp_decay``."""
    return lambda step: lr * math.exp(-s.decay_rate * _progress(step, s))


def inverse_time(lr: float, s: ScheduleConfig) -> Schedule:
    """``lr / (1 + decay_rate * step / decay_steps)``.

    ``tf.compat.v1.train.inverse_time_decay`` / ``tf.keras.optimizers.schedules.InverseTimeDecay``.
    """
    return lambda step: lr / (1.0 + s.decay_rate * _progress(step, s))


def piecewise(lr: float, s: ScheduleConfig) -> Schedule:
    """``values[0]`` while ``step <= boundaries[0]``, ``values[i]`` while
    ``boundaries[i-1] < step <= boundaries[i]``, ``values[-1]`` after the last boundary.

    ``tf.compat.v1.train.piecewise_constant`` / ``tf.keras.optimizers.schedules.
    PiecewiseConstantDecay``. As there, the values are learning rates, so ``learning_rate`` is
    not used. Boundaries must increase strictly.
    """
    if any(b >= c for b, c in zip(s.boundaries, s.boundaries[1:])):
        raise ConfigError(f"optimizer.schedule.boundaries must increase strictly, got {s.boundaries}")
    boundaries, values = list(s.boundaries), list(s.values)
    return lambda step: values[bisect.bisect_left(boundaries, step)]


def cosine(lr: float, s: ScheduleConfig) -> Schedule:
    """``lr * ((1 - alpha) * 0.5 * (1 + cos(pi * min(step, decay_steps) / decay_steps)) + alpha)``.

    ``tf.keras.optimizers.schedules.CosineDecay`` (no warm-up), after Loshchilov & Hutter, "SGDR:
    Stochastic Gradient Descent with Warm Restarts", ICLR 2017. Reaches ``alpha * lr`` at
    ``decay_steps`` and stays there.
    """
    def rate(step: int) -> float:
        cosine_decay = 0.5 * (1.0 + math.cos(math.pi * min(step, s.decay_steps) / s.decay_steps))
        return lr * ((1.0 - s.alpha) * cosine_decay + s.alpha)
    return rate


SCHEDULES: dict[str, Callable[[float, ScheduleConfig], Schedule]] = {
    f.__name__: f for f in (constant, exponential, natural_exp, inverse_time, piecewise, cosine)
}


def make_schedule(cfg: OptimizerConfig) -> Schedule:
    """The schedule ``cfg.schedule`` starting from ``cfg.learning_rate``: a callable ``step -> lr``."""
    try:
        build = SCHEDULES[cfg.schedule.name]
    except KeyError:
        raise ValueError(
            f"optimizer.schedule.name must be one of {', '.join(SCHEDULES)}, got {cfg.schedule.name!r}"
        ) from None
    return build(float(cfg.learning_rate), cfg.schedule)
