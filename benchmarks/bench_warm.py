"""A real runner's load from a warm page cache against one from disk, and prefetch during a wait.

The embedded Gemma 3 270M GGUF is dropped from the page cache (``posix_fadvise(DONTNEED)``) or read
into it, each state verified with ``mincore`` before the runner starts; then llama-cpp-python's
server starts on it and its start → ready time is measured. The same run reads the file cold and
warm to measure disk and host (page-cache) bandwidth, and times a prefetch: a load that must wait
``--wait`` seconds (a queue, victims draining) with the file warmed during the wait, against the
same wait without. These are the simulator's calibration (``SimConfig.host_gb_per_s`` and
``engine_start_s``).

    python benchmarks/bench_warm.py [--quick] [--iterations 3] [--wait 1.0]

On a GPU machine the engine start grows (CUDA context, weight upload at PCIe speed, ≈ 1–3 s) and
large models make the read dominate: the warm/cold ratio then tends to disk ÷ host bandwidth.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from residency import pagecache
from residency.embedded import cache_dir, default_model_path
from residency.runners import LaunchSpec, LlamaCppPythonRunner

#: A state counts as verified when mincore sees at most / at least this share of the file.
COLD_MAX, WARM_MIN = 0.05, 0.95


def set_state(path: Path, warm: bool) -> float:
    """Puts ``path`` in the wanted state and returns the share mincore then sees in RAM."""
    if warm:
        pagecache.warm(path)
    else:
        pagecache.drop(path)
    share = pagecache.resident_bytes(path) / path.stat().st_size
    ok = share >= WARM_MIN if warm else share <= COLD_MAX
    if not ok:
        raise SystemExit(f"page cache: {path} is {share:.0%} resident, wanted warm={warm}")
    return share


def file_size(path: Path) -> int:
    return path.stat().st_size


def read_seconds(path: Path, warm: bool) -> float:
    set_state(path, warm)
    t0 = time.perf_counter()
    pagecache.warm(path)
    return time.perf_counter() - t0


async def runner_ready_s(path: Path) -> float:
    spec = LaunchSpec(
        name="warm", model_path=path, ctx=512, parallel=1, kv_type="f16", gpu_layers=0
    )
    runner = LlamaCppPythonRunner(spec)
    t0 = time.monotonic()
    try:
        await runner.start()
        await runner.wait_ready(300)
        return time.monotonic() - t0
    finally:
        await runner.stop()


async def waited_load_s(path: Path, wait_s: float, prefetch: bool) -> float:
    """A load that must wait ``wait_s`` first, from a dropped file: wait start → ready."""
    set_state(path, warm=False)
    t0 = time.monotonic()
    cancel = threading.Event()
    warming = asyncio.create_task(asyncio.to_thread(pagecache.warm, path, cancelled=cancel))
    if not prefetch:
        cancel.set()
    await asyncio.sleep(wait_s)
    cancel.set()
    await warming
    await runner_ready_s(path)
    return time.monotonic() - t0


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one iteration")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--wait", type=float, default=1.0, help="seconds a waiting load waits")
    args = parser.parse_args(argv)
    n = 1 if args.quick else max(1, args.iterations)
    # A private copy: the shared file may be mapped by other runners, and the kernel never drops
    # pages a process maps. The copy lives beside the models (a disk, not a tmpfs).
    source = default_model_path()
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="bench-warm-") as tmp:
        path = Path(tmp) / source.name
        shutil.copyfile(source, path)
        with path.open("rb+") as f:
            os.fsync(f.fileno())  # dirty pages cannot be dropped
        result = await measure(path, n, args.wait)
    for k, v in result.items():
        print(f"{k:<24}{v}")
    print(json.dumps(result))
    return 0


async def measure(path: Path, n: int, wait_s: float) -> dict[str, float | int]:
    size = file_size(path)
    cold_read, warm_read, cold_load, warm_load, plain, prefetched = [], [], [], [], [], []
    for _ in range(n):
        cold_read.append(read_seconds(path, warm=False))
        warm_read.append(read_seconds(path, warm=True))
        set_state(path, warm=False)
        cold_load.append(await runner_ready_s(path))
        set_state(path, warm=True)
        warm_load.append(await runner_ready_s(path))
        plain.append(await waited_load_s(path, wait_s, prefetch=False))
        prefetched.append(await waited_load_s(path, wait_s, prefetch=True))
    med = statistics.median
    disk_gbps = size / med(cold_read) / 1e9
    host_gbps = size / med(warm_read) / 1e9
    return {
        "model_bytes": size,
        "iterations": n,
        "load_cold_s": round(med(cold_load), 3),
        "load_warm_s": round(med(warm_load), 3),
        "warm_to_cold_ratio": round(med(warm_load) / med(cold_load), 3),
        "disk_gb_per_s": round(disk_gbps, 2),
        "host_gb_per_s": round(host_gbps, 2),
        "engine_start_s": round(max(0.0, med(warm_load) - size / (host_gbps * 1e9)), 3),
        "wait_s": wait_s,
        "waited_load_s": round(med(plain), 3),
        "waited_load_prefetch_s": round(med(prefetched), 3),
        "prefetch_ratio": round(med(prefetched) / med(plain), 3),
    }


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
