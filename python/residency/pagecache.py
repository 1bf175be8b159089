"""The kernel's page cache for model files: measure (``mincore``), warm (read-ahead), drop.

Model files are read through the page cache: a file whose pages are resident reloads at memory
speed, one that was dropped at disk speed. These are the kernel's own interfaces, so what they
report is a fact, not a guess: ``resident_bytes`` maps the file (which faults nothing in) and asks
``mincore`` which pages are in RAM. Everything here blocks on I/O: callers on an event loop run it
in a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from pathlib import Path

_PAGE = mmap.PAGESIZE
#: Bytes read per call while warming: large enough to stream, small enough to cancel promptly.
WARM_CHUNK = 8 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes(b & 1 for b in range(256))


def resident_bytes(path: Path | str) -> int:
    """Bytes of ``path`` in the page cache now (whole pages; the last one counts its file part)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore {path}: {os.strerror(err)}")
            # Only the low bit means resident; count it at C speed (millions of pages).
            resident = pages - bytes(vec).translate(_LOW_BIT).count(0)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    # The last page is only partly the file's.
    tail = size - (pages - 1) * _PAGE
    last_in = bool(vec[pages - 1] & 1)
    return (resident - last_in) * _PAGE + (tail if last_in else 0)


def drop(path: Path | str, *, keep: int = 0) -> None:
    """Asks the kernel to drop ``path``'s clean pages from the page cache beyond its first ``keep``
    bytes (0: all of it). Pages a process maps and uses may stay: the kernel never drops what is in
    use, which is why callers never drop a file a runner maps — it would be a no-op at best and a
    stall for the runner at worst."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Whole pages only: the page holding byte `keep - 1` stays.
        start = -(-keep // _PAGE) * _PAGE
        os.posix_fadvise(fd, start, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(
    path: Path | str, *, cancelled: threading.Event | None = None, limit: int | None = None
) -> int:
    """Reads ``path`` (its first ``limit`` bytes; None: all) into the page cache (read-ahead hint,
    then a streaming read so it is really there when this returns). ``cancelled`` is checked
    between chunks. Returns the bytes read."""
    is_set = cancelled.is_set if cancelled is not None else None
    if is_set is not None and is_set():
        return 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    done = 0
    try:
        os.posix_fadvise(fd, 0, limit or 0, os.POSIX_FADV_WILLNEED)
        buf = bytearray(WARM_CHUNK)
        view = memoryview(buf)
        while limit is None or done < limit:
            if is_set is not None and is_set():
                break
            want = view if limit is None else view[: min(WARM_CHUNK, limit - done)]
            n = os.readv(fd, [want])
            if n <= 0:
                break
            done += n
    finally:
        os.close(fd)
    return done
