"""Core decision latency through Python: 1,000 registered models, 100 resident on 8 devices.

Measures (each call timed on its own, medians and tails over many samples):
- hit: ``acquire`` + ``release`` of a resident model — the path every warm request takes;
- evict: ``admit`` of a model that fits only after the policy chooses victims;
and, as the in-run reference for both, an empty call into the same extension (the binding floor).

Last line: {"hit_p50_us", "hit_p99_us", "evict_p50_us", "evict_p99_us", ...}.
Targets: hit p50 ≤ 2 µs, evict p50 ≤ 20 µs.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import numpy as np

from residency import AdmitOutcome, Device, ResidentSet

GiB = 1 << 30
N_MODELS = 1_000
N_DEVICES = 8
N_RESIDENT = 100
MODEL_BYTES = 7 * GiB + GiB // 2  # 13 fit in a 100 GiB budget: every new admit must evict
KEEP_ALIVES = [60, 300, 600, 3600]


def build(policy: str) -> tuple[ResidentSet, list[str], list[str]]:
    # 4 × 13 + 4 × 12 = 100 slots: with 100 resident, every device is full.
    devices = [Device(f"gpu{i}", 101 * GiB, GiB, 13 if i < 4 else 12) for i in range(N_DEVICES)]
    rs = ResidentSet(devices, policy)
    keys = [f"model-{i:04d}" for i in range(N_MODELS)]
    # Register every model: each has been loaded and served once, so the core knows its history.
    for now, key in enumerate(keys, start=1):
        d = rs.admit(key, MODEL_BYTES, now, KEEP_ALIVES[now % 4] * 10**9)
        for victim in d.victims:
            rs.unloaded(victim)
        rs.loaded(key, now, 2.0)
        rs.acquire(key, now)
        rs.release(key, now)
    resident = [r.key for r in rs.snapshot()]
    assert len(resident) == N_RESIDENT
    cold = [k for k in keys if rs.reservation(k) is None]
    return rs, resident, cold


def percentile_us(samples_ns: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q)) / 1_000.0


def measure_hits(rs: ResidentSet, resident: list[str], n: int) -> list[int]:
    rng = random.Random(1)
    order = [rng.choice(resident) for _ in range(n)]
    clock = time.perf_counter_ns
    samples = []
    now = 10**12
    for key in order:
        now += 1
        t0 = clock()
        rs.acquire(key, now)
        rs.release(key, now)
        samples.append(clock() - t0)
    return samples


def measure_evictions(rs: ResidentSet, cold: list[str], n: int) -> list[int]:
    rng = random.Random(2)
    clock = time.perf_counter_ns
    samples = []
    now = 2 * 10**12
    for _ in range(n):
        now += 1
        key = rng.choice(cold)
        t0 = clock()
        d = rs.admit(key, MODEL_BYTES, now, 300 * 10**9)
        samples.append(clock() - t0)
        assert d.outcome is AdmitOutcome.LOAD, d
        assert d.victims, d
        # Keep the state steady: the victims leave, the newcomer loads, the set stays at 100.
        for victim in d.victims:
            rs.unloaded(victim)
            cold.append(victim)
        cold.remove(key)
        rs.loaded(key, now, 2.0)
    return samples


def measure_floor(rs: ResidentSet, n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        rs.reservation("")  # one locked map lookup: the cost of crossing the binding at all
        samples.append(clock() - t0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--policy", default="ollama")
    args = parser.parse_args()

    rs, resident, cold = build(args.policy)
    gc.disable()  # a collection in the middle of a 1 µs call is noise, not the core
    try:
        measure_hits(rs, resident, 2_000)  # warm up caches and the allocator
        hits = measure_hits(rs, resident, args.samples)
        floor = measure_floor(rs, args.samples)
        evictions = measure_evictions(rs, cold, max(args.samples // 5, 1_000))
    finally:
        gc.enable()
    assert all(r.refcount == 0 for r in rs.snapshot())

    result = {
        "policy": args.policy,
        "samples": len(hits),
        "hit_p50_us": round(percentile_us(hits, 50), 3),
        "hit_p99_us": round(percentile_us(hits, 99), 3),
        "evict_p50_us": round(percentile_us(evictions, 50), 3),
        "evict_p99_us": round(percentile_us(evictions, 99), 3),
        "binding_floor_p50_us": round(percentile_us(floor, 50), 3),
    }
    result["hit_over_floor_ratio"] = round(result["hit_p50_us"] / result["binding_floor_p50_us"], 2)
    print(
        f"acquire+release p50 {result['hit_p50_us']} µs (p99 {result['hit_p99_us']}); "
        f"admit with eviction p50 {result['evict_p50_us']} µs (p99 {result['evict_p99_us']}); "
        f"one binding call p50 {result['binding_floor_p50_us']} µs"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
