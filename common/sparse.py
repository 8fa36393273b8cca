"""SparseRows: a gradient (or update) that touches only some rows of a variable.

One type for the whole system: the autodiff engine returns it for an embedding lookup, the
codec puts it on the wire, the partitioner cuts it by rows, and the shard applies it to the
rows it names only. It is defined at the bottom layer (asyncps.protos.wire_types) because the
codec encodes it and protos/ imports nothing above itself; this module is its public home.
"""
from asyncps.protos.wire_types import SparseRows

__all__ = ["SparseRows"]
