"""A real runner's load from a warm page cache against one from disk, and prefetch during a wait.

The embedded Gemma 3 270M GGUF (a private copy) is dropped from the page cache
(``posix_fadvise(DONTNEED)``) or read into it, each state verified with ``mincore`` before the
runner starts; then the runner — llama.cpp's ``llama-server`` (residency's default) or
llama-cpp-python's server — starts on it and its start → ready time is measured, with what the
kernel counted for the runner process itself when it was ready (``/proc/PID/io`` ``read_bytes``:
bytes it caused to be read from storage; ``/proc/PID/stat`` majflt). The same run reads the file
dropped and warm to measure disk and host (page-cache) bandwidth, and times a prefetch: a load
that must wait ``--wait`` seconds (a queue, victims draining) with the file warmed during the wait,
against the same wait without. These are the simulator's calibration
(``SimConfig.host_gb_per_s`` and ``engine_start_s``: the warm start minus its read at host speed).

    python benchmarks/bench_warm.py [--runner llama-server|llama-cpp-python] [--quick]
        [--iterations 3] [--wait 1.0]

On a GPU machine the engine start grows (CUDA context, weight upload at PCIe speed, ≈ 1–3 s) and
large models make the read dominate: the warm/dropped ratio then tends to disk ÷ host bandwidth.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from residency import pagecache, proc_io
from residency.embedded import cache_dir, default_model_path
from residency.runners import LaunchSpec, LlamaCppPythonRunner, LlamaServerRunner, Runner
from residency.runners.build import find_llama_server

RUNNERS: dict[str, type[Runner]] = {
    "llama-server": LlamaServerRunner,
    "llama-cpp-python": LlamaCppPythonRunner,
}
#: A state counts as verified when mincore sees at most / at least this share of the file.
DROPPED_MAX, WARM_MIN = 0.05, 0.95
MB = 1e6


@dataclass(frozen=True)
class Start:
    """One runner start: start → ready, and the kernel's counters for the runner at ready."""

    ready_s: float
    read_bytes: int | None
    major_faults: int
    #: Share of the file in RAM (mincore) just before the runner started.
    warm_share: float


def set_state(path: Path, warm: bool) -> float:
    """Puts ``path`` in the wanted state and returns the share mincore then sees in RAM."""
    if warm:
        pagecache.warm(path)
    else:
        pagecache.drop(path)
    share = warm_share(path)
    ok = share >= WARM_MIN if warm else share <= DROPPED_MAX
    if not ok:
        raise SystemExit(f"page cache: {path} is {share:.0%} resident, wanted warm={warm}")
    return share


def file_size(path: Path) -> int:
    return path.stat().st_size


def warm_share(path: Path) -> float:
    return pagecache.resident_bytes(path) / file_size(path)


def read_seconds(path: Path, warm: bool) -> float:
    set_state(path, warm)
    t0 = time.perf_counter()
    pagecache.warm(path)
    return time.perf_counter() - t0


async def start_runner(kind: str, path: Path) -> Start:
    """Starts the runner on ``path`` as it is now, waits until ready, samples, stops."""
    share = warm_share(path)
    spec = LaunchSpec(
        name="warm", model_path=path, ctx=512, parallel=1, kv_type="f16", gpu_layers=0
    )
    runner = RUNNERS[kind](spec)
    t0 = time.monotonic()
    try:
        await runner.start()
        await runner.wait_ready(300)
        ready_s = time.monotonic() - t0
        assert runner.pid is not None
        reads = proc_io.storage_reads(runner.pid)  # before stop: the process must be alive
        return Start(ready_s, reads.read_bytes, reads.major_faults, share)
    finally:
        await runner.stop()


async def waited_load(kind: str, path: Path, wait_s: float, prefetch: bool) -> tuple[float, Start]:
    """A load that must wait ``wait_s`` first, from a dropped file: wait start → ready."""
    set_state(path, warm=False)
    t0 = time.monotonic()
    cancel = threading.Event()
    if not prefetch:
        cancel.set()  # the same task and thread, reading nothing: only the prefetch differs
    warming = asyncio.create_task(asyncio.to_thread(pagecache.warm, path, cancelled=cancel))
    await asyncio.sleep(wait_s)
    cancel.set()  # the load starts now, whatever the prefetch has read by then
    await warming
    start = await start_runner(kind, path)
    return time.monotonic() - t0, start


def median_or_none(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) and known else None


async def measure(kind: str, path: Path, n: int, wait_s: float) -> dict[str, object]:
    size = file_size(path)
    dropped_read: list[float] = []
    warm_read: list[float] = []
    starts: dict[str, list[Start]] = {"dropped": [], "warm": [], "waited": [], "prefetched": []}
    waited: dict[str, list[float]] = {"waited": [], "prefetched": []}
    for i in range(n):
        dropped_read.append(read_seconds(path, warm=False))
        warm_read.append(read_seconds(path, warm=True))
        # Alternating which state goes first: neither always runs in the same slot of an
        # iteration (a shared machine's load drifts, and a start just after a stop may differ).
        order = (False, True) if i % 2 == 0 else (True, False)
        for warm in order:
            set_state(path, warm)
            starts["warm" if warm else "dropped"].append(await start_runner(kind, path))
        for prefetch in order:
            state = "prefetched" if prefetch else "waited"
            total, start = await waited_load(kind, path, wait_s, prefetch)
            waited[state].append(total)
            starts[state].append(start)
    med = statistics.median
    disk_gbps = size / med(dropped_read) / 1e9
    host_gbps = size / med(warm_read) / 1e9
    ready = {state: med(s.ready_s for s in runs) for state, runs in starts.items()}
    result: dict[str, object] = {
        "runner": kind,
        "model_bytes": size,
        "iterations": n,
        "ready_dropped_s": round(ready["dropped"], 3),
        "ready_warm_s": round(ready["warm"], 3),
        "warm_vs_dropped_ratio": round(ready["warm"] / ready["dropped"], 3),
        "disk_gb_per_s": round(disk_gbps, 2),
        "host_gb_per_s": round(host_gbps, 2),
        # What is left of a warm start once its read (at page-cache speed) is taken out.
        "engine_start_s": round(max(0.0, ready["warm"] - size / (host_gbps * 1e9)), 3),
        "wait_s": wait_s,
        "waited_load_s": round(med(waited["waited"]), 3),
        "waited_load_prefetch_s": round(med(waited["prefetched"]), 3),
        "prefetch_ratio": round(med(waited["prefetched"]) / med(waited["waited"]), 3),
    }
    for state, runs in starts.items():
        result[f"in_ram_{state}"] = round(med(s.warm_share for s in runs), 3)
        result[f"read_bytes_{state}"] = median_or_none([s.read_bytes for s in runs])
        result[f"majflt_{state}"] = med(s.major_faults for s in runs)
    return result


#: The table's rows: (state, label, the result key of its start → ready seconds).
ROWS = (
    ("dropped", "dropped", "ready_dropped_s"),
    ("warm", "warm", "ready_warm_s"),
    ("waited", "wait", "waited_load_s"),
    ("prefetched", "wait+warm", "waited_load_prefetch_s"),
)


def table(result: dict[str, object]) -> str:
    lines = [f"{'start':<12}{'ready s':>9}{'in RAM':>8}{'read MB':>9}{'majflt':>8}"]
    for state, label, ready_key in ROWS:
        share = result[f"in_ram_{state}"]
        assert isinstance(share, float)
        read = result[f"read_bytes_{state}"]
        read_mb = f"{read / MB:.1f}" if isinstance(read, (int, float)) else "n/a"
        lines.append(
            f"{label:<12}{result[ready_key]:>9}{share:>8.0%}{read_mb:>9}"
            f"{result[f'majflt_{state}']:>8}"
        )
    keys = ("disk_gb_per_s", "host_gb_per_s", "engine_start_s", "warm_vs_dropped_ratio")
    lines += [f"{k:<24}{result[k]}" for k in (*keys, "prefetch_ratio")]
    return "\n".join(lines)


def runner_missing(kind: str) -> str | None:
    if kind == "llama-server" and find_llama_server() is None:
        return "no llama-server (build it: residency build-runner)"
    if kind == "llama-cpp-python" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    return None


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runner", choices=sorted(RUNNERS), default="llama-server")
    parser.add_argument("--quick", action="store_true", help="one iteration")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--wait", type=float, default=1.0, help="seconds a waiting load waits")
    args = parser.parse_args(argv)
    missing = runner_missing(args.runner)
    if missing:
        raise SystemExit(f"bench_warm: {missing}")
    n = 1 if args.quick else max(1, args.iterations)
    # A private copy: the shared file may be mapped by other runners, and the kernel never drops
    # pages a process maps. The copy lives beside the models (a disk, not a tmpfs).
    source = default_model_path()
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="bench-warm-") as tmp:
        path = Path(tmp) / source.name
        shutil.copyfile(source, path)
        with path.open("rb+") as f:
            os.fsync(f.fileno())  # dirty pages cannot be dropped
        result = await measure(args.runner, path, n, args.wait)
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
