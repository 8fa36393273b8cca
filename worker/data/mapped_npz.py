"""Read-only arrays mapped straight from an uncompressed ``.npz``, without reading it.

``np.load`` of an npz copies every member into fresh memory. For the MNIST cache (220 MB) that
was 0.7 s per process on the 2-core machine, nearly all of it first-touch page faults of the new
memory, and a launch paid it twice on its critical path: the chief before it serves, then every
worker after it registers. An uncompressed npz (what ``np.savez`` and `atomic_save_npz` write)
holds each ``.npy`` member as plain bytes at a fixed offset, so each array can be a read-only
view of one shared ``mmap`` of the file instead: opening costs about a millisecond, a process
touches only the pages it reads (the chief its test split, a worker its own data shard), and
every process of a host shares the one copy in the page cache.

What the mapping gives up: ``np.load`` checks each member's CRC-32 as it reads it; a mapped
member is not read, so its CRC is not checked. Sizes are: a member cut short by truncation
raises. Callers that need the CRC check (a file of unknown origin) keep using ``np.load``.
"""
from __future__ import annotations

import mmap
import struct
import zipfile
from pathlib import Path

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes before the name
_LOCAL_SIGNATURE = b"PK\x03\x04"


def map_npz(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """`keys` of the npz at `path` as read-only arrays over one mmap of the file, or None when any
    of them cannot be mapped (compressed, an object array, a member missing): the caller then
    reads the file the ordinary way, which also names what is wrong with it.

    Raises OSError, ValueError or zipfile.BadZipFile for a file that is not a whole zip archive.
    """
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        members = {}
        for key in keys:
            try:
                info = archive.getinfo(f"{key}.npy")
            except KeyError:
                return None
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            members[key] = info
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError("empty file")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # outlives `f`: the arrays hold it
        arrays = {}
        for key, info in members.items():
            header = _LOCAL_HEADER.unpack_from(mapped, info.header_offset)
            if header[0] != _LOCAL_SIGNATURE:
                raise zipfile.BadZipFile(f"{key}.npy: bad local file header")
            data_start = info.header_offset + _LOCAL_HEADER.size + header[9] + header[10]
            f.seek(data_start)
            array = _array_at(f, mapped, data_start, info.file_size)
            if array is None:
                return None
            arrays[key] = array
    return arrays


def _array_at(f, mapped: mmap.mmap, start: int, member_size: int) -> np.ndarray | None:
    """The .npy member whose bytes begin at `start` (`f` positioned there), as a read-only view."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject:
        return None
    offset = f.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if offset - start + count * dtype.itemsize > member_size:
        raise ValueError(f"member holds {member_size} bytes, less than its header's {shape} {dtype}")
    array = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")
