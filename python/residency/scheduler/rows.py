"""The rows of /api/ps: the core's reservations, with the entry and context each runner serves,
and the host page cache's model files (warm in RAM whether or not their model is loaded)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from residency._core import DeviceUsage, Engine, ResidentSet
from residency.keepalive import KeepAliveOrigin
from residency.scheduler.executor import HOST_DEVICE, Executor
from residency.scheduler.fallback import DecodeSpeed
from residency.scheduler.host_cache import HostCache
from residency.scheduler.lease import ResidentModel

#: The core's "never" (INT64_MAX) and anything near it: no expiry to show.
_FOREVER = 2**63 - 1


def resident_rows(
    engine: Engine,
    executor: Executor,
    now_ns: int,
    origins: Mapping[str, KeepAliveOrigin],
    speed: DecodeSpeed,
) -> list[ResidentModel]:
    wall = datetime.now(timezone.utc)
    rows = []
    for r in engine.resident_set.snapshot():
        inst = executor.instances.get(r.key)
        if inst is None and r.key in executor.stopping:
            inst = executor.stopping[r.key][0]
        if inst is None:
            continue
        expires = r.expires_at
        size, size_vram = r.bytes, 0 if r.device == HOST_DEVICE else r.bytes
        p = inst.placement
        if p is not None and p.split:  # the real CPU/GPU split, as the runner reported it
            size, size_vram = p.gpu_bytes + p.host_bytes, p.gpu_bytes
        rows.append(
            ResidentModel(
                name=r.key,
                entry=inst.entry,
                device=r.device,
                state=r.state.name.lower(),
                bytes=r.bytes,
                estimated_bytes=r.estimated_bytes,
                measured_bytes=r.bytes if r.measured else None,
                size=size,
                size_vram=size_vram,
                expires_at=None
                if expires is None or expires >= _FOREVER
                else wall + timedelta(microseconds=(expires - now_ns) / 1000),
                context_length=inst.options.ctx,
                refcount=r.refcount,
                measure_warm=_no_measure
                if executor.host_cache is None
                else functools.partial(executor.host_cache.warm_bytes, r.key),
                placement=p,
                decode_speed=speed.state(r.key),
                keep_alive_ns=r.keep_alive,
                keep_alive_origin=origins.get(r.key),
            )
        )
    return rows


def _no_measure() -> None:
    return None


def device_usage(core: ResidentSet, executor: Executor) -> list[tuple[DeviceUsage, int | None]]:
    """Each device's accounting in the core, with the free bytes its probe reports now."""
    return [(d, executor.memory.free_on(d.id)) for d in core.devices()]


@dataclass(frozen=True)
class WarmFile:
    """A configured model's file in the host page cache (its model may or may not be loaded)."""

    name: str
    #: Bytes of it in RAM now, as mincore sees them.
    warm_bytes: int
    #: Whether the host tier keeps it warm (else it is there by the kernel's grace).
    kept: bool


@dataclass(frozen=True)
class HostTierView:
    """The host tier as /api/ps, /metrics and ``residency ps`` show it."""

    budget_bytes: int
    #: Bytes of the files the tier keeps warm (its own account).
    kept_bytes: int
    files: tuple[WarmFile, ...]


def host_tier_view(host: HostCache | None, names: Iterable[str]) -> HostTierView | None:
    """The files of the models ``names`` the host cache knows of (it saw them load or wait) that
    are warm or kept; None when the page cache is left to the kernel."""
    if host is None:
        return None
    files = []
    for name in names:
        warm = host.warm_bytes(name)  # None: a file the cache never saw, or unreadable now
        if warm is None:
            continue
        kept = host.kept(name)
        if warm or kept:
            files.append(WarmFile(name, warm, kept))
    return HostTierView(host.tier.budget, host.tier.kept_bytes, tuple(files))
