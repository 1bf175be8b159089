"""The scheduler's host cache carries out the core's tier on real files: a prefetch warms (as
mincore sees), a drop empties what the tier no longer keeps (a file's tail, or all of it), a mapped
file is never dropped, a pending warm can be cancelled."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from residency import pagecache
from residency.embedded import cache_dir
from residency.scheduler.host_cache import HostCache

pytestmark = pytest.mark.timeout(60)
SIZE = 8 << 20


def _write(path: Path) -> Path:
    with path.open("wb") as f:
        f.write(os.urandom(SIZE))
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    pagecache.drop(path)
    return path


@pytest.fixture
def files() -> Iterator[list[Path]]:
    folder = cache_dir() / "test-host-cache"  # a disk: tmpfs pages can never be dropped
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_write(folder / f"{os.getpid()}-{i}.bin") for i in range(3)]
    yield paths
    for p in paths:
        p.unlink(missing_ok=True)


async def _settle(cache: HostCache) -> None:
    while cache._tasks:
        await asyncio.gather(*list(cache._tasks))


async def test_prefetch_warms_and_displacement_drops(files: list[Path]) -> None:
    a, b, _ = files
    told: dict[str, int] = {}  # what the engine's tier-aware eviction is told
    cache = HostCache(
        budget_bytes=SIZE + SIZE // 2, min_file_bytes=0, on_warm=told.__setitem__
    )  # room for one file
    cache.waiting("a", a, 0)
    await _settle(cache)
    assert told == {"a": SIZE}
    assert await cache.measure("a", 1) == SIZE  # warmed during the wait
    # "b" is loaded twice (more valuable than "a", used never): "a" makes the room b needs by
    # giving up the second half of its file, and keeps the first.
    for t in (2, 3):
        cache.mapped("b", b, t)
        cache.loaded("b", t)
        cache.unmapped("b", t)
    await _settle(cache)
    assert cache.kept_of("b") == SIZE
    assert cache.kept_of("a") == SIZE // 2
    assert told == {"a": SIZE // 2, "b": SIZE}
    assert await cache.measure("a", 4) == SIZE // 2
    assert pagecache.resident_bytes(a) == SIZE // 2
    await cache.aclose()


async def test_a_mapped_file_is_not_dropped_until_unmapped(files: list[Path]) -> None:
    a, b, _ = files
    cache = HostCache(budget_bytes=SIZE + SIZE // 2, min_file_bytes=0)
    for t in (0, 1):  # "a" is the valuable one
        cache.mapped("a", a, t)
        cache.loaded("a", t)
        cache.unmapped("a", t)
    cache.mapped("b", b, 2)
    pagecache.warm(b)  # the runner reads it
    cache.loaded("b", 2)  # only the room left is kept (half): the rest is read around
    await _settle(cache)
    assert pagecache.resident_bytes(b) == SIZE  # but mapped: nothing dropped yet
    cache.unmapped("b", 3)
    await _settle(cache)
    assert pagecache.resident_bytes(b) == SIZE // 2
    assert cache.kept_of("a") == SIZE
    await cache.aclose()


async def test_a_waiting_warm_is_cancelled_by_the_load_itself(files: list[Path]) -> None:
    a, b, _ = files
    cache = HostCache(budget_bytes=4 * SIZE, min_file_bytes=0)
    cache.waiting("a", a, 0)
    cache.waiting("b", b, 0)  # queued behind "a" for the disk
    cache.mapped("b", b, 1)  # its runner starts: the prefetch would only compete
    await _settle(cache)
    assert pagecache.resident_bytes(b) <= SIZE // 20
    await cache.aclose()


async def test_a_small_tail_of_a_large_file_is_dropped_too(files: list[Path]) -> None:
    a, b, _ = files
    # Files of SIZE are large enough to manage; the quarter "a" gives up is not, on its own.
    cache = HostCache(budget_bytes=SIZE + 3 * SIZE // 4, min_file_bytes=SIZE // 2)
    cache.waiting("a", a, 0)
    await _settle(cache)
    assert pagecache.resident_bytes(a) == SIZE
    for t in (2, 3):
        cache.mapped("b", b, t)
        cache.loaded("b", t)
        cache.unmapped("b", t)
    await _settle(cache)
    assert cache.kept_of("a") == 3 * SIZE // 4
    assert pagecache.resident_bytes(a) == 3 * SIZE // 4  # as the tier keeps it, not more
    await cache.aclose()


async def test_small_files_are_left_to_the_kernel(files: list[Path]) -> None:
    a = files[0]
    cache = HostCache(budget_bytes=4 * SIZE, min_file_bytes=SIZE + 1)
    cache.waiting("a", a, 0)
    assert not cache._tasks  # no I/O started
    assert pagecache.resident_bytes(a) <= SIZE // 20
    await cache.aclose()


async def test_two_models_on_one_file_are_one_entry_of_its_bytes(files: list[Path]) -> None:
    a, b, _ = files
    alias = a.with_name(a.name + ".link")  # as the Hugging Face cache links snapshots to blobs
    alias.symlink_to(a)
    told: dict[str, int] = {}
    try:
        cache = HostCache(budget_bytes=2 * SIZE, min_file_bytes=0, on_warm=told.__setitem__)
        cache.mapped("chat", a, 0)
        cache.mapped("chat-long-ctx", alias, 0)
        pagecache.warm(a)  # what the runners' loads read
        cache.loaded("chat", 1)
        cache.loaded("chat-long-ctx", 1)
        assert cache.tier.kept_bytes == SIZE  # one file, counted once
        assert cache.kept_of("chat") == cache.kept_of("chat-long-ctx") == SIZE
        assert told == {"chat": SIZE, "chat-long-ctx": SIZE}
        # The room left is a whole file: "b" is kept beside it, nothing is dropped.
        for t in (2, 3):
            cache.mapped("b", b, t)
            cache.loaded("b", t)
            cache.unmapped("b", t)
        await _settle(cache)
        assert cache.tier.kept_bytes == 2 * SIZE
        assert pagecache.resident_bytes(a) == SIZE
    finally:
        alias.unlink()
    await cache.aclose()
