"""The host's page cache in the simulator: the kernel's LRU (the honest baseline) or residency's
managed tier (the core's :class:`residency.HostTier`, with prefetch while a load waits).

Both answer the one question a load asks — how many of my file's bytes are in RAM when I start
reading — and so what it costs: ``cached ÷ host bandwidth + uncached ÷ disk bandwidth + engine
start``. A prefetch reads at disk bandwidth from the moment it is decided; a load that begins
before it finished reads the rest itself. Simplification (documented, not hidden): prefetches and
loads do not share the disk's bandwidth with each other.
"""

from __future__ import annotations

from collections.abc import Callable

from residency._core import HostAction, HostActionKind, HostTier
from residency.sim.page_cache import LruPageCache
from residency.sim.trace import GB

NS = 1_000_000_000


class HostCache:
    """The kernel's LRU: what a load touches stays, the least recently touched leaves."""

    def __init__(self, budget: int, host_gbps: float, disk_gbps: float) -> None:
        self.lru = LruPageCache(budget)
        self.host_bps, self.disk_bps = host_gbps * GB, disk_gbps * GB
        self.hit_bytes = 0

    def read_seconds(self, key: str, nbytes: int, now: int, begin: int) -> float:
        """A load of ``key`` decided at ``now`` reads its file from ``begin``: seconds reading."""
        hit = self.lru.touch(key, nbytes)
        self.hit_bytes += hit
        return hit / self.host_bps + (nbytes - hit) / self.disk_bps

    def waiting(self, key: str, nbytes: int, now: int) -> None:
        """A load of ``key`` must wait: the kernel does nothing about it."""

    def ready(self, key: str, now: int) -> None:
        """The load finished reading (the runner no longer maps the whole file)."""


class ManagedHost(HostCache):
    """Residency's tier: the core decides what stays warm and prefetches waiting loads."""

    def __init__(self, budget: int, host_gbps: float, disk_gbps: float, half_life_s: float) -> None:
        super().__init__(budget, host_gbps, disk_gbps)
        self.tier = HostTier(budget, round(half_life_s * NS))
        self.ram: dict[str, int] = {}  # bytes physically in RAM (prefetches not counted)
        self.prefetching: dict[str, tuple[int, int]] = {}  # key → (since, file bytes)
        self.prefetches = 0
        #: Told each file's warm bytes when they change (the engine's tier-aware policies read
        #: them, as the server's measured mincore facts reach its engine).
        self.on_warm: Callable[[str, int], None] = lambda key, nbytes: None

    def in_ram(self, key: str, t: int) -> int:
        base = self.ram.get(key, 0)
        if key in self.prefetching:
            since, nbytes = self.prefetching[key]
            return min(nbytes, base + int((t - since) / NS * self.disk_bps))
        return base

    def read_seconds(self, key: str, nbytes: int, now: int, begin: int) -> float:
        if begin > now:  # the load waits for its victims: prefetch meanwhile
            self.waiting(key, nbytes, now)
        hit = min(nbytes, self.in_ram(key, begin))
        self.prefetching.pop(key, None)
        self.hit_bytes += hit
        self.ram[key] = nbytes  # the load reads it all
        self.on_warm(key, nbytes)
        self.apply(self.tier.mapped(key, True, now))
        self.apply(self.tier.loaded(key, nbytes, now))
        return hit / self.host_bps + (nbytes - hit) / self.disk_bps

    def waiting(self, key: str, nbytes: int, now: int) -> None:
        self.apply(self.tier.waiting(key, nbytes, now), now)

    def ready(self, key: str, now: int) -> None:
        self.apply(self.tier.mapped(key, False, now))

    def apply(self, actions: list[HostAction], now: int = 0) -> None:
        for a in actions:
            if a.kind == HostActionKind.DROP:
                self.ram.pop(a.key, None)
                self.prefetching.pop(a.key, None)
                self.on_warm(a.key, 0)
            elif a.key not in self.prefetching:
                self.prefetches += 1
                self.prefetching[a.key] = (now, a.bytes)
                self.on_warm(a.key, a.bytes)  # on its way: by the reload, it will be
