"""Recovery on a real GPU: how late the driver shows freed VRAM, and how fast residency notices.

Needs an NVIDIA GPU with NVML and libcudart (cuda-python's wheels, or a toolkit). Each repetition:
a child process cudaMallocs ``--gib`` GiB and touches it; a sentinel process (its own busy loop, so
it never holds this process's GIL) arms on it; the child is SIGKILLed (``kill``: an evicted runner)
or exits on its own (``exit``: cudart destroys its context, as a stopped runner's does). Then:

- the sentinel timestamps the child's exit (its pidfd) and the first poll at which NVML and
  cudaMemGetInfo each show ≥ 75 % (Ollama's rule) and ≥ 99 % of the bytes back, ~0.2 ms apart;
- residency's watcher (``await Watcher.recovered`` on the real probe) and a 250 ms ticker applying
  Ollama's rule watch the same free side by side, both started at the kill.

Figures: driver lag = memory visible − process exit (the simulated device assumes 0.5–1.5 s);
detect = watcher (or ticker) completion − memory visible, on the watcher's probe; the probes'
cost per query; the watcher thread's CPU at its 6 ms poll cap on the real probe (a watch that
never completes, ``--cpu-seconds`` long). Also the probes' totals and free beside nvidia-smi's.

    python benchmarks/bench_gpu_recovery.py [--reps 25] [--gib 8] [--probe cuda|nvml]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import GIB, MIB, Holder, Sentinel, nvidia_smi
from residency.memory import MemoryProbe, discover_devices, open_probe, select_probe
from residency.watcher import RecoveryOutcome, Watcher

TICK_NS = 250_000_000
TIMEOUT_S = 5.0


def stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=float)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "min": round(float(a.min()), 3),
        "max": round(float(a.max()), 3),
        "n": len(samples),
    }


def probe_check() -> dict[str, Any]:
    """nvidia-smi, the NVML probe and the cuda probe read one after the other (MiB)."""
    smi = nvidia_smi()
    out: dict[str, Any] = {"nvidia_smi": smi}
    for backend in ("nvml", "cuda"):
        [dev] = discover_devices(open_probe(backend))[:1]
        out[backend] = {
            "name": dev.name,
            "total_mib": round(dev.total_bytes / MIB, 1),
            "free_mib": round(dev.free_bytes / MIB, 1),
        }
    out["nvidia_smi_after"] = nvidia_smi()
    _, skipped = select_probe("auto")
    out["auto_backend"] = select_probe("auto")[0].backend
    out["auto_skipped"] = skipped
    return out


def query_cost_us(probe: MemoryProbe, n: int = 2000) -> float:
    probe.query(0)
    t0 = time.perf_counter()
    for _ in range(n):
        probe.query(0)
    return round((time.perf_counter() - t0) / n * 1e6, 2)


async def ticker250(probe: MemoryProbe, free_before: int, expected: int, t0: int) -> int:
    """Ollama's waitForVRAMRecovery: check every 250 ms until 75 % of the bytes are back."""
    k = 1
    while k * TICK_NS <= TIMEOUT_S * 1e9:
        await asyncio.sleep(max(0, t0 + k * TICK_NS - time.monotonic_ns()) / 1e9)
        if probe.query(0).free_bytes - free_before >= 0.75 * expected:
            return time.monotonic_ns()
        k += 1
    raise AssertionError("the ticker never saw the memory come back")


async def one(
    w: Watcher, probe: MemoryProbe, sentinel: Sentinel, nbytes: int, mode: str
) -> dict[str, Any]:
    holder = await asyncio.to_thread(Holder, nbytes)
    free_before = await asyncio.to_thread(sentinel.arm, holder.pid, nbytes)
    fb = free_before[probe.backend]
    t_kill = time.monotonic_ns()
    if mode == "kill":
        holder.kill()
    else:
        holder.exit()

    async def watch() -> int:
        result = await w.recovered(
            probe,
            0,
            free_before=fb,
            expected_freed=nbytes,
            needed=1 << 62,  # only the 75 % rule can complete it, as for the ticker
            timeout_s=TIMEOUT_S,
        )
        assert result.outcome is RecoveryOutcome.RECOVERED, result
        return time.monotonic_ns()

    t_watch, t_tick = await asyncio.gather(watch(), ticker250(probe, fb, nbytes, t_kill))
    seen = await asyncio.to_thread(sentinel.result)
    await asyncio.to_thread(holder.reap)
    exit_ns = seen["exit_ns"]
    assert exit_ns is not None, seen
    row: dict[str, Any] = {"mode": mode, "exit_after_signal_ms": (exit_ns - t_kill) / 1e6}
    for name, t in seen["seen75_ns"].items():
        row[f"{name}_lag75_after_exit_ms"] = (t - exit_ns) / 1e6
    for name, t in seen["seen99_ns"].items():
        row[f"{name}_lag99_after_exit_ms"] = (t - exit_ns) / 1e6
    row["steps"] = seen["steps"]
    back = seen["seen75_ns"][probe.backend]
    row["detect_ms"] = (t_watch - back) / 1e6
    row["ticker250_ms"] = (t_tick - back) / 1e6
    row["watch_done_after_exit_ms"] = (t_watch - exit_ns) / 1e6
    return row


async def run(args: argparse.Namespace, probe: MemoryProbe, w: Watcher) -> list[dict[str, Any]]:
    sentinel = await asyncio.to_thread(Sentinel)
    rows = []
    try:
        for i in range(args.reps * 2):
            mode = "kill" if i % 2 == 0 else "exit"
            row = await one(w, probe, sentinel, int(args.gib * GIB), mode)
            rows.append(row)
            print(
                json.dumps(
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                ),
                flush=True,
            )
    finally:
        await asyncio.to_thread(sentinel.close)
    return rows


def watcher_cpu_at_cap(probe: MemoryProbe, seconds: float) -> dict[str, float]:
    """A watch that cannot complete: the thread polls at its cap for `seconds`."""
    with Watcher() as w:
        free = probe.query(0).free_bytes
        c0, q0, t0 = w.thread_cpu_s(), w.queries, time.monotonic()
        result = w.wait(
            probe, 0, free_before=free, expected_freed=1 << 60, needed=1 << 62, timeout_s=seconds
        )
        wall = time.monotonic() - t0
        assert result.outcome is RecoveryOutcome.TIMED_OUT, result
        cpu = w.thread_cpu_s() - c0
        polls = w.queries - q0
    return {
        "cpu_pct_of_core": round(100 * cpu / wall, 3),
        "cpu_us_per_poll": round(1e6 * cpu / max(polls, 1), 2),
        "polls_per_s": round(polls / wall, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=25, help="repetitions per mode (kill, exit)")
    ap.add_argument("--gib", type=float, default=8.0, help="GiB each child allocates")
    ap.add_argument("--probe", choices=("cuda", "nvml"), default="cuda", help="watcher's probe")
    ap.add_argument("--cpu-seconds", type=float, default=3.0)
    args = ap.parse_args()

    check = probe_check()
    print(json.dumps({"probe_check": check}), flush=True)
    probe = open_probe(args.probe)
    costs = {b: query_cost_us(open_probe(b)) for b in ("nvml", "cuda")}
    cpu = {b: watcher_cpu_at_cap(open_probe(b), args.cpu_seconds) for b in ("nvml", "cuda")}
    with Watcher() as w:
        rows = asyncio.run(run(args, probe, w))

    result: dict[str, Any] = {"probe": args.probe, "gib": args.gib}
    for mode in ("kill", "exit"):
        mine = [r for r in rows if r["mode"] == mode]
        result[mode] = {
            key: stats([r[key] for r in mine if key in r])
            for key in (
                "exit_after_signal_ms",
                "nvml_lag75_after_exit_ms",
                "cuda_lag75_after_exit_ms",
                "nvml_lag99_after_exit_ms",
                "cuda_lag99_after_exit_ms",
                "detect_ms",
                "ticker250_ms",
            )
        }
    result["detect_all"] = stats([r["detect_ms"] for r in rows])
    result["ticker250_all"] = stats([r["ticker250_ms"] for r in rows])
    result["query_us"] = costs
    result["watcher_at_cap"] = cpu
    result["probe_check"] = {
        "smi_total_mib": check["nvidia_smi"].get("memory.total"),
        "smi_free_mib": check["nvidia_smi"].get("memory.free"),
        "smi_reserved_mib": check["nvidia_smi"].get("memory.reserved"),
        "nvml_total_mib": check["nvml"]["total_mib"],
        "nvml_free_mib": check["nvml"]["free_mib"],
        "cuda_total_mib": check["cuda"]["total_mib"],
        "cuda_free_mib": check["cuda"]["free_mib"],
        "auto": check["auto_backend"],
    }
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
