"""The event simulation of an M-worker cluster (`staleness.simulate`) and W workers per clock of
controlled staleness (`staleness.workers`), asyncps.cli.simulate: exact staleness laws, the
consistency modes, determinism, and the identities with plain and controlled `train`.

Small and in process (linear regression, a few hundred steps); no timing is asserted."""
import numpy as np
import pytest

from asyncps.cli.train import train
from asyncps.config import load_config
from asyncps.errors import ConfigError
from asyncps.runs import load_params
from cli_runner import CONFIGS


def run(tmp_path, name, *overrides, config="linear_regression.yaml"):
    cfg = load_config(CONFIGS / config, [f"run_dir={tmp_path / name}", "train.eval_every=0", *overrides])
    report = train(cfg)
    return report, load_params(tmp_path / name / "params.npz")


def sim(workers=4, mode="async", compute="{kind: none}", **extra) -> str:
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"staleness.simulate={{workers: {workers}, mode: {mode}, compute: {compute}{more}}}"


def hist(report) -> dict[int, int]:
    return {int(k): v for k, v in report["staleness"]["histogram"].items()}


def same_params(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_deterministic_from_the_seed(tmp_path):
    s = sim(4, compute="{kind: exponential, mean_ms: 5}")
    r1, p1 = run(tmp_path, "a", s, "train.max_steps=200")
    r2, p2 = run(tmp_path, "b", s, "train.max_steps=200")
    r3, p3 = run(tmp_path, "c", s, "train.max_steps=200", "seed=1")
    assert hist(r1) == hist(r2) and same_params(p1, p2) and r1["final"] == r2["final"]
    assert hist(r1) != hist(r3)


def test_one_worker_with_zero_compute_time_is_plain_train_bit_for_bit(tmp_path):
    plain, p0 = run(tmp_path, "plain", "train.max_steps=150")
    simulated, p1 = run(tmp_path, "sim", sim(1), "train.max_steps=150")
    assert same_params(p0, p1) and plain["final"] == simulated["final"]
    assert hist(simulated) == {0: 150} == hist(plain)


def test_one_worker_mnist_softmax_is_plain_train_bit_for_bit(tmp_path, small_mnist):
    # the MNIST-shaped folder of tests/conftest.py: the identity does not depend on the pixels
    over = ("train.max_steps=60", "train.batch_size=50", f"data.path={small_mnist}")
    plain, p0 = run(tmp_path, "plain", *over, config="mnist_softmax.yaml")
    simulated, p1 = run(tmp_path, "sim", sim(1, compute="{kind: constant, mean_ms: 3}"), *over,
                        config="mnist_softmax.yaml")
    assert same_params(p0, p1) and plain["final"] == simulated["final"]


@pytest.mark.parametrize("compute", ["{kind: none}", "{kind: constant, mean_ms: 7}"])
def test_equal_constant_compute_gives_staleness_exactly_m_minus_1_after_warm_up(tmp_path, compute):
    m, steps = 6, 120
    r, _ = run(tmp_path, "c", sim(m, compute=compute), f"train.max_steps={steps}")
    # the first round: worker j's gradient is applied at version j (all read version 0)
    assert hist(r) == {**{j: 1 for j in range(m - 1)}, m - 1: steps - (m - 1)}
    assert r["staleness"]["simulation"]["gradients_computed"] == steps + m


def test_exponential_compute_gives_geometric_staleness(tmp_path):
    """Mitliagkas et al. 2016: M workers with equal exponential compute times; by memorylessness
    each arrival is any given worker's with probability 1/M, so P(tau = k) = (1 - p) p^k with
    p = (M - 1) / M, mean M - 1."""
    m, steps = 8, 6000
    r, _ = run(tmp_path, "e", sim(m, compute="{kind: exponential, mean_ms: 10}"), f"train.max_steps={steps}",
               "train.batch_size=8")
    h = hist(r)
    p = (m - 1) / m
    assert abs(r["staleness"]["mean"] - (m - 1)) < 0.35  # std of the mean here ~ 0.1 (sd 7.5 / sqrt(6000))
    ks = np.arange(max(h) + 1)
    empirical = np.array([h.get(int(k), 0) for k in ks]) / steps
    geometric = (1 - p) * p**ks
    tv = 0.5 * (np.abs(empirical - geometric).sum() + max(0.0, 1 - geometric.sum()))
    assert tv < 0.05, tv
    assert abs(empirical[0] - 1 / m) < 0.02


def test_ssp_holds_its_bound_in_clocks(tmp_path):
    straggler = "{worker: 0, factor: 8}"
    over = ("train.max_steps=300",)
    free, _ = run(tmp_path, "async", sim(4, "async", "{kind: constant, mean_ms: 5}", straggler=straggler), *over)
    for s in (0, 2):
        r, _ = run(tmp_path, f"ssp{s}", sim(4, "ssp", "{kind: constant, mean_ms: 5}", straggler=straggler,
                                            staleness_bound=s), *over)
        gap = r["staleness"]["simulation"]["max_clock_gap"]
        assert gap == s + 1  # a worker starts clock c + s + 1 only once the slowest finished c
        assert r["staleness"]["max"] <= (4 - 1) * (2 * s + 1)
    workers = free["staleness"]["simulation"]["per_worker"]
    assert workers["0"]["count"] * 4 < workers["1"]["count"]  # unbounded, the straggler falls behind


def test_sync_rounds_have_staleness_0_and_backups_are_dropped(tmp_path):
    r, _ = run(tmp_path, "s", sim(5, "sync", "{kind: exponential, mean_ms: 10}", backup_workers=2),
               "train.max_steps=100")
    st = r["staleness"]
    assert hist(r) == {0: 300}  # 100 rounds x (5 - 2) gradients
    assert st["simulation"]["late_dropped"] > 0
    assert st["simulation"]["gradients_computed"] == 300 + st["simulation"]["late_dropped"] + 5


def test_sync_round_is_the_average_of_the_workers_gradients(tmp_path):
    """W workers per clock at s = 0, averaged, is a sync round of as many workers, bit for bit."""
    rs, ps = run(tmp_path, "sync", sim(2, "sync", "{kind: constant, mean_ms: 1}"), "train.max_steps=80")
    rc, pc = run(tmp_path, "clocked", "staleness.controlled=true", "staleness.workers=2", "staleness.combine=mean",
                 "train.max_steps=80")
    assert same_params(ps, pc) and rs["final"] == rc["final"]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_softsync_applies_every_c_gradients(tmp_path, n):
    m, steps = 8, 60
    r, _ = run(tmp_path, f"n{n}", sim(m, "softsync", "{kind: exponential, mean_ms: 10}", n=n),
               f"train.max_steps={steps}")
    c = m // n
    st = r["staleness"]
    assert st["count"] == c * steps and st["simulation"]["softsync_c"] == c
    assert st["simulation"]["gradients_computed"] == c * steps + m  # each worker holds one unapplied


def test_softsync_staleness_is_about_workers_over_c(tmp_path):
    """Zhang et al. 2016: under n-softsync the mean staleness is about n (here (M - 1) / c)."""
    m = 16
    for n in (2, 4):
        r, _ = run(tmp_path, f"n{n}", sim(m, "softsync", "{kind: exponential, mean_ms: 10}", n=n),
                   "train.max_steps=600", "train.batch_size=16")
        assert abs(r["staleness"]["mean"] - (m - 1) / (m // n)) < 0.25 * n


def test_softsync_with_n_equal_workers_is_async_bit_for_bit(tmp_path):
    compute = "{kind: exponential, mean_ms: 10}"
    ra, pa = run(tmp_path, "a", sim(4, "async", compute), "train.max_steps=200")
    rs, ps = run(tmp_path, "s", sim(4, "softsync", compute, n=4), "train.max_steps=200")
    assert same_params(pa, ps) and hist(ra) == hist(rs)


def test_lr_scale_is_alpha_over_tau():
    """Zhang et al. eq. (3): a gradient of staleness tau is applied at alpha / tau (alpha at 0);
    in an n-softsync group, each gradient with its own rate, averaged."""
    from asyncps.cli.simulate import _Updater
    from asyncps.ps.optim import make_optimizer, make_schedule

    cfg = load_config(CONFIGS / "linear_regression.yaml", ["optimizer.staleness_policy.name=lr_scale",
                                                           "optimizer.learning_rate=0.5"])
    opt, sched = make_optimizer(cfg.optimizer), make_schedule(cfg.optimizer)
    w0 = np.array([1.0, 2.0], dtype=np.float32)
    params = {"w": w0.copy()}
    up = _Updater(cfg, opt, sched, params, {"w": opt.init_slots(params["w"])}, ["w"])
    g = np.array([0.3, -0.6], dtype=np.float32)
    for tau, expected_rate in [(0, 0.5), (1, 0.5), (4, 0.125)]:
        before = params["w"].copy()
        assert up.apply_one(params, {"w": g}, params, tau, 0)
        np.testing.assert_allclose(params["w"], before - expected_rate * g, rtol=1e-6)
    before = params["w"].copy()
    g2 = np.array([1.0, 1.0], dtype=np.float32)
    up.apply_many(params, [({"w": g}, 2, None), ({"w": g2}, 5, None)], 0, mean=True)
    np.testing.assert_allclose(params["w"], before - 0.5 * (g / 2 + g2 / 5) / 2, rtol=1e-6)


def test_lr_scale_in_the_simulation_changes_the_run(tmp_path):
    s = sim(4, "softsync", "{kind: exponential, mean_ms: 10}", n=2)
    fixed, pf = run(tmp_path, "f", s, "train.max_steps=100")
    scaled, ps = run(tmp_path, "s", s, "train.max_steps=100", "optimizer.staleness_policy.name=lr_scale")
    assert hist(fixed) == hist(scaled) and not same_params(pf, ps)  # same events, other updates


def test_straggler_is_staler_and_pushes_less(tmp_path):
    r, _ = run(tmp_path, "s", sim(4, "async", "{kind: constant, mean_ms: 5}", straggler="{worker: 2, factor: 5}"),
               "train.max_steps=300")
    per = r["staleness"]["simulation"]["per_worker"]
    assert per["2"]["mean"] > 3 * per["0"]["mean"] and per["2"]["count"] * 3 < per["0"]["count"]


def test_trace_compute_times_replay(tmp_path):
    trace = tmp_path / "trace.txt"
    trace.write_text("0.005\n0.005\n0.005\n")
    a, pa = run(tmp_path, "t", sim(3, compute=f"{{kind: trace, trace: {trace}}}"), "train.max_steps=60")
    b, pb = run(tmp_path, "c", sim(3, compute="{kind: constant, mean_ms: 5}"), "train.max_steps=60")
    assert hist(a) == hist(b) and same_params(pa, pb)


def test_w_workers_per_clock_constant_staleness(tmp_path):
    w, s, steps = 4, 3, 50
    r, _ = run(tmp_path, "w", "staleness.controlled=true", f"staleness.workers={w}", f"staleness.s={s}",
               f"train.max_steps={steps}")
    st = r["staleness"]
    assert hist(r) == {0: w, 1: w, 2: w, s: w * (steps - s)}  # clamped before clock s
    assert st["workers_per_clock"] == w and st["combine"] == "sum" and st["clamped"] == w * s


def test_w_workers_sum_is_w_times_the_mean_step_for_sgd(tmp_path):
    """One clock from version 0 with s = 0: sum = W x mean (SGD is linear in the gradient)."""
    over = ("staleness.controlled=true", "staleness.workers=3", "train.max_steps=1")
    _, ps = run(tmp_path, "sum", *over, "staleness.combine=sum")
    _, pm = run(tmp_path, "mean", *over, "staleness.combine=mean")
    # initial weights are zeros (init_scale 0): the step itself
    for k in ps:
        np.testing.assert_allclose(ps[k], 3 * pm[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, fragment", [
    (["staleness.controlled=true", "staleness.simulate={workers: 2}"], "set one, not both"),
    (["staleness.simulate={workers: 2, mode: sync, backup_workers: 2}"], "backup_workers must be less than workers"),
    (["staleness.simulate={workers: 2, mode: softsync, n: 3}"], "n must be at most workers"),
    (["staleness.simulate={workers: 2, straggler: {worker: 2, factor: 2}}"], "straggler.worker must be less"),
    (["staleness.simulate={workers: 2, compute: {kind: constant, straggler: {worker: 0}}}"], "compute.straggler"),
    (["staleness.workers=2"], "needs staleness.controlled"),
    (["staleness.simulate={workers: 0}"], "workers must be in"),
    (["staleness.simulate={mode: hogwild}"], "mode must be one of"),
])
def test_config_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(CONFIGS / "linear_regression.yaml", overrides)


def test_sweep_takes_the_new_keys_as_axes():
    from asyncps.config import load_config as load
    from asyncps.sweep import default_runner, parse_grid

    grid = parse_grid(["staleness.simulate.workers=2,4", "staleness.simulate.mode=async,softsync",
                       "staleness.simulate.compute.kind=exponential", "staleness.simulate.compute.mean_ms=5"])
    assert [k for k, _ in grid.axes] == ["staleness.simulate.workers", "staleness.simulate.mode"]
    for setting in grid.settings():
        cfg = load(CONFIGS / "linear_regression.yaml", grid.fixed + setting.overrides())
        assert cfg.staleness.simulate.compute.kind == "exponential"
        assert default_runner(cfg) == "train"
    cfg = load(CONFIGS / "linear_regression.yaml", ["staleness.controlled=true", "staleness.workers=4"])
    assert default_runner(cfg) == "train"


@pytest.mark.parametrize("mode", ["async", "softsync"])
def test_dropped_gradients_are_counted_not_recorded(tmp_path, mode):
    r, _ = run(tmp_path, mode, sim(4, mode, "{kind: exponential, mean_ms: 10}", n=2), "train.max_steps=100",
               "optimizer.staleness_policy={name: drop, max_staleness: 1}")
    st = r["staleness"]
    assert max(hist(r)) <= 1 and st["dropped"] > 0
    # every gradient computed is applied, dropped, or still held: one per worker, plus (softsync)
    # up to c - 1 = 1 waiting for its group
    held = st["simulation"]["gradients_computed"] - st["count"] - st["dropped"]
    assert held == 4 if mode == "async" else 4 <= held <= 5
