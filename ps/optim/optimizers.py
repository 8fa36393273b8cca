"""Server-side optimizers: the update rules of TensorFlow's optimizers of the same names.

Every optimizer is a small object over numpy arrays, with no knowledge of the transport, so the
parameter-server shard and the single-process trainer run the same code. Slots (momentum
accumulators, Adam moments, ...) are float32 arrays shaped like the variable; the caller owns
them, one dict per variable, and checkpoints them with the value.

One base class does the plumbing shared by all of them:

- **Weight decay** (L2, coupled, as ``tf.keras.regularizers.L2`` folded into the gradient): the
  gradient that reaches the update rule is ``g + weight_decay * w``, i.e. the gradient of
  ``loss + weight_decay / 2 * ||w||^2``. With ``weight_decay = 0`` the gradient is used as is.
- **Sparse updates** (``apply_sparse``) have *lazy* semantics: only the given rows of the value
  and of every slot are read and written; the other rows do not move and their slots do not
  decay. This is TensorFlow's ``ResourceSparseApply*`` kernels (``SparseApplyMomentum``,
  ``SparseApplyAdagrad``, ...) and TF-Addons' ``LazyAdam``. (TF1 ``AdamOptimizer._apply_sparse``
  is not lazy: it decays the moments of every row.) For rows that a step touches, the result is
  exactly that of ``apply_dense`` on those rows; weight decay too applies to touched rows only.
- The caller's gradient is never written to (it may be a read-only ``np.frombuffer`` view).

Each rule writes into the value and the slots in place, through at most one scratch buffer
per call (``np.multiply(..., out=)`` and friends), because this is the shard's hot path; the
scratch is kept per thread and reused, so a step allocates nothing.
"""
from __future__ import annotations

import math
import threading
from typing import ClassVar

import numpy as np

from asyncps.config import OptimizerConfig

Slots = dict[str, np.ndarray]


class Optimizer:
    """An update rule ``(w, g, slots, lr, step) -> w', slots'``, applied in place.

    Subclasses set ``slot_names`` and implement ``_update`` on one block of rows (the whole
    variable, or the gathered rows of a sparse update); this class supplies weight decay, slot
    creation, and the gather/scatter of sparse updates.
    """

    name: ClassVar[str]
    slot_names: tuple[str, ...] = ()

    def __init__(self, cfg: OptimizerConfig):
        self.weight_decay = float(cfg.weight_decay)
        self._local = threading.local()  # per-thread scratch, reused across calls

    def _scratch(self, like: np.ndarray) -> np.ndarray:
        """A free buffer shaped like `like`: one per thread, grown as needed, never freed, so the
        hot path allocates (and page-faults) nothing."""
        local = self.__dict__.get("_local")
        if local is None:  # a subclass that did not call Optimizer.__init__
            local = self._local = threading.local()
        buf = getattr(local, "buf", None)
        if buf is None or buf.dtype != like.dtype or buf.size < like.size:
            buf = local.buf = np.empty(like.size, like.dtype)
        return buf[: like.size].reshape(like.shape)

    def init_slots(self, value: np.ndarray) -> Slots:
        """Fresh float32 slots shaped like ``value``, each filled with its initial value."""
        return {name: np.full(value.shape, self._slot_initial(name), dtype=np.float32)
                for name in self.slot_names}

    def apply_dense(self, value: np.ndarray, grad: np.ndarray, slots: Slots, lr: float, step: int) -> None:
        """One update of the whole variable, in place on ``value`` and ``slots``.

        ``step`` is the number of updates already applied to this variable (0 for the first).
        """
        g = self._decayed(grad, value)
        self._update(value, g, slots, float(lr), int(step), self._scratch(value))

    def apply_sparse(self, value: np.ndarray, rows: np.ndarray, grad_rows: np.ndarray, slots: Slots,
                     lr: float, step: int) -> None:
        """One lazy update of rows ``rows`` (unique int64 indices into axis 0) of the variable.

        ``grad_rows[i]`` is the gradient of row ``rows[i]``. Only those rows of ``value`` and of
        the slots change. Duplicate indices are not allowed (the last write would win).
        """
        w = value[rows]
        block = {name: slot[rows] for name, slot in slots.items()}
        self._update(w, self._decayed(grad_rows, w), block, float(lr), int(step), self._scratch(w))
        value[rows] = w
        for name, rows_of_slot in block.items():
            slots[name][rows] = rows_of_slot

    def _decayed(self, grad: np.ndarray, w: np.ndarray) -> np.ndarray:
        """``grad + weight_decay * w`` as a new array, or ``grad`` itself when there is no decay."""
        if not self.weight_decay:
            return grad
        g = np.multiply(w, self.weight_decay, dtype=np.float32)
        g += grad
        return g

    def _slot_initial(self, name: str) -> float:
        return 0.0

    def _update(self, w: np.ndarray, g: np.ndarray, slots: Slots, lr: float, step: int,
                tmp: np.ndarray) -> None:
        """Update ``w`` and ``slots`` in place; ``g`` is read-only, ``tmp`` is free scratch."""
        raise NotImplementedError


class SGD(Optimizer):
    """Plain gradient descent: ``w -= lr * g``.

    TF1 ``tf.compat.v1.train.GradientDescentOptimizer`` (kernel ``ApplyGradientDescent``);
    ``tf.keras.optimizers.SGD`` with ``momentum=0``.
    """

    name = "sgd"

    def _update(self, w, g, slots, lr, step, tmp):
        np.multiply(g, lr, out=tmp)
        w -= tmp


class Momentum(Optimizer):
    """Heavy-ball momentum, TF1 ``tf.compat.v1.train.MomentumOptimizer`` (kernel ``ApplyMomentum``)::

        v = momentum * v + g
        w -= lr * v

    Slot ``momentum`` (``v``) starts at 0. Note the learning rate multiplies the accumulator at
    apply time (not at accumulation, as in Keras ``SGD(momentum=...)``); the two agree for a
    constant learning rate.
    """

    name = "momentum"
    slot_names = ("momentum",)

    def __init__(self, cfg: OptimizerConfig):
        super().__init__(cfg)
        self.momentum = float(cfg.momentum)

    def _update(self, w, g, slots, lr, step, tmp):
        v = slots["momentum"]
        v *= self.momentum
        v += g
        self._descend(w, g, v, lr, tmp)

    def _descend(self, w, g, v, lr, tmp):
        np.multiply(v, lr, out=tmp)
        w -= tmp


class Nesterov(Momentum):
    """Nesterov momentum, TF1 ``MomentumOptimizer(use_nesterov=True)`` (``ApplyMomentum``)::

        v = momentum * v + g
        w -= lr * (g + momentum * v)

    The reformulation of Sutskever et al., "On the importance of initialization and momentum in
    deep learning", ICML 2013, as TensorFlow implements it. Slot ``momentum`` starts at 0.
    """

    name = "nesterov"

    def _descend(self, w, g, v, lr, tmp):
        np.multiply(v, self.momentum, out=tmp)
        tmp += g
        tmp *= lr
        w -= tmp


class Adam(Optimizer):
    """Adam, TF1 ``tf.compat.v1.train.AdamOptimizer`` (kernel ``ApplyAdam``, "epsilon hat" form)::

        t    = step + 1
        m    = m + (1 - beta1) * (g - m)          # = beta1 * m + (1 - beta1) * g
        v    = v + (1 - beta2) * (g * g - v)      # = beta2 * v + (1 - beta2) * g^2
        lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        w   -= lr_t * m / (sqrt(v) + epsilon)

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, Algorithm 1 with the
    bias correction folded into the step size (end of their section 2). ``tf.keras.optimizers.Adam``
    computes the same. Slots ``m`` and ``v`` start at 0; ``t`` counts this variable's updates.
    Sparse updates are lazy (TF-Addons ``LazyAdam``): untouched rows keep their moments, and
    touched rows use the variable's ``t``.
    """

    name = "adam"
    slot_names: tuple[str, ...] = ("m", "v")  # LazyAdam adds "t"

    def __init__(self, cfg: OptimizerConfig):
        super().__init__(cfg)
        self.beta1, self.beta2, self.epsilon = float(cfg.beta1), float(cfg.beta2), float(cfg.epsilon)

    def _moments(self, g, m, v, tmp) -> None:
        """m and v move toward g and g^2 (in place)."""
        np.subtract(g, m, out=tmp)
        tmp *= 1.0 - self.beta1
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp -= v
        tmp *= 1.0 - self.beta2
        v += tmp

    def _update(self, w, g, slots, lr, step, tmp):
        m, v = slots["m"], slots["v"]
        self._moments(g, m, v, tmp)
        t = step + 1
        lr_t = lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        np.sqrt(v, out=tmp)
        tmp += self.epsilon
        np.divide(m, tmp, out=tmp)
        tmp *= lr_t
        w -= tmp


class RMSProp(Optimizer):
    """RMSProp, TensorFlow's kernel ``ApplyRMSProp`` (TF1 ``RMSPropOptimizer``, Keras ``RMSprop``)::

        ms   = rho * ms + (1 - rho) * g^2          # computed as ms += (1 - rho) * (g^2 - ms)
        mom  = rmsprop_momentum * mom + lr * g / sqrt(ms + epsilon)
        w   -= mom

    Tieleman & Hinton, Coursera "Neural Networks for Machine Learning", lecture 6.5 (2012).

    Choices: the momentum is ``OptimizerConfig.rmsprop_momentum`` (default 0.0, Keras's default),
    not ``OptimizerConfig.momentum``, whose 0.9 default belongs to momentum/nesterov. With
    momentum 0 there is no ``mom`` slot and the step is ``w -= lr * g / sqrt(ms + epsilon)``
    (same result, one array less). ``ms`` starts at 0 as in Keras (TF1 started it at 1).
    """

    name = "rmsprop"

    def __init__(self, cfg: OptimizerConfig):
        super().__init__(cfg)
        self.rho, self.epsilon = float(cfg.rho), float(cfg.epsilon)
        self.momentum = float(cfg.rmsprop_momentum)
        self.slot_names = ("ms", "mom") if self.momentum else ("ms",)

    def _update(self, w, g, slots, lr, step, tmp):
        ms = slots["ms"]
        np.multiply(g, g, out=tmp)
        tmp -= ms
        tmp *= 1.0 - self.rho
        ms += tmp
        np.add(ms, self.epsilon, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.divide(g, tmp, out=tmp)
        tmp *= lr
        if self.momentum:
            mom = slots["mom"]
            mom *= self.momentum
            mom += tmp
            tmp = mom
        w -= tmp


class Adagrad(Optimizer):
    """Adagrad, as ``tf.keras.optimizers.Adagrad``::

        acc += g^2
        w   -= lr * g / (sqrt(acc) + epsilon)

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization", JMLR 12 (2011). Slot ``accumulator`` starts at
    ``OptimizerConfig.initial_accumulator`` (0.1 by default, TensorFlow's default).

    Epsilon: TF1 ``AdagradOptimizer`` divides by ``sqrt(acc)`` alone and relies on a positive
    initial accumulator; Keras adds ``epsilon`` (1e-7) outside the square root, which keeps
    ``initial_accumulator = 0`` finite for a zero gradient. We follow Keras; with the default
    accumulator the two differ by less than ``epsilon / sqrt(0.1)``, about 3e-7 relative.
    """

    name = "adagrad"
    slot_names = ("accumulator",)

    def __init__(self, cfg: OptimizerConfig):
        super().__init__(cfg)
        self.initial_accumulator, self.epsilon = float(cfg.initial_accumulator), float(cfg.epsilon)

    def _slot_initial(self, name: str) -> float:
        return self.initial_accumulator

    def _update(self, w, g, slots, lr, step, tmp):
        acc = slots["accumulator"]
        np.multiply(g, g, out=tmp)
        acc += tmp
        np.sqrt(acc, out=tmp)
        tmp += self.epsilon
        np.divide(g, tmp, out=tmp)
        tmp *= lr
        w -= tmp


class LazyAdam(Adam):
    """Adam whose bias correction counts each ROW's own updates (slot ``t``, one per row)::

        t_r  = t_r + 1                      (rows in the update only)
        m, v as in Adam, on those rows
        w_r -= lr * sqrt(1 - beta2^t_r) / (1 - beta1^t_r) * m_r / (sqrt(v_r) + epsilon)

    The embedding-table form of Adam (TF-Addons ``LazyAdam`` keeps one global step; per-row
    counts are what embedding servers such as Monolith and PERSIA keep, so a row touched for the
    first time gets Adam's first-step correction, whatever the table's age). On a dense update
    every row moves, and the result equals ``adam`` (every t_r is the variable's step + 1).
    ``t`` is shaped like the variable (every entry of a row holds the row's count), so it is cut
    by rows, checkpointed and re-sharded like every other slot; float32 counts are exact to 2**24.
    """

    name = "lazy_adam"
    slot_names = ("m", "v", "t")

    def _update(self, w, g, slots, lr, step, tmp):
        m, v, t = slots["m"], slots["v"], slots["t"]
        self._moments(g, m, v, tmp)
        t += 1.0
        t64 = t.astype(np.float64)
        lr_t = (lr * np.sqrt(1.0 - self.beta2 ** t64) / (1.0 - self.beta1 ** t64)).astype(np.float32)
        np.sqrt(v, out=tmp)
        tmp += self.epsilon
        np.divide(m, tmp, out=tmp)
        tmp *= lr_t
        w -= tmp


class FTRL(Optimizer):
    """FTRL-Proximal, per coordinate (McMahan et al., "Ad Click Prediction: a View from the
    Trenches", KDD 2013, Algorithm 1), with alpha = the learning rate::

        sigma = (sqrt(n + g^2) - sqrt(n)) / alpha
        z    += g - sigma * w
        n    += g^2
        w     = 0                                                   if |z| <= lambda1
              = -(z - sign(z) * lambda1) / ((beta + sqrt(n)) / alpha + lambda2)   otherwise

    Config: ``ftrl_l1`` (lambda1), ``ftrl_l2`` (lambda2), ``ftrl_beta`` (beta), slot ``n`` starts
    at ``initial_accumulator`` (TensorFlow's Ftrl default 0.1; the paper's 0 is allowed), ``z`` at
    0. TensorFlow's ``Ftrl`` (lr_power -0.5) is this with ``l2_tf = lambda2 / 2`` and beta 0.
    The weights are a function of (z, n): a row never updated keeps its initial value, and the
    first update of a row replaces it (a zero gradient included, which is why only sparse,
    row-wise updates leave untouched rows as they are).
    """

    name = "ftrl"
    slot_names = ("z", "n")

    def __init__(self, cfg: OptimizerConfig):
        super().__init__(cfg)
        self.l1, self.l2, self.beta = float(cfg.ftrl_l1), float(cfg.ftrl_l2), float(cfg.ftrl_beta)
        self.initial_accumulator = float(cfg.initial_accumulator)

    def _slot_initial(self, name: str) -> float:
        return self.initial_accumulator if name == "n" else 0.0

    def _update(self, w, g, slots, lr, step, tmp):
        z, n = slots["z"], slots["n"]
        sqrt_n_old = np.sqrt(n)
        n += g * g
        np.sqrt(n, out=tmp)  # sqrt(n_new)
        sigma = (tmp - sqrt_n_old) / np.float32(lr)
        z += g - sigma * w
        denominator = (np.float32(self.beta) + tmp) / np.float32(lr) + np.float32(self.l2)
        shrunk = np.sign(z) * np.float32(self.l1) - z
        np.divide(shrunk, denominator, out=tmp)
        np.copyto(w, np.where(np.abs(z) <= self.l1, np.float32(0.0), tmp))


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (SGD, Momentum, Nesterov, Adam, RMSProp, Adagrad, LazyAdam, FTRL)
}


def make_optimizer(cfg: OptimizerConfig) -> Optimizer:
    """The optimizer named by ``cfg.name``, configured from ``cfg``."""
    try:
        cls = OPTIMIZERS[cfg.name]
    except KeyError:
        raise ValueError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {cfg.name!r}") from None
    return cls(cfg)
