"""The page-cache interfaces against a real file: what ``mincore`` reports is what warming and
dropping did (a file of our own, written and synced, so no other process maps it)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from residency import pagecache, proc_io
from residency.embedded import cache_dir

pytestmark = pytest.mark.timeout(60)
SIZE = 16 << 20


@pytest.fixture
def synced_file() -> Iterator[Path]:
    # Beside the models (a disk): on a tmpfs the pages are the file and can never be dropped.
    folder = cache_dir() / "test-pagecache"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"file-{os.getpid()}.bin"
    with path.open("wb") as f:
        f.write(os.urandom(SIZE - 1234))  # not a whole number of pages
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    yield path
    path.unlink(missing_ok=True)


def test_drop_then_warm_as_mincore_sees_it(synced_file: Path) -> None:
    size = synced_file.stat().st_size
    pagecache.drop(synced_file)
    assert pagecache.resident_bytes(synced_file) <= size // 20
    assert pagecache.warm(synced_file) == size
    assert pagecache.resident_bytes(synced_file) == size
    pagecache.drop(synced_file)
    assert pagecache.resident_bytes(synced_file) <= size // 20


def test_a_part_warmed_and_a_tail_dropped_as_mincore_sees_it(synced_file: Path) -> None:
    """The tier keeps files in part: warm the first bytes, drop all beyond the first bytes."""
    size = synced_file.stat().st_size
    half = 8 << 20
    pagecache.drop(synced_file)
    assert pagecache.warm(synced_file, limit=half) == half
    # At least what was read; the kernel's read-ahead may add a window beyond it, never the file.
    assert half <= pagecache.resident_bytes(synced_file) <= half + (4 << 20)
    pagecache.warm(synced_file)
    pagecache.drop(synced_file, keep=half + 100)  # a keep inside a page keeps that whole page
    assert pagecache.resident_bytes(synced_file) == half + 4096
    pagecache.drop(synced_file, keep=0)
    assert pagecache.resident_bytes(synced_file) <= size // 20


def test_a_cancelled_warm_reads_nothing_more(synced_file: Path) -> None:
    pagecache.drop(synced_file)
    cancel = threading.Event()
    cancel.set()
    assert pagecache.warm(synced_file, cancelled=cancel) == 0


def test_an_empty_file_has_no_resident_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    assert pagecache.resident_bytes(empty) == 0


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pagecache.resident_bytes(tmp_path / "missing")


def test_the_kernel_counts_a_dropped_files_read_and_not_a_warm_ones(synced_file: Path) -> None:
    """``storage_reads`` is the kernel's own count: reading the dropped file reads it from storage,
    reading it again (warm) reads nothing more."""
    size = synced_file.stat().st_size
    if proc_io.storage_reads(os.getpid()).read_bytes is None:
        pytest.skip("this kernel keeps no per-process I/O accounting (/proc/PID/io)")
    pagecache.drop(synced_file)

    def read_bytes() -> int:
        count = proc_io.storage_reads(os.getpid()).read_bytes
        assert count is not None
        return count

    before = read_bytes()
    pagecache.warm(synced_file)
    dropped = read_bytes()
    pagecache.warm(synced_file)
    warm = read_bytes()
    assert dropped - before >= size * 0.9
    assert warm - dropped < size // 10


def test_storage_reads_of_a_process_that_is_gone_is_an_os_error() -> None:
    with pytest.raises(FileNotFoundError):
        proc_io.storage_reads(2**22 + 1)  # above the kernel's pid_max limit
