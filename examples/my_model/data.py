"""Interleaved spirals: a small classification problem a linear model cannot solve."""
from __future__ import annotations

import numpy as np

from asyncps.data import Dataset


def spirals(n_train: int = 3000, n_test: int = 1000, classes: int = 3, noise: float = 0.2,
            seed: int = 0) -> Dataset:
    """`classes` arms of a spiral in the plane, `n_train` / `n_test` points in all.

    Keyword arguments come from the config's ``data:`` section; `seed` is the run's seed
    unless the section sets it. Every process of a run calls this and must get the same
    arrays, so all randomness comes from `seed`.
    """
    rng = np.random.default_rng(seed)
    x_train, y_train = _draw(rng, n_train, classes, noise)
    x_test, y_test = _draw(rng, n_test, classes, noise)
    return Dataset.from_arrays(x_train, y_train, x_test, y_test, name="spirals")


def _draw(rng, n: int, classes: int, noise: float):
    y = rng.integers(0, classes, size=n)
    t = rng.uniform(0.05, 1.0, size=n)  # distance along the arm
    angle = 2 * np.pi * y / classes + 3.0 * t + noise * rng.standard_normal(n)
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) * 2.0
    return x.astype(np.float32), y


def save_npz(path: str, **kwargs) -> None:
    """The same data as an .npz file, for ``data: {name: npz, path: ...}``."""
    d = spirals(**kwargs)
    np.savez(path, x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)


if __name__ == "__main__":  # python examples/my_model/data.py spirals.npz
    import sys

    save_npz(sys.argv[1] if len(sys.argv) > 1 else "spirals.npz")
    print(f"wrote {sys.argv[1] if len(sys.argv) > 1 else 'spirals.npz'}")
