"""The host's page cache in the simulator: the kernel's LRU (the honest baseline) or residency's
managed tier (the core's :class:`residency.HostTier`, with prefetch while a load waits).

Both answer the one question a load asks when it starts reading — how many of my file's bytes are
in RAM — and so what it costs: ``cached ÷ host bandwidth + uncached ÷ disk bandwidth + engine
start``, where the uncached part is read from the one shared disk (sim.disk: loads share it, a
prefetch reads only while no load does). A prefetch starts when the core decides it; a load that
begins before it finished reads the rest itself.
"""

from __future__ import annotations

from collections.abc import Callable

from residency._core import HostAction, HostActionKind, HostTier
from residency.sim.disk import Disk
from residency.sim.page_cache import LruPageCache


class HostCache:
    """The kernel's LRU: what a load touches stays, the least recently touched leaves."""

    def __init__(self, budget: int, disk: Disk) -> None:
        self.lru = LruPageCache(budget)
        self.disk = disk
        self.hit_bytes = 0

    def begin_read(self, key: str, nbytes: int, now: int) -> int:
        """A load starts reading ``key``'s file (``nbytes``) now: how many bytes come from RAM."""
        hit = self.lru.touch(key, nbytes)
        self.hit_bytes += hit
        return hit

    def waiting(self, key: str, nbytes: int, now: int) -> None:
        """A load of ``key`` must wait: the kernel does nothing about it."""

    def ready(self, key: str, now: int) -> None:
        """The load finished reading (the runner no longer maps the whole file)."""

    def prefetched(self, job: str, now: int) -> None:
        """A background read finished (only the managed tier starts them)."""


class ManagedHost(HostCache):
    """Residency's tier: the core decides what stays warm and prefetches waiting loads."""

    def __init__(self, budget: int, disk: Disk, half_life_s: float) -> None:
        super().__init__(budget, disk)
        self.tier = HostTier(budget, round(half_life_s * 1e9))
        self.ram: dict[str, int] = {}  # bytes physically in RAM (prefetches in flight not counted)
        self.sizes: dict[str, int] = {}
        self.prefetches = 0
        #: Told each file's bytes in RAM when they change (a prefetch: once done), as the
        #: server's measured mincore facts reach its engine.
        self.on_warm: Callable[[str, int], None] = lambda key, nbytes: None

    @staticmethod
    def job(key: str) -> str:
        return "prefetch:" + key

    def begin_read(self, key: str, nbytes: int, now: int) -> int:
        # The load reads whatever the prefetch has not: it ends the prefetch.
        fetched = self.disk.finish(self.job(key), now)
        hit = min(nbytes, self.ram.get(key, 0) + int(fetched))
        self.hit_bytes += hit
        self.ram[key] = nbytes  # the load reads it all
        self.on_warm(key, nbytes)
        self.apply(self.tier.mapped(key, True, now), now)
        self.apply(self.tier.loaded(key, nbytes, now), now)
        return hit

    def waiting(self, key: str, nbytes: int, now: int) -> None:
        self.sizes[key] = nbytes
        self.apply(self.tier.waiting(key, nbytes, now), now)

    def ready(self, key: str, now: int) -> None:
        self.apply(self.tier.mapped(key, False, now), now)

    def prefetched(self, job: str, now: int) -> None:
        key = job.removeprefix("prefetch:")
        self.disk.finish(job, now)
        self.ram[key] = self.sizes.get(key, self.ram.get(key, 0))
        self.on_warm(key, self.ram[key])

    def apply(self, actions: list[HostAction], now: int) -> None:
        for a in actions:
            job = self.job(a.key)
            if a.kind == HostActionKind.DROP:  # all but its first `keep` bytes
                fetched = int(self.disk.finish(job, now))
                self.ram[a.key] = min(a.keep, self.ram.get(a.key, 0) + fetched)
                self.on_warm(a.key, self.ram[a.key])
            elif job not in self.disk.jobs:
                self.prefetches += 1
                self.sizes[a.key] = a.bytes
                self.disk.start(job, a.bytes - self.ram.get(a.key, 0), now, background=True)
