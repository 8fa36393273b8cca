"""Shared-memory segments of the same-host data plane (``cluster.transport: auto | grpc | shm``).

When a worker and a shard share a host, a push-pull's tensors travel through one segment per
(worker, shard) and gRPC carries only a small control message (ps.proto: ShmOpen, ShmPushPull).
Sharing a host is proved, never inferred from an address:

1. the worker calls ShmOpen(worker): the shard creates a segment in /dev/shm (``os.open`` with
   O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600, a name of the run's prefix + 32 random hex digits
   from `secrets`), sized from its variables, writes MAGIC and a random 32-byte nonce into its
   header and answers the name and layout (never the nonce);
2. the worker opens and maps the segment (refusing one that is not a regular file of its own
   uid, of mode 0600, of the announced size), reads the nonce and calls ShmOpen again with the
   proof: the nonce, or HMAC-SHA256(job token, nonce) when ``cluster.security`` has a token (so
   a process of the same uid that can read /dev/shm but holds no token cannot pass);
3. the shard checks the proof (constant time) and unlinks the segment's name: both processes
   keep their mapping, nothing of the run stays in /dev/shm. A wrong proof: PERMISSION_DENIED,
   the segment is dropped.

A name exists in /dev/shm only between steps 1 and 3. A segment whose handshake never completed
is unlinked by the shard when the worker opens another one and when the shard stops; the
launcher removes whatever still carries the run's prefix (`prefix_for(run_dir)`) after stopping
its children, so a SIGKILLed shard or worker leaves nothing either (`remove_segments`).

Layout: a HEADER_BYTES header (MAGIC, nonce), then the push region (the shard's trainable
variables at their dtype: float32 gradients, or smaller 16-bit compressed ones), then the pull
region (every variable of the shard), each tensor at a 64-byte aligned offset. Memory per segment
is therefore bounded by HEADER_BYTES + trainable bytes + variable bytes (about twice the
shard's model), reported by the shard's Stats (shm_segments, shm_bytes) and logged at each
handshake.

Segments are created with ``os.open`` + ``mmap`` rather than multiprocessing.shared_memory: its
resource tracker would unlink (and warn about) segments another process created.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import mmap
import os
import secrets
import stat
from collections.abc import Iterable, Mapping

import numpy as np

SHM_DIR = "/dev/shm"
NAME_PREFIX = "asyncps-"
MAGIC = b"ASPSHM01"
NONCE_BYTES = 32
HEADER_BYTES = 4096
ALIGN = 64
TRANSPORTS = ("auto", "grpc", "shm")


class ShmError(OSError):
    """A segment that cannot be created, opened or trusted (the message says why)."""


def prefix_for(run_dir: str | os.PathLike | None) -> str:
    """The name prefix of a run's segments: derived from the resolved run directory, so the
    launcher knows it without being told (``asyncps-<12 hex>-``); a process without a run
    directory uses one of its own (``asyncps-p<pid>-``)."""
    if not run_dir:
        return f"{NAME_PREFIX}p{os.getpid()}-"
    digest = hashlib.sha256(os.path.realpath(os.fspath(run_dir)).encode()).hexdigest()[:12]
    return f"{NAME_PREFIX}{digest}-"


def available() -> bool:
    """True where POSIX shared memory lives in SHM_DIR (Linux)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def remove_segments(prefix: str) -> int:
    """Unlinks every segment whose name starts with `prefix` (the launcher, after its children
    stopped); returns how many were removed."""
    if not prefix.startswith(NAME_PREFIX) or "/" in prefix:
        raise ValueError(f"not a segment prefix: {prefix!r}")
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except OSError:
                pass
    return removed


def count_segments(prefix: str) -> int:
    """Entries of SHM_DIR whose name starts with `prefix` (tests, leak checks)."""
    try:
        return sum(1 for name in os.listdir(SHM_DIR) if name.startswith(prefix))
    except OSError:
        return 0


def proof(nonce: bytes, token: str | None) -> bytes:
    """What the worker sends back: the nonce, or HMAC-SHA256(token, nonce) with a job token."""
    if token is None:
        return bytes(nonce)
    return hmac.new(token.encode(), bytes(nonce), hashlib.sha256).digest()


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def region_bytes(arrays: Iterable[tuple[np.dtype, tuple[int, ...]]]) -> int:
    """Bytes of a region holding arrays of these (dtype, shape), each 64-byte aligned."""
    return sum(aligned(np.dtype(d).itemsize * math.prod(s)) for d, s in arrays)


class Segment:
    """One mapped segment. `create` (the shard: owner, unlinks at close) or `attach` (the worker)."""

    def __init__(self, name: str, mm: mmap.mmap, size: int, owner: bool):
        self.name, self.mm, self.size, self.owner = name, mm, size, owner
        self.linked = owner  # the owner's name is in SHM_DIR until `unlink`
        self._base: int | None = None  # the mapping's address (`_address`)

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, prefix: str, size: int) -> tuple["Segment", bytes]:
        """A new private segment of `size` bytes with MAGIC and a fresh nonce; (segment, nonce)."""
        if not prefix.startswith(NAME_PREFIX) or "/" in prefix:
            raise ValueError(f"not a segment prefix: {prefix!r}")
        name = prefix + secrets.token_hex(16)
        path = os.path.join(SHM_DIR, name)
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as err:
            raise ShmError(f"cannot create {path}: {err.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError as err:
            os.close(fd)
            _unlink(path)
            raise ShmError(f"cannot size or map {path} ({size} bytes): {err}") from None
        os.close(fd)
        nonce = secrets.token_bytes(NONCE_BYTES)
        mm[:len(MAGIC)] = MAGIC
        mm[len(MAGIC):len(MAGIC) + NONCE_BYTES] = nonce
        return cls(name, mm, size, owner=True), nonce

    @classmethod
    def attach(cls, name: str, size: int) -> "Segment":
        """Maps an existing segment after checking it is what the shard announced: a plain file
        of this uid, mode 0600, of exactly `size` bytes."""
        if not name.startswith(NAME_PREFIX) or "/" in name or name in (".", ".."):
            raise ShmError(f"refusing segment name {name!r}")
        if size < HEADER_BYTES:
            raise ShmError(f"segment {name}: announced size {size} is below the header's {HEADER_BYTES} bytes")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            raise ShmError(f"cannot open {path}: {err.strerror} (the shard is on another host?)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise ShmError(f"{path}: not a private segment of this user (mode {oct(st.st_mode & 0o777)})")
            if st.st_size != size:
                raise ShmError(f"{path}: {st.st_size} bytes, the shard announced {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, mm, size, owner=False)

    def nonce(self) -> bytes:
        """The nonce in the header (ShmError when the header is not ours)."""
        if self.mm[:len(MAGIC)] != MAGIC:
            raise ShmError(f"segment {self.name}: no asyncps header")
        return bytes(self.mm[len(MAGIC):len(MAGIC) + NONCE_BYTES])

    def unlink(self) -> None:
        """Removes the name from SHM_DIR (the mappings stay valid)."""
        if self.linked:
            self.linked = False
            _unlink(self.path)

    def close(self) -> None:
        """Unlinks (owner) and unmaps; a mapping still exported to a live numpy view (a call
        still in flight) is left to the garbage collector."""
        if self.owner:
            self.unlink()
        try:
            self.mm.close()
        except BufferError:
            pass

    # -- tensors -------------------------------------------------------------------------------

    def view(self, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
        """A live view of `shape` x `dtype` at `offset` (caller checked the bounds)."""
        return np.frombuffer(self.mm, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)

    def write(self, arrays: Mapping[str, np.ndarray], lo: int, hi: int) -> list[tuple[str, np.ndarray, int]] | None:
        """Copies `arrays` (little-endian C-order wire arrays) one after another into [lo, hi),
        64-byte aligned (`place`); [(name, array, offset)], or None when they do not fit. An
        array that lies in this segment itself is copied aside first, so no write here
        overwrites an input before it was read."""
        offsets = place(((name, array.nbytes) for name, array in arrays.items()), lo, hi)
        if offsets is None:
            return None
        placed = [(name, array, offsets[name]) for name, array in arrays.items()]
        writes = [(array.copy() if self.holds(array) else array, offset) for _, array, offset in placed if array.nbytes]
        for array, offset in writes:
            np.copyto(self.view(array.dtype, array.shape, offset), array, casting="no")
        return placed

    def holds(self, array: np.ndarray) -> bool:
        """True when any byte of `array` lies in this segment's mapping."""
        if not array.nbytes:
            return False
        start, end = _byte_bounds(array)
        base = self._address()
        return start < base + self.size and end > base

    def _address(self) -> int:
        """The mapping's address (kept: a view held here would stop `close` from unmapping)."""
        if self._base is None:
            probe = np.frombuffer(self.mm, dtype=np.uint8, count=1)
            self._base = int(probe.ctypes.data)
            del probe
        return self._base

    def copy_out(self, dtype: np.dtype, shape: tuple[int, ...], offset: int, nbytes: int, lo: int, hi: int,
                 what: str) -> np.ndarray:
        """A private copy of the tensor at [offset, offset + nbytes), which must lie in [lo, hi)
        and match dtype x shape; ShmError (the message names `what`) otherwise."""
        return self.checked_view(dtype, shape, offset, nbytes, lo, hi, what).copy()

    def checked_view(self, dtype: np.dtype, shape: tuple[int, ...], offset: int, nbytes: int, lo: int, hi: int,
                     what: str, writable: bool = False) -> np.ndarray:
        """A live view of the tensor at [offset, offset + nbytes), checked as by `copy_out`;
        read-only unless `writable`. Its values change when the other side writes there again."""
        if any(d < 0 for d in shape):
            raise ShmError(f"{what}: negative dimension in shape {list(shape)}")
        expected = np.dtype(dtype).itemsize * math.prod(shape)
        if nbytes != expected:
            raise ShmError(f"{what}: {nbytes} bytes for dtype {np.dtype(dtype)} x {list(shape)} ({expected} bytes)")
        if offset < lo or offset + nbytes > hi:
            raise ShmError(f"{what}: bytes [{offset}, {offset + nbytes}) outside the region [{lo}, {hi})")
        if not nbytes:
            view = np.zeros(shape, dtype=dtype)
        else:
            view = self.view(dtype, shape, offset)
        view.flags.writeable = writable
        return view


def place(sizes: Iterable[tuple[str, int]], lo: int, hi: int) -> dict[str, int] | None:
    """{name: offset} of tensors of these byte counts placed one after another in [lo, hi),
    each 64-byte aligned; None when they do not fit."""
    offsets, at = {}, lo
    for name, nbytes in sizes:
        if at + nbytes > hi:
            return None
        offsets[name] = at
        at = aligned(at + nbytes)
    return offsets


try:  # where numpy keeps it: numpy.lib.array_utils since 2.0, the top level before
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # numpy < 2
    _byte_bounds = np.byte_bounds  # type: ignore[attr-defined]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
