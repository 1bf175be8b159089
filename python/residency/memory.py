"""Memory probes: how much memory each device has free (CUDA, NVML, the host or a simulation).

The probes live in the C++ core (``residency._core``) so the recovery watcher's thread can poll them
without the GIL. This module finds the vendor libraries, picks a backend and lists devices.

Backends:

- ``cuda`` — ``cudaMemGetInfo`` through libcudart, loaded at run time (the package imports and works
  without CUDA). **The first query of a GPU creates a CUDA context in this process**, which costs
  hundreds of MiB of VRAM on that GPU for as long as the process lives.
- ``nvml`` — ``nvmlDeviceGetMemoryInfo`` through libnvidia-ml: no CUDA context, no VRAM cost. NVML
  numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; set
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so runners' CUDA indices match.
- ``host`` — MemTotal/MemAvailable from ``/proc/meminfo``: the device when no GPU is found.
- ``simulated`` — a :class:`SimulatedDevice` file, the test double of a GPU.

``auto`` tries nvml first when its numbering is the one runners will use (no
``CUDA_VISIBLE_DEVICES`` list, ``CUDA_DEVICE_ORDER`` unset or ``PCI_BUS_ID``) so residency's own
process holds no CUDA context; else cuda (which numbers GPUs as CUDA does, inside the list), then
host. Either way :func:`runner_gpu_environment` tells a runner which physical GPU is its own.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from residency._core import (
    DeviceOutOfMemoryError,
    MemoryInfo,
    MemoryProbe,
    ProbeError,
    ProbeUnavailableError,
    SimAllocation,
    SimulatedDevice,
    open_cuda_probe,
    open_host_probe,
    open_nvml_probe,
)
from residency.errors import ConfigError

__all__ = [
    "BACKENDS",
    "DeviceInfo",
    "DeviceOutOfMemoryError",
    "MemoryInfo",
    "MemoryProbe",
    "ProbeError",
    "ProbeUnavailableError",
    "SimAllocation",
    "SimulatedDevice",
    "cudart_candidates",
    "discover_devices",
    "nvml_candidates",
    "nvml_numbering_matches",
    "open_cuda_probe",
    "open_host_probe",
    "open_nvml_probe",
    "open_probe",
    "runner_gpu_environment",
    "select_probe",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "nvml", "host", "simulated")


def _wheel_libraries(*patterns: str) -> list[str]:
    """Libraries inside NVIDIA's pip wheels (the ``nvidia`` namespace package), newest first."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    found: list[str] = []
    for root in roots:
        for pattern in patterns:
            found.extend(sorted(glob.glob(os.path.join(root, pattern)), reverse=True))
    return found


def cudart_candidates() -> list[str]:
    """Where libcudart may be, best first: cuda-python's wheels (the ``cuda`` extra), then the
    toolkit named by CUDA_HOME/CUDA_PATH, then the dynamic loader's search path."""
    found: list[str] = []
    try:  # cuda-python ≥ 12.9 knows where every NVIDIA wheel and toolkit keeps its libraries
        from cuda.pathfinder import load_nvidia_dynamic_lib

        path = getattr(load_nvidia_dynamic_lib("cudart"), "abs_path", None)
        if isinstance(path, str):
            found.append(path)
    except Exception:  # absent, or it cannot find one: fall back to our own search
        pass
    found += _wheel_libraries("cuda_runtime/lib/libcudart.so*", "cu*/lib/libcudart.so*")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if home := os.environ.get(var):
            found += sorted(glob.glob(os.path.join(home, "lib*", "libcudart.so*")), reverse=True)
    found += ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    found += sorted(glob.glob("/usr/local/cuda/lib64/libcudart.so*"), reverse=True)
    return list(dict.fromkeys(found))


def nvml_candidates() -> list[str]:
    """Where libnvidia-ml may be: it ships with the driver, not with the toolkit or wheels."""
    return ["libnvidia-ml.so.1", "libnvidia-ml.so", "/usr/lib/wsl/lib/libnvidia-ml.so.1"]


def select_probe(
    backend: str = "auto", *, simulated_path: str | os.PathLike[str] | None = None
) -> tuple[MemoryProbe, list[str]]:
    """Opens a probe; also returns why each backend that ``auto`` skipped was unusable."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown memory probe {backend!r}: expected one of {', '.join(BACKENDS)}"
        )
    if backend == "simulated" or (backend == "auto" and simulated_path is not None):
        if simulated_path is None:
            raise ConfigError("the simulated probe needs simulated_path (a SimulatedDevice file)")
        return SimulatedDevice.open(Path(simulated_path)), []
    if backend == "cuda":
        return open_cuda_probe(cudart_candidates()), []
    if backend == "nvml":
        return open_nvml_probe(nvml_candidates()), []
    if backend == "host":
        return open_host_probe(), []
    notes: list[str] = []
    cuda = ("cuda", open_cuda_probe, cudart_candidates)
    nvml = ("nvml", open_nvml_probe, nvml_candidates)
    order = [cuda]
    if nvml_numbering_matches(os.environ):
        order.insert(0, nvml)
    else:
        notes.append("nvml skipped: CUDA_VISIBLE_DEVICES/CUDA_DEVICE_ORDER renumber the GPUs")
    _pci_order_unless_listed(os.environ)
    for name, opener, candidates in order:
        try:
            return opener(candidates()), notes
        except ProbeUnavailableError as e:
            notes.append(str(e))
            log.debug("%s probe skipped: %s", name, e)
    return open_host_probe(), notes


def nvml_numbering_matches(env: Mapping[str, str]) -> bool:
    """Whether NVML's device indices (all GPUs, PCI bus order) are CUDA's in this process."""
    listed = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    return not listed and env.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID") == "PCI_BUS_ID"


def _pci_order_unless_listed(env: MutableMapping[str, str]) -> None:
    # Without a list, number GPUs by PCI bus here as in the runners (and as NVML does); with a
    # list, its entries mean what the user's CUDA_DEVICE_ORDER says, so that stays as it is.
    if not env.get("CUDA_VISIBLE_DEVICES", "").strip():
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def runner_gpu_environment(index: int | Sequence[int], parent: Mapping[str, str]) -> dict[str, str]:
    """What a runner's environment needs for it to use GPU `index` (as residency's probe numbers
    it) and only that GPU — or those GPUs, given several (a model spread across them).

    Under a ``CUDA_VISIBLE_DEVICES`` list residency's indices are positions in the list, so the
    runner gets the list's entry (a number or a GPU UUID), which means the same GPU to it as to
    residency (same ``CUDA_DEVICE_ORDER``, inherited). Without a list indices are PCI bus order,
    and the runner is told to number GPUs that way too.
    """
    indices = [index] if isinstance(index, int) else list(index)
    listed = [d.strip() for d in parent.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if listed:
        for i in indices:
            if i >= len(listed):
                raise ConfigError(
                    f"GPU {i} is not in CUDA_VISIBLE_DEVICES={parent['CUDA_VISIBLE_DEVICES']}"
                )
        return {"CUDA_VISIBLE_DEVICES": ",".join(listed[i] for i in indices)}
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in indices),
        "CUDA_DEVICE_ORDER": parent.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
    }


def open_probe(
    backend: str = "auto", *, simulated_path: str | os.PathLike[str] | None = None
) -> MemoryProbe:
    """The probe for ``backend`` ("auto", "cuda", "nvml", "host" or "simulated").

    Raises ConfigError for an unknown backend and ProbeUnavailableError when the backend asked for
    cannot work here (no library, no device).
    """
    return select_probe(backend, simulated_path=simulated_path)[0]


@dataclass(frozen=True)
class DeviceInfo:
    """One device a probe sees, as ``residency devices`` lists it."""

    id: str
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    backend: str


def _device_id(backend: str, index: int) -> str:
    if backend == "host":
        return "host"
    if backend == "simulated":
        return f"sim:{index}"
    return f"cuda:{index}"


def discover_devices(probe: MemoryProbe | None = None) -> list[DeviceInfo]:
    """Every device ``probe`` (default: ``open_probe("auto")``) sees, with its memory now."""
    probe = probe if probe is not None else open_probe()
    devices = []
    for index in range(probe.device_count()):
        info = probe.query(index)
        devices.append(
            DeviceInfo(
                id=_device_id(probe.backend, index),
                index=index,
                name=probe.device_name(index),
                total_bytes=info.total_bytes,
                free_bytes=info.free_bytes,
                backend=probe.backend,
            )
        )
    return devices


# ------------------------------------------------------------------ `residency devices`


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _devices_command(args: argparse.Namespace) -> int:
    try:
        probe, notes = select_probe(args.backend, simulated_path=args.simulated_path)
        devices = discover_devices(probe)
    except (ProbeError, ConfigError) as e:
        print(f"residency devices: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"devices": [asdict(d) for d in devices], "skipped": notes}, indent=2))
        return 0
    rows = [("ID", "NAME", "BACKEND", "TOTAL", "FREE")]
    rows += [(d.id, d.name, d.backend, _gib(d.total_bytes), _gib(d.free_bytes)) for d in devices]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for note in notes:
        print(f"(skipped {note})")
    return 0


def add_devices_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``residency devices``."""
    p = sub.add_parser(
        "devices",
        help="list the devices models can be loaded into and their memory",
        description="List the devices the memory probe sees, with total and free memory.",
    )
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="memory probe (auto)")
    p.add_argument("--simulated-path", type=Path, help="a SimulatedDevice file (simulated probe)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_devices_command)
