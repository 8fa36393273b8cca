"""Checks of incoming tensors against the shard's variables, before any state is touched.

Each function raises a ShardError naming the variable and the problem, or returns the tensor
in the form the optimizer takes (sparse rows deduplicated by summing).

`check_declared` and `check_declared_value` run on a tensor's declaration (name, dtype, shape:
the first piece of a stream) before the codec allocates anything for it, so a push cannot make
the shard hold more than its own variables' size per stream (a sparse gradient carries at most
as many rows as its variable has). `check_gradients` then checks the values.

Compressed gradients (``cluster.compression``): a float32 variable also accepts a float16 or
bfloat16 gradient. It is widened to float32 here (exactly: every 16-bit value is a float32) and
checked for NaN/Inf after widening, so a float16 value that overflowed to Inf on the way is
rejected with an error naming the variable. The worker's compressor never produces one from a
finite gradient: it saturates at float16's largest value and keeps the excess in its residual
(asyncps.compression).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from asyncps.protos.codec import dtype_name, is_reduced_float, widen
from asyncps.sparse import SparseRows
from asyncps.ps.errors import FailedPrecondition, InvalidArgument, NotFound, ShardError


class ResourceExhausted(ShardError):
    """A push the shard has no room for now (its byte budget for pushes in flight is spent)."""

    code = "RESOURCE_EXHAUSTED"


def all_finite(array: np.ndarray) -> bool:
    """True when no element is NaN or Inf (exact; fast path through one BLAS dot product)."""
    if array.dtype in (np.float32, np.float64) and array.flags.c_contiguous:
        flat = array.reshape(-1)
        if np.isfinite(np.dot(flat, flat)):  # NaN/Inf propagate into the sum of squares ...
            return True  # ... and a finite sum proves every element finite
    return bool(np.isfinite(array).all())  # exact check (also when the squares overflowed)


def check_finite(name: str, array: np.ndarray, sent_as: str = "") -> None:
    """Rejects NaN or Inf in a floating-point array (`sent_as`: the wire dtype it was widened from)."""
    if array.dtype.kind == "f" and not all_finite(array):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        how = f", sent as {sent_as}" if sent_as else ""
        raise InvalidArgument(f"variable {name!r}: {bad} non-finite value(s) (NaN or Inf{how})")


def check_initial_values(values: Mapping[str, np.ndarray], frozen) -> None:
    """Init: values must be dense, finite, and floating point unless frozen."""
    for name, value in values.items():
        if isinstance(value, SparseRows):
            raise InvalidArgument(f"variable {name!r}: initial value must be dense, got sparse rows")
        if value.dtype.kind != "f" and not frozen(name):
            raise InvalidArgument(
                f"variable {name!r}: dtype {value.dtype.name} cannot be trained (only floating point); "
                "freeze it with train.frozen"
            )
        check_finite(name, value)


def check_gradients(grads: Mapping, variables: Mapping) -> dict:
    """Validated gradients: known, trainable variables, right shape and dtype, finite values."""
    return {name: _check_one(name, grad, variables) for name, grad in grads.items()}


def check_table_grads(grads: Mapping, tables: Mapping) -> dict:
    """Validated row gradients of id-keyed tables (protos/table_rows.TableGrad): a known table,
    (n, dim) float32 values for n ids, n read versions >= 0, finite values."""
    out = {}
    for name, grad in grads.items():
        table = tables.get(name)
        if table is None:
            raise NotFound(f"table {name!r} is not held by this shard (tables: {sorted(tables)})")
        n = len(grad.ids)
        if grad.values.shape != (n, table.dim) or grad.read_versions.shape != (n,):
            raise InvalidArgument(f"table {name!r}: {n} ids need row gradients of shape ({n}, {table.dim}) and {n} "
                                  f"read versions, got {grad.values.shape} and {grad.read_versions.shape}")
        if n and int(grad.read_versions.min()) < 0:
            raise InvalidArgument(f"table {name!r}: a negative read version")
        if not all_finite(np.ascontiguousarray(grad.values)):
            bad = int(grad.values.size - np.count_nonzero(np.isfinite(grad.values)))
            raise InvalidArgument(f"table {name!r}: {bad} non-finite row gradient value(s) (NaN or Inf)")
        out[name] = grad
    return out


def _check_one(name: str, grad, variables: Mapping):
    var = variables.get(name)
    if var is None:
        raise NotFound(f"variable {name!r} is not held by this shard")
    if var.frozen:
        raise InvalidArgument(f"variable {name!r} is frozen (train.frozen): its gradient must not be pushed")
    if isinstance(grad, SparseRows):
        return _check_sparse(name, grad, var.value)
    sent_as = _sent_as(grad, var.value)
    grad = _widened(grad, var.value)
    _check_dtype(name, grad, var.value)
    if grad.shape != var.value.shape:
        raise InvalidArgument(f"variable {name!r}: gradient of shape {grad.shape}, expected {var.value.shape}")
    check_finite(name, grad, sent_as)
    return grad


def _sent_as(grad: np.ndarray, value: np.ndarray) -> str:
    return dtype_name(grad.dtype) if grad.dtype != value.dtype else ""


def _widened(grad: np.ndarray, value: np.ndarray) -> np.ndarray:
    """A float16/bfloat16 gradient of a float32 variable as float32; anything else unchanged."""
    if value.dtype == np.float32 and grad.dtype != np.float32 and is_reduced_float(grad.dtype):
        return widen(grad)
    return grad


def _check_dtype(name: str, grad: np.ndarray, value: np.ndarray) -> None:
    if grad.dtype != value.dtype:
        raise InvalidArgument(f"variable {name!r}: gradient of dtype {dtype_name(grad.dtype)}, expected {value.dtype.name}")


def _check_sparse(name: str, grad: SparseRows, value: np.ndarray) -> SparseRows:
    """Sparse rows in range, row shape right; duplicate rows summed (the optimizer wants unique)."""
    rows, values = grad.rows, grad.values
    if value.ndim == 0:
        raise InvalidArgument(f"variable {name!r} is a scalar: it takes no sparse rows")
    sent_as = _sent_as(values, value)
    values = _widened(values, value)
    grad = SparseRows(rows, values)
    _check_dtype(name, values, value)
    if values.shape[1:] != value.shape[1:]:
        raise InvalidArgument(f"variable {name!r}: sparse rows of shape {values.shape[1:]}, expected {value.shape[1:]}")
    if rows.size and (rows.min() < 0 or rows.max() >= value.shape[0]):
        raise InvalidArgument(f"variable {name!r}: row index out of range [0, {value.shape[0]})")
    check_finite(name, values, sent_as)
    unique, inverse = np.unique(rows, return_inverse=True)
    if len(unique) == len(rows):
        return grad
    summed = np.zeros((len(unique), *values.shape[1:]), dtype=values.dtype)
    np.add.at(summed, inverse, values)
    return SparseRows(unique, summed)


def check_declared(name: str, slot: str, dtype: np.dtype, shape: tuple, sparse: bool, variables: Mapping) -> None:
    """A pushed gradient's declaration, before its data is stored: a known trainable variable,
    its dtype (or float16/bfloat16 for float32), its shape; sparse: its row shape, and no more
    rows than the variable has. Raises the same errors `check_gradients` would."""
    var = variables.get(name)
    if var is None:
        raise NotFound(f"variable {name!r} is not held by this shard")
    if slot:
        raise InvalidArgument(f"variable {name!r}: a push carries gradients only, not optimizer slot {slot!r}")
    if var.frozen:
        raise InvalidArgument(f"variable {name!r} is frozen (train.frozen): its gradient must not be pushed")
    value = var.value
    if dtype != value.dtype and not (value.dtype == np.float32 and is_reduced_float(dtype)):
        raise InvalidArgument(f"variable {name!r}: gradient of dtype {dtype_name(dtype)}, expected {value.dtype.name}")
    if not sparse:
        if shape != value.shape:
            raise InvalidArgument(f"variable {name!r}: gradient of shape {shape}, expected {value.shape}")
        return
    if value.ndim == 0:
        raise InvalidArgument(f"variable {name!r} is a scalar: it takes no sparse rows")
    if not shape:  # sparse values are (rows, *row shape): a declaration without a row count is malformed
        raise InvalidArgument(f"variable {name!r}: sparse rows declared with an empty shape (no row count)")
    if shape[1:] != value.shape[1:]:
        raise InvalidArgument(f"variable {name!r}: sparse rows of shape {shape[1:]}, expected {value.shape[1:]}")
    if shape[0] > value.shape[0]:
        raise InvalidArgument(f"variable {name!r}: {shape[0]} sparse rows for a variable of {value.shape[0]} rows "
                              "(sum duplicate rows before pushing)")


def check_declared_value(name: str, slot: str, dtype: np.dtype, shape: tuple, sparse: bool, variables: Mapping) -> None:
    """An Init value's declaration once the shard has variables: one of them, dense, same
    dtype and shape (a later Init must match; see Shard.init)."""
    var = variables.get(name)
    if var is None or slot or sparse or dtype != var.value.dtype or shape != var.value.shape:
        got = f"{'sparse ' if sparse else ''}{dtype_name(dtype)}{list(shape)}" + (f" slot {slot!r}" if slot else "")
        want = "no such variable" if var is None else f"{var.value.dtype.name}{list(var.value.shape)}"
        raise FailedPrecondition(f"Init does not match the variables of this shard: {name!r} is {got}, "
                                 f"the shard has {want}")
