"""Learning-rate schedules at hand-picked steps (TensorFlow's formulas, written out here)."""
import math

import pytest

from asyncps.config import OptimizerConfig, ScheduleConfig
from asyncps.errors import ConfigError
from asyncps.ps.optim import make_schedule


def schedule(lr=1.0, **kw):
    return make_schedule(OptimizerConfig(learning_rate=lr, schedule=ScheduleConfig(**kw)))


def assert_rates(f, expected: dict):
    for step, rate in expected.items():
        assert f(step) == pytest.approx(rate, rel=1e-12), f"step {step}"
        assert isinstance(f(step), float)


def test_constant():
    assert_rates(schedule(0.1, name="constant"), {0: 0.1, 7: 0.1, 10**6: 0.1})


def test_exponential():
    f = schedule(1.0, name="exponential", decay_rate=0.5, decay_steps=10)
    assert_rates(f, {0: 1.0, 5: 0.5 ** 0.5, 10: 0.5, 25: 0.5 ** 2.5})
    assert f(5) == pytest.approx(0.7071067811865476)


def test_exponential_staircase():
    f = schedule(2.0, name="exponential", decay_rate=0.5, decay_steps=10, staircase=True)
    assert_rates(f, {0: 2.0, 9: 2.0, 10: 1.0, 19: 1.0, 25: 0.5})


def test_natural_exp():
    f = schedule(2.0, name="natural_exp", decay_rate=0.5, decay_steps=10)
    assert_rates(f, {0: 2.0, 10: 2.0 * math.exp(-0.5), 15: 2.0 * math.exp(-0.75)})
    assert f(10) == pytest.approx(1.2130613194252668)


def test_natural_exp_staircase():
    f = schedule(2.0, name="natural_exp", decay_rate=0.5, decay_steps=10, staircase=True)
    assert_rates(f, {9: 2.0, 10: 2.0 * math.exp(-0.5), 15: 2.0 * math.exp(-0.5), 20: 2.0 * math.exp(-1.0)})


def test_inverse_time():
    f = schedule(1.0, name="inverse_time", decay_rate=0.5, decay_steps=10)
    assert_rates(f, {0: 1.0, 10: 1 / 1.5, 15: 1 / 1.75, 40: 1 / 3.0})


def test_inverse_time_staircase():
    f = schedule(3.0, name="inverse_time", decay_rate=0.5, decay_steps=10, staircase=True)
    assert_rates(f, {9: 3.0, 10: 2.0, 19: 2.0, 20: 1.5})


def test_piecewise_boundaries_belong_to_the_interval_they_end():
    # TF: values[0] while step <= 10, values[1] while 10 < step <= 20, values[2] after 20.
    f = schedule(99.0, name="piecewise", boundaries=[10, 20], values=[1.0, 0.5, 0.1])
    assert_rates(f, {0: 1.0, 10: 1.0, 11: 0.5, 20: 0.5, 21: 0.1, 10**6: 0.1})


def test_piecewise_rejects_unsorted_boundaries():
    with pytest.raises(ConfigError, match=r"optimizer\.schedule\.boundaries"):
        schedule(name="piecewise", boundaries=[20, 10], values=[1.0, 0.5, 0.1])


def test_cosine_start_half_end_and_past_end():
    f = schedule(2.0, name="cosine", decay_steps=100)
    # 2 * 0.5 * (1 + cos(pi * s / 100))
    assert_rates(f, {0: 2.0, 25: 1.0 + math.cos(math.pi / 4), 50: 1.0, 100: 0.0, 150: 0.0})


def test_cosine_with_alpha_floor():
    f = schedule(1.0, name="cosine", decay_steps=100, alpha=0.1)
    # (1 - 0.1) * 0.5 * (1 + cos(pi * s / 100)) + 0.1
    assert_rates(f, {0: 1.0, 50: 0.9 * 0.5 + 0.1, 100: 0.1, 1000: 0.1})
