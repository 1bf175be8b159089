"""The devices the engine schedules onto, from the memory probe and the settings."""

from __future__ import annotations

import logging

from residency._core import Device
from residency.config import Settings
from residency.memory import DeviceInfo, MemoryProbe, discover_devices, open_probe
from residency.scheduler.executor import HOST_DEVICE
from residency.scheduler.sizing import gib

__all__ = ["SPREAD_JOIN", "discover", "engine_devices"]

#: A spread device's id joins its GPUs' ids: "cuda:0+cuda:1".
SPREAD_JOIN = "+"

log = logging.getLogger("residency.scheduler")


def discover(settings: Settings) -> tuple[MemoryProbe, list[DeviceInfo]]:
    """Devices from residency.memory (the simulated GPU when settings.simulated_device is set)."""
    if settings.simulated_device is not None:
        probe = open_probe("simulated", simulated_path=settings.simulated_device)
    else:
        probe = open_probe(settings.probe)
    return probe, discover_devices(probe)


def engine_devices(
    settings: Settings, infos: list[DeviceInfo]
) -> tuple[list[Device], dict[str, tuple[int, ...]]]:
    """The engine's devices (capped by memory_limit, less the GPU overhead) and each one's
    indices for the probe: one each, except the spread device of sched_spread (every GPU as one
    device, each model split across all of them, as OLLAMA_SCHED_SPREAD does)."""
    s = settings
    devices: list[Device] = []
    index: dict[str, tuple[int, ...]] = {}
    for info in infos:
        total = (
            info.total_bytes if s.memory_limit is None else min(info.total_bytes, s.memory_limit)
        )
        overhead = 0 if info.id == HOST_DEVICE else min(s.gpu_overhead, total)
        devices.append(Device(info.id, total, overhead, s.max_loaded_models))
        index[info.id] = (info.index,)
    gpus = [d for d in devices if d.id != HOST_DEVICE]
    if s.sched_spread and len(gpus) > 1:
        spread = SPREAD_JOIN.join(d.id for d in gpus)
        devices = [d for d in devices if d.id == HOST_DEVICE] + [
            Device(
                spread,
                sum(d.total_bytes for d in gpus),
                sum(d.overhead_bytes for d in gpus),
                s.max_loaded_models * len(gpus),
            )
        ]
        index[spread] = tuple(i for d in gpus for i in index.pop(d.id))
        log.info("sched_spread: every model is split across %s", spread)
    log.info("devices: %s", ", ".join(f"{d.id} ({gib(d.total_bytes)})" for d in devices))
    return devices, index
