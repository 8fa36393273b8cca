"""The autodiff engine against the same math written by hand in numpy (and PyTorch, if present).

One training step = forward, backward and an in-place SGD update, for the MLP 784-256-256-10
(batch 128) and the MNIST CNN (batch 64). All variants run in one process on one BLAS thread,
their repetitions interleaved (in a shuffled order each round, so that no variant always runs
right after the same other one) so that background load hits them alike; the table gives medians
and ratios to hand-written numpy, of wall time and of the thread's CPU time. On a shared machine
the wall time mostly measures the scheduler (other processes' turns); the CPU time of the
thread (user + system, page faults included) does not, so its ratios are the ones to compare.

    python bench/autodiff.py [--reps N] [--models mlp,cnn]    (default reps: mlp 300, cnn 30)
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: BLAS reads these once

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

from asyncps.config import ModelConfig  # noqa: E402
from asyncps.worker.models import build_model  # noqa: E402
from asyncps.worker.step import GradientComputer  # noqa: E402

LR = np.float32(0.01)
DEFAULT_REPS = {"mlp": 300, "cnn": 30}
SETUPS = {  # model config, batch size, data meta
    "mlp": (ModelConfig(name="mlp", hidden=[256, 256]), 128),
    "cnn": (ModelConfig(name="cnn", dropout=0.5), 64),
}


def sgd(params: dict, grads: dict) -> None:
    """The same in-place update for every variant."""
    for k, g in grads.items():
        g *= LR
        params[k] -= g


# ---------------------------------------------------------------- hand-written numpy


def hand_mlp_step(p, x, y, rng):
    """784-256-256-10 ReLU MLP, softmax cross-entropy, written out by hand."""
    n = len(y)
    h1 = x @ p["dense1.kernel"]
    h1 += p["dense1.bias"]
    a1 = np.maximum(h1, 0)
    h2 = a1 @ p["dense2.kernel"]
    h2 += p["dense2.bias"]
    a2 = np.maximum(h2, 0)
    z = a2 @ p["dense3.kernel"]
    z += p["dense3.bias"]
    d = softmax_ce_grad(z, y, n)
    grads = {"dense3.kernel": a2.T @ d, "dense3.bias": d.sum(0)}
    d = (d @ p["dense3.kernel"].T) * (a2 > 0)
    grads.update({"dense2.kernel": a1.T @ d, "dense2.bias": d.sum(0)})
    d = (d @ p["dense2.kernel"].T) * (a1 > 0)
    grads.update({"dense1.kernel": x.T @ d, "dense1.bias": d.sum(0)})
    sgd(p, grads)


def softmax_ce_grad(z, y, n):
    """d(mean cross-entropy)/d(logits), computing the loss as a real step would."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    _ = np.mean(np.log(s[:, 0]) - z[np.arange(n), y])
    e /= s
    e[np.arange(n), y] -= 1
    e *= np.float32(1.0 / n)
    return e


def im2col(x, k):
    """SAME-padded k x k patches of an NHWC batch as rows (n*h*w, k*k*c), stride 1."""
    n, h, w, c = x.shape
    xp = np.zeros((n, h + k - 1, w + k - 1, c), x.dtype)
    xp[:, k // 2:k // 2 + h, k // 2:k // 2 + w] = x
    return sliding_window_view(xp, (k, k), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, -1)


def col2im(dcols, shape, k):
    """Adjoint of `im2col`: scatter-add patch gradients back onto the image."""
    n, h, w, c = shape
    dcols = dcols.reshape(n, h, w, k, k, c)
    dxp = np.zeros((n, h + k - 1, w + k - 1, c), dcols.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, i:i + h, j:j + w] += dcols[:, :, :, i, j]
    return dxp[:, k // 2:k // 2 + h, k // 2:k // 2 + w]


def pool(a):
    """2x2 max-pool, stride 2, and the mask of the maxima."""
    n, h, w, c = a.shape
    m = a.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    mask = a == np.repeat(np.repeat(m, 2, axis=1), 2, axis=2)
    return m, mask


def unpool(d, mask):
    return np.repeat(np.repeat(d, 2, axis=1), 2, axis=2) * mask


def conv_forward(p, name, x):
    cols = im2col(x, 5)
    w = p[f"{name}.kernel"]
    h = cols @ w.reshape(-1, w.shape[3])
    h += p[f"{name}.bias"]
    return cols, np.maximum(h, 0).reshape(*x.shape[:3], w.shape[3])


def hand_cnn_step(p, x, y, rng):
    """The MNIST CNN by hand: im2col convolutions, 2x2 pools, dense 1024, dropout, dense 10."""
    n = len(y)
    cols1, a1 = conv_forward(p, "conv1", x.reshape(n, 28, 28, 1))
    p1, m1 = pool(a1)
    cols2, a2 = conv_forward(p, "conv2", p1)
    p2, m2 = pool(a2)
    f = p2.reshape(n, -1)
    h = f @ p["dense1.kernel"]
    h += p["dense1.bias"]
    a3 = np.maximum(h, 0)
    keep = (rng.random(a3.shape, dtype=np.float32) >= 0.5) * np.float32(2.0)
    d = softmax_ce_grad((a3 * keep) @ p["dense2.kernel"] + p["dense2.bias"], y, n)
    grads = {"dense2.kernel": (a3 * keep).T @ d, "dense2.bias": d.sum(0)}
    d = (d @ p["dense2.kernel"].T) * keep * (a3 > 0)
    grads.update({"dense1.kernel": f.T @ d, "dense1.bias": d.sum(0)})
    d = unpool((d @ p["dense1.kernel"].T).reshape(p2.shape), m2) * (a2 > 0)
    grads.update(conv_grads("conv2", cols2, d, p))
    d = col2im(d.reshape(-1, 64) @ p["conv2.kernel"].reshape(-1, 64).T, p1.shape, 5)
    d = unpool(d, m1) * (a1 > 0)
    grads.update(conv_grads("conv1", cols1, d, p))
    sgd(p, grads)


def conv_grads(name, cols, d, p):
    o = d.shape[3]
    d = d.reshape(-1, o)
    return {f"{name}.kernel": (cols.T @ d).reshape(p[f"{name}.kernel"].shape), f"{name}.bias": d.sum(0)}


# ---------------------------------------------------------------- the engine and PyTorch


def engine_step(model, params, graph_mode):
    compute = GradientComputer(model, list(params), graph_mode=graph_mode)

    def step(p, x, y, rng):
        _, grads = compute(p, x, y, rng)
        sgd(p, grads)

    return step


def torch_step(model_name, params, dropout):
    """The same step in PyTorch on the CPU, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    fwd = _torch_mlp if model_name == "mlp" else _torch_cnn

    def step(_, x, y, rng):
        loss = torch.nn.functional.cross_entropy(fwd(torch, tp, torch.from_numpy(x), dropout), torch.from_numpy(y))
        loss.backward()
        with torch.no_grad():
            for v in tp.values():
                v -= float(LR) * v.grad
                v.grad = None

    return step


def _torch_mlp(torch, p, x, _):
    for i in (1, 2):
        x = torch.relu(x @ p[f"dense{i}.kernel"] + p[f"dense{i}.bias"])
    return x @ p["dense3.kernel"] + p["dense3.bias"]


def _torch_cnn(torch, p, x, dropout):
    f = torch.nn.functional
    h = x.reshape(-1, 28, 28, 1).permute(0, 3, 1, 2)
    for name in ("conv1", "conv2"):
        w = p[f"{name}.kernel"].permute(3, 2, 0, 1)
        h = f.max_pool2d(torch.relu(f.conv2d(h, w, p[f"{name}.bias"], padding=2)), 2)
    h = torch.relu(h.permute(0, 2, 3, 1).reshape(len(x), -1) @ p["dense1.kernel"] + p["dense1.bias"])
    return f.dropout(h, dropout) @ p["dense2.kernel"] + p["dense2.bias"]


# ---------------------------------------------------------------- timing


def variants(name):
    """(label, step function, its own parameter copy) for each implementation."""
    cfg, _ = SETUPS[name]
    model = build_model(cfg, {"input_shape": (784,), "num_classes": 10})
    params = model.init_params(np.random.default_rng(0))
    hand = hand_mlp_step if name == "mlp" else hand_cnn_step
    out = [("numpy (hand)", hand, dict(params)),
           ("eager", engine_step(model, params, False), dict(params)),
           ("graph", engine_step(model, params, True), dict(params))]
    torch_fn = torch_step(name, params, cfg.dropout)
    if torch_fn is not None:
        out.append(("torch (cpu)", torch_fn, {}))
    return [(label, fn, {k: v.copy() for k, v in p.items()}) for label, fn, p in out]


def measure(name, reps):
    """Median (wall, CPU) seconds per step of each variant, repetitions interleaved."""
    _, batch = SETUPS[name]
    rng = np.random.default_rng(1)
    x, y = rng.random((batch, 784), dtype=np.float32), rng.integers(0, 10, batch)
    runs = variants(name)
    wall: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    order = np.random.default_rng(2)
    for rep in range(reps + 2):  # two warm-up rounds (graph mode traces in the first)
        for i in order.permutation(len(runs)):
            label, fn, params = runs[i]
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn(params, x, y, np.random.default_rng(rep))
            if rep >= 2:
                cpu[label].append(time.thread_time() - start_cpu)
                wall[label].append(time.perf_counter() - start)
    md = statistics.median
    return {label: (md(wall[label]), md(cpu[label])) for label in wall}


def report(name, medians):
    base_wall, base_cpu = medians["numpy (hand)"]
    print(f"\n{name}: median ms per training step (ratio to hand-written numpy)")
    print(f"  {'':<14} {'wall':>9}          {'CPU':>9}")
    for label, (wall, cpu) in medians.items():
        print(f"  {label:<14} {wall * 1e3:9.3f} {wall / base_wall:5.2f}x   {cpu * 1e3:9.3f} {cpu / base_cpu:5.2f}x")
    (eager_wall, eager_cpu), (graph_wall, graph_cpu) = medians["eager"], medians["graph"]
    print(f"  graph/eager: wall {graph_wall / eager_wall:.3f}, CPU {graph_cpu / eager_cpu:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per variant (default: mlp 300, cnn 30; telling a few %% apart "
                             "on a loaded machine takes hundreds of MLP steps)")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    args = parser.parse_args()
    for name in args.models.split(","):
        report(name, measure(name, args.reps or DEFAULT_REPS[name]))


if __name__ == "__main__":
    main()
