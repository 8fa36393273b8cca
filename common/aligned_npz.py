"""Uncompressed ``.npz`` files whose arrays start on 64-byte boundaries, and read-only arrays
mapped straight from them without reading them.

``np.load`` of an npz copies every member into fresh memory. For the MNIST cache (220 MB) that
was 0.7 s per process on the 2-core machine, nearly all of it first-touch page faults of the new
memory, and a launch paid it twice on its critical path: the chief before it serves, then every
worker after it registers. An uncompressed npz holds each ``.npy`` member as plain bytes at a
fixed offset, so each array can be a read-only view of one shared ``mmap`` of the file instead:
opening costs about a millisecond, a process touches only the pages it reads (the chief its test
split, a worker its own data shard), and every process of a host shares the one copy in the page
cache.

Alignment matters for more than speed: ``np.savez`` puts a member's bytes wherever the zip headers
end, so a mapped float32 array may start at an odd address, and numpy then sums it through
buffered chunks in another order: MNIST's standardization mean differed in its last bits from the
same values in memory (a recorded run no longer replayed bit for bit). `write_aligned_npz` pads
each member's local zip header (an extra field, as Android's zipalign does) so that its array data
starts at a multiple of 64 bytes; `map_npz` maps only arrays aligned for their dtype and otherwise
leaves the file to ``np.load``.

What the mapping gives up: ``np.load`` checks each member's CRC-32 as it reads it; a mapped
member is not read, so its CRC is not checked. Sizes are: a member cut short by truncation
raises. Callers that need the CRC check (a file of unknown origin) keep using ``np.load``.
"""
from __future__ import annotations

import mmap
import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes before the name
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ZIP64_EXTRA = 20  # the zip64 field zipfile adds to a local header written with force_zip64
_PAD_ID = 0xD935  # the extra-field id zipalign uses for padding; readers skip unknown ids
ALIGN = 64  # numpy pads a .npy header so the data starts at a multiple of 64 within the member


def write_aligned_npz(f: IO[bytes], arrays: Mapping[str, Any]) -> None:
    """Write `arrays` to the seekable file `f` as an uncompressed npz (what ``np.savez`` writes,
    readable by ``np.load``, pickle refused) in which every array's data starts at a multiple of
    `ALIGN` bytes from the start of the file."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            start = archive.fp.tell()  # type: ignore[union-attr]  # where the local header goes
            fixed = _LOCAL_HEADER.size + len(info.filename.encode()) + _ZIP64_EXTRA
            pad = -(start + fixed) % ALIGN
            if pad:
                pad += ALIGN if pad < 4 else 0  # a field is at least its 4-byte id and length
                info.extra = struct.pack("<HH", _PAD_ID, pad - 4) + bytes(pad - 4)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def map_npz(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """`keys` of the npz at `path` as read-only arrays over one mmap of the file, or None when any
    of them cannot be mapped (compressed, an object array, a member missing, data not aligned for
    its dtype): the caller then reads the file the ordinary way, which also names what is wrong.

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
    if offset % dtype.alignment:
        return None
    array = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")
