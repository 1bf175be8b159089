"""Recovery detection: residency's watcher thread against Ollama's 250 ms ticker, on the same frees.

Each recovery: a simulated device holds a model's bytes; they are freed and come back 0.5–1.5 s
later (uniformly random, like CUDA after a runner exits). Both watchers watch that same recovery
side by side — residency's C++ watcher (``await Watcher.recovered``) and a 250 ms ticker applying
Ollama's rule (``free − free_before ≥ 75 % of the freed bytes``) — and each one's detection delay is
the moment its ``await`` returned minus the moment the device really showed the memory (the
simulated device records it). Lanes run concurrently, one simulated device each, so ≥ 200
recoveries take ~15 s.

CPU: the watcher thread's own CPU clock (``pthread_getcpuclockid``) over the wall time of a phase in
which one recovery at a time is watched (the scheduler's normal case); the concurrent phase's figure
is reported too. ``--sweep`` prints detection delay and CPU for several poll caps — the measurement
behind the default schedule (1 ms, ×1.5 per poll, capped at 6 ms).

Last line: {"detect_p50_ms", "detect_p99_ms", "ticker250_p50_ms", "ticker250_p99_ms",
"cpu_pct_of_core", ...}. Targets: p50 ≤ 5 ms, p99 ≤ 20 ms, CPU ≤ 1 % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from residency.memory import SimulatedDevice
from residency.watcher import RecoveryOutcome, Watcher

GIB = 1 << 30
MODEL_BYTES = 6 * GIB
TOTAL_BYTES = 24 * GIB
LAG_S = (0.5, 1.5)
TICK_NS = 250_000_000
TIMEOUT_S = 5.0
T = TypeVar("T")


async def ticker250(dev: SimulatedDevice, free_before: int, expected: int, t0: int) -> int:
    """Ollama's waitForVRAMRecovery: check every 250 ms until 75 % of the bytes are back."""
    k = 1
    while k * TICK_NS <= TIMEOUT_S * 1e9:
        await asyncio.sleep(max(0, t0 + k * TICK_NS - time.monotonic_ns()) / 1e9)
        if dev.query(0).free_bytes - free_before >= 0.75 * expected:
            return time.monotonic_ns()
        k += 1
    raise AssertionError("the ticker never saw the memory come back")


async def one_recovery(
    w: Watcher, dev: SimulatedDevice, *, baseline: bool
) -> tuple[float, float | None]:
    """Frees a model's bytes and watches them come back: (watcher delay ms, ticker delay ms)."""
    handle = dev.allocate(MODEL_BYTES)
    free_before = dev.query(0).free_bytes
    t0 = time.monotonic_ns()
    dev.free(handle)
    [alloc] = [a for a in dev.allocations() if a.handle == handle]
    back = alloc.release_end_ns
    assert back is not None

    async def residency() -> int:
        result = await w.recovered(
            dev,
            0,
            free_before=free_before,
            expected_freed=MODEL_BYTES,
            needed=TOTAL_BYTES + 1,  # only the 75 % rule can complete it, as for the ticker
            timeout_s=TIMEOUT_S,
        )
        assert result.outcome is RecoveryOutcome.RECOVERED, result
        return time.monotonic_ns()

    if baseline:
        seen, ticked = await asyncio.gather(
            residency(), ticker250(dev, free_before, MODEL_BYTES, t0)
        )
    else:
        seen, ticked = await residency(), None
    assert seen >= back, "completed before the memory was back"
    return (seen - back) / 1e6, None if ticked is None else (ticked - back) / 1e6


async def run_lanes(
    w: Watcher, devices: list[SimulatedDevice], per_lane: int, *, baseline: bool
) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    ticker: list[float] = []

    async def lane(dev: SimulatedDevice) -> None:
        for _ in range(per_lane):
            a, b = await one_recovery(w, dev, baseline=baseline)
            ours.append(a)
            if b is not None:
                ticker.append(b)

    await asyncio.gather(*(lane(d) for d in devices))
    return ours, ticker


def pct(samples: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples), q)), 3)


def cpu_pct(w: Watcher, phase: Coroutine[Any, Any, T]) -> tuple[float, T]:
    """Runs `phase`; returns the watcher thread's CPU over its wall time (% of one core)."""
    cpu0, wall0 = w.thread_cpu_s(), time.monotonic()
    out = asyncio.run(phase)
    return 100.0 * (w.thread_cpu_s() - cpu0) / (time.monotonic() - wall0), out


def make_devices(root: Path, n: int, tag: str) -> list[SimulatedDevice]:
    return [
        SimulatedDevice.create(root / f"{tag}{i}.sim", TOTAL_BYTES, lag_s=LAG_S, seed=1000 + i)
        for i in range(n)
    ]


def sweep(root: Path, caps_ms: list[float]) -> None:
    """Detection delay and CPU for several poll caps: the trade-off the default schedule sits on."""
    print("max_poll_ms  detect_p50_ms  detect_p99_ms  cpu_pct_of_core  cpu_us_per_poll")
    for cap_ms in caps_ms:
        with Watcher(initial_poll_s=min(0.001, cap_ms / 1e3), max_poll_s=cap_ms / 1e3) as w:
            devs = make_devices(root, 20, f"sweep{cap_ms}-")
            ours, _ = asyncio.run(run_lanes(w, devs, 4, baseline=False))
            q0, c0 = w.queries, w.thread_cpu_s()
            cpu, _ = cpu_pct(w, run_lanes(w, devs[:1], 4, baseline=False))
            per_poll = 1e6 * (w.thread_cpu_s() - c0) / max(1, w.queries - q0)
        print(
            f"{cap_ms:>11}  {pct(ours, 50):>13}  {pct(ours, 99):>13}  {cpu:>15.3f}"
            f"  {per_poll:>15.1f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recoveries", type=int, default=250, help="side-by-side recoveries (≥ 200)")
    ap.add_argument("--lanes", type=int, default=25, help="recoveries in flight at once")
    ap.add_argument("--cpu-recoveries", type=int, default=6, help="one-at-a-time CPU phase")
    ap.add_argument(
        "--sweep", type=float, nargs="*", metavar="MS", help="first compare these poll caps (ms)"
    )
    ap.add_argument("--quick", action="store_true", help="a handful of recoveries: proves it runs")
    args = ap.parse_args()
    if args.quick:
        args.recoveries, args.lanes, args.cpu_recoveries = 8, 4, 2

    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        root = Path(tmp)
        if args.sweep is not None:
            sweep(root, args.sweep or [2, 4, 6, 8, 12, 16])
        per_lane = math.ceil(args.recoveries / args.lanes)
        with Watcher() as w:
            devices = make_devices(root, args.lanes, "lane")
            cpu_concurrent, (ours, ticker) = cpu_pct(
                w, run_lanes(w, devices, per_lane, baseline=True)
            )
            queries_before, cpu_before = w.queries, w.thread_cpu_s()
            cpu_single, _ = cpu_pct(
                w, run_lanes(w, devices[:1], args.cpu_recoveries, baseline=False)
            )
            us_per_poll = 1e6 * (w.thread_cpu_s() - cpu_before) / (w.queries - queries_before)
            initial_s, growth, max_s = w.poll_schedule
            schedule = {"initial_ms": initial_s * 1e3, "growth": growth, "max_ms": max_s * 1e3}

    result = {
        "detect_p50_ms": pct(ours, 50),
        "detect_p99_ms": pct(ours, 99),
        "ticker250_p50_ms": pct(ticker, 50),
        "ticker250_p99_ms": pct(ticker, 99),
        "cpu_pct_of_core": round(cpu_single, 3),
        "recoveries": len(ours),
        "detect_max_ms": round(max(ours), 3),
        "p50_speedup_vs_ticker": round(pct(ticker, 50) / max(pct(ours, 50), 1e-3), 1),
        f"cpu_pct_of_core_{args.lanes}_watches": round(cpu_concurrent, 3),
        "cpu_us_per_poll": round(us_per_poll, 2),
        "poll_schedule": schedule,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    # Issue 3's targets: a miss fails the run (after the numbers, so they are never lost).
    missed = [
        name
        for name, ok in (
            ("detect_p50_ms <= 5", result["detect_p50_ms"] <= 5),
            ("detect_p99_ms <= 20", result["detect_p99_ms"] <= 20),
            ("cpu_pct_of_core <= 1", result["cpu_pct_of_core"] <= 1),
        )
        if not ok
    ]
    if missed and not args.quick:  # a handful of samples says nothing about the targets
        sys.exit("missed: " + ", ".join(missed))


if __name__ == "__main__":
    main()
