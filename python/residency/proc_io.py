"""The kernel's storage counters of one process: what it read from storage, not from RAM.

How tests and benchmarks tell a runner's start from a dropped file (it reads the whole file from
storage) from one after a warm (page-cache hits are not counted), without timing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class StorageReads(NamedTuple):
    """What the kernel counted for one process: bytes it caused to be read from storage (page-cache
    hits are not counted) and its major page faults (a mapped page that had to come from disk)."""

    read_bytes: int | None  # None: the kernel keeps no I/O accounting here (/proc/PID/io absent)
    major_faults: int


def storage_reads(pid: int) -> StorageReads:
    """The kernel's storage counters of a live process (OSError if it is gone)."""
    # The command name may hold spaces or parentheses: the fields start after the last ')'.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    major_faults = int(fields[9])  # the 12th field, majflt
    read_bytes: int | None = None
    io = Path(f"/proc/{pid}/io")
    if io.exists():  # absent without the kernel's task I/O accounting
        for line in io.read_text().splitlines():
            if line.startswith("read_bytes:"):
                read_bytes = int(line.split()[1])
    return StorageReads(read_bytes, major_faults)
