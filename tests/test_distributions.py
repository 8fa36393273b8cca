"""Compute-time and delay distributions (asyncps.worker.distributions): sample moments against the
closed forms (fixed seed, tolerances of several standard errors), trace replay exact, config checks."""
import json
import math

import numpy as np
import pytest

from asyncps.config import DelayConfig, StragglerConfig, from_dict
from asyncps.errors import ConfigError
from asyncps.worker.delays import DelayModel
from asyncps.worker.distributions import Distribution, load_trace, parse_trace

N = 40000


def sample(cfg: DelayConfig, n: int = N, seed: int = 0, worker: int = 0) -> np.ndarray:
    dist = Distribution(cfg, worker)
    rng = np.random.default_rng([seed, worker])
    return np.array([dist.draw_ms(rng) for _ in range(n)])


CASES = [
    DelayConfig(kind="constant", mean_ms=7),
    DelayConfig(kind="uniform", min_ms=2, max_ms=10),
    DelayConfig(kind="exponential", mean_ms=4),
    DelayConfig(kind="gamma", mean_ms=6, shape=3),
    DelayConfig(kind="gamma", mean_ms=6, shape=0.5),
    DelayConfig(kind="lognormal", mean_ms=4, sigma=0.6),
    DelayConfig(kind="pareto", mean_ms=5, alpha=5.0),
]


@pytest.mark.parametrize("cfg", CASES, ids=[f"{c.kind}-{c.shape if c.kind == 'gamma' else ''}" for c in CASES])
def test_sample_moments_match_the_closed_forms(cfg):
    d = sample(cfg)
    dist = Distribution(cfg)
    mean, var = dist.mean_ms(), dist.variance_ms2()
    assert d.min() >= 0
    se_mean = math.sqrt(var / N)
    assert abs(d.mean() - mean) <= 5 * se_mean + 1e-12, (d.mean(), mean)
    if var == 0:
        assert d.var() == 0
    else:
        # the variance of the sample variance needs the 4th moment; 10% is > 5 standard errors here
        assert abs(d.var() / var - 1) < 0.10, (d.var(), var)


def test_closed_forms():
    assert Distribution(DelayConfig(kind="gamma", mean_ms=6, shape=3)).variance_ms2() == pytest.approx(12.0)
    assert Distribution(DelayConfig(kind="exponential", mean_ms=4)).variance_ms2() == 16.0
    p = Distribution(DelayConfig(kind="pareto", mean_ms=5, alpha=5.0))
    xm = 5 * 4 / 5
    assert p.variance_ms2() == pytest.approx(xm**2 * 5 / (16 * 3))
    assert Distribution(DelayConfig(kind="pareto", mean_ms=5, alpha=2.0)).variance_ms2() == math.inf
    ln = Distribution(DelayConfig(kind="lognormal", mean_ms=4, sigma=0.6))
    assert ln.variance_ms2() == pytest.approx((math.exp(0.36) - 1) * 16)


def test_pareto_tail_and_minimum():
    cfg = DelayConfig(kind="pareto", mean_ms=3, alpha=2.5)
    d = sample(cfg)
    xm = 3 * 1.5 / 2.5
    assert d.min() >= xm
    # P(X > 2 xm) = 2^-alpha
    assert abs((d > 2 * xm).mean() - 2**-2.5) < 0.01


def test_gamma_shape_one_is_the_exponential_law():
    g = sample(DelayConfig(kind="gamma", mean_ms=4, shape=1))
    assert abs(g.std() - 4) < 0.15


def test_existing_kinds_draw_the_numbers_they_always_drew():
    """DelayModel's draws for the kinds that predate the module: the same numpy calls, same RNG."""
    rng = np.random.default_rng([3, 1, 0xDE1A7])
    expected = [float(rng.exponential(4.0)) for _ in range(5)]
    model = DelayModel(DelayConfig(kind="exponential", mean_ms=4), 1, 3)
    assert [model.draw_ms() for _ in range(5)] == expected
    rng = np.random.default_rng([3, 1, 0xDE1A7])
    expected = [float(rng.lognormal(math.log(4.0) - 0.5**2 / 2, 0.5)) for _ in range(5)]
    model = DelayModel(DelayConfig(kind="lognormal", mean_ms=4, sigma=0.5), 1, 3)
    assert [model.draw_ms() for _ in range(5)] == expected


def test_trace_replays_exactly_per_worker_and_cycles(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("# seconds per step\n0.010 0.020, 0.030\n0.5\n")
    cfg = DelayConfig(kind="trace", trace=str(path))
    w0 = Distribution(cfg, 0)
    assert [w0.draw_ms(None) for _ in range(7)] == [10.0, 20.0, 30.0, 10.0, 20.0, 30.0, 10.0]
    w1 = Distribution(cfg, 1)
    assert [w1.draw_ms(None) for _ in range(3)] == [500.0] * 3
    w2 = Distribution(cfg, 2)  # worker 2 of a 2-sequence trace replays sequence 0
    assert w2.draw_ms(None) == 10.0
    assert w0.mean_ms() == pytest.approx(20.0) and w1.variance_ms2() == 0
    # DelayModel: seconds, the straggler stretch on top
    model = DelayModel(DelayConfig(kind="trace", trace=str(path), straggler=StragglerConfig(worker=0, factor=2)), 0, 0)
    assert [model.seconds(i) for i in range(3)] == [0.02, 0.04, 0.06]


def test_trace_json_formats(tmp_path):
    assert [list(a) for a in parse_trace(json.dumps([[1, 2], [3]]))] == [[1, 2], [3]]
    assert [list(a) for a in parse_trace(json.dumps({"1": [3], "0": [1, 2]}))] == [[1, 2], [3]]
    assert [list(a) for a in parse_trace("[0.1, 0.2]")] == [[0.1, 0.2]]
    p = tmp_path / "t.json"
    p.write_text(json.dumps([[0.001]]))
    assert Distribution(DelayConfig(kind="trace", trace=str(p))).draw_ms(None) == 1.0


@pytest.mark.parametrize("text, fragment", [
    ("", "no sequence"),
    ("[[1, -2]]", "finite and 0 or more"),
    ("[[]]", "non-empty"),
    ("1 2 x", "line 1"),
    ("[[1, \"a\"]]", "numbers only"),
    ("{\"a\": [1]}", "worker indices"),
    ("[1, [2]", "not valid JSON"),
])
def test_bad_traces_are_one_line_config_errors(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_trace(text)


def test_missing_trace_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_trace(str(tmp_path / "nope.txt"))


def test_config_checks_of_the_new_kinds():
    from_dict({"delay": {"kind": "gamma", "mean_ms": 3, "shape": 0.5}})
    from_dict({"delay": {"kind": "pareto", "mean_ms": 3, "alpha": 1.5}})
    for raw, fragment in [
        ({"delay": {"kind": "trace"}}, "delay.trace must name a file"),
        ({"delay": {"kind": "pareto", "alpha": 1.0}}, "delay.alpha must be in"),
        ({"delay": {"kind": "gamma", "shape": 0}}, "delay.shape must be in"),
        ({"delay": {"kind": "weibull"}}, "delay.kind must be one of"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            from_dict(raw)
