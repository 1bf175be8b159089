"""Core decision latency through Python: 1,000 registered models, 100 resident on 8 devices.

Measures (each call timed on its own, medians and tails over many samples):
- hit: ``acquire`` + ``release`` of a resident model — the path every warm request takes;
- evict: ``admit`` of a model that fits only after the policy chooses victims;
- arrival: the scheduling engine's ``arrive`` of a request that must queue, with 1,000 queued;
- release with grant: ``done`` of a busy model's last request, which lets the oldest queued request
  evict it and load (its Load, Stop and Grant actions), with 1,000 queued;
and, as the in-run reference, an empty call into the same extension (the binding floor).

Run: ``python benchmarks/bench_core.py [--quick]``.
Last line: {"hit_p50_us", "hit_p99_us", "evict_p50_us", "evict_p99_us", "arrival_p50_us",
"release_grant_p50_us", ...}. Targets: hit p50 ≤ 2 µs, evict, arrival and release-with-grant p50
≤ 20 µs.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import numpy as np

from residency import Action, ActionKind, AdmitOutcome, Device, Engine, LoadShape, ResidentSet

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


class QueueBench:
    """An engine with 100 resident models, each held busy by one request, and QUEUED requests for
    the other 900 waiting behind them (the oldest waits for a busy model to go idle)."""

    SHAPE = LoadShape(ctx=4096)

    def __init__(self, policy: str, queued: int) -> None:
        devices = [Device(f"gpu{i}", 101 * GiB, GiB, 13 if i < 4 else 12) for i in range(8)]
        self.engine = Engine(devices, policy, "affinity", max_queue=1 << 30)
        self.keys = [f"model-{i:04d}" for i in range(N_MODELS)]
        self.queued_target = queued
        self.ids = iter(range(1, 1 << 62))
        self.now = 1
        self.holders: dict[str, list[int]] = {}  # model → requests holding it
        self.loads: list[str] = []  # loads and stops to report back (done at once here)
        self.stops: list[str] = []
        for key in self.keys[:N_RESIDENT]:
            self.hold(key)
        self.cold = self.keys[N_RESIDENT:]
        self.rng = random.Random(3)
        while self.engine.queued() < queued:
            self.arrive()

    def run(self, actions: list[Action]) -> None:
        """Carries out actions the way a driver would, at once (untimed bookkeeping)."""
        for a in actions:
            if a.kind == ActionKind.GRANT:
                self.holders.setdefault(a.key, []).append(a.request)
            elif a.kind == ActionKind.LOAD:
                self.loads.append(a.key)
            elif a.kind == ActionKind.STOP:
                self.stops.append(a.key)

    def hold(self, key: str) -> None:
        self.now += 1
        self.run(self.engine.arrive(next(self.ids), key, self.SHAPE, MODEL_BYTES, -1, self.now))
        self.settle()

    def settle(self) -> None:
        while self.loads or self.stops:
            for key in self.stops:
                self.run(self.engine.gone(key, self.now))
                self.holders.pop(key, None)
            self.stops.clear()
            loads, self.loads = self.loads, []
            for key in loads:
                self.run(self.engine.ready(key, self.now, 2.0))

    def arrive(self) -> int:
        """One request for a model that is not resident: it queues. Returns its cost in ns."""
        self.now += 1
        key = self.rng.choice(self.cold)
        t0 = time.perf_counter_ns()
        actions = self.engine.arrive(next(self.ids), key, self.SHAPE, MODEL_BYTES, -1, self.now)
        cost = time.perf_counter_ns() - t0
        # It waits: at most the engine's advice to read its model's file ahead meanwhile.
        assert all(a.kind == ActionKind.PREFETCH for a in actions), actions
        return cost

    def release_with_grant(self) -> int:
        """The last request on a busy model ends: the oldest queued request evicts it and loads."""
        key = self.rng.choice(list(self.holders))
        *others, last = self.holders[key]
        for rid in others:  # untimed: the model stays busy until `last`
            self.run(self.engine.done(rid, self.now))
        self.holders[key] = [last]
        self.now += 1
        t0 = time.perf_counter_ns()
        actions = self.engine.done(last, self.now)
        cost = time.perf_counter_ns() - t0
        kinds = {a.kind for a in actions}
        assert {ActionKind.STOP, ActionKind.LOAD, ActionKind.GRANT} <= kinds, actions
        self.holders[key].clear()
        self.run(actions)
        self.settle()
        self.cold = [k for k in self.keys if k not in self.holders or not self.holders[k]]
        while self.engine.queued() < self.queued_target:
            self.arrive()
        return cost


def measure_queue(policy: str, n: int, queued: int) -> tuple[list[int], list[int]]:
    bench = QueueBench(policy, queued)
    arrivals, releases = [], []
    for _ in range(n):
        arrivals.append(bench.arrive())
        releases.append(bench.release_with_grant())
    assert bench.engine.queued() >= queued
    return arrivals, releases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="a few thousand samples")
    parser.add_argument("--policy", default="ollama")
    parser.add_argument("--queued", type=int, default=1_000)
    args = parser.parse_args()
    if args.quick:
        args.samples = 3_000

    rs, resident, cold = build(args.policy)
    gc.disable()  # a collection in the middle of a 1 µs call is noise, not the core
    try:
        measure_hits(rs, resident, 2_000)  # warm up caches and the allocator
        hits = measure_hits(rs, resident, args.samples)
        floor = measure_floor(rs, args.samples)
        evictions = measure_evictions(rs, cold, max(args.samples // 5, 1_000))
        arrivals, releases = measure_queue(args.policy, max(args.samples // 25, 500), args.queued)
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
        "queued": args.queued,
        "arrival_p50_us": round(percentile_us(arrivals, 50), 3),
        "arrival_p99_us": round(percentile_us(arrivals, 99), 3),
        "release_grant_p50_us": round(percentile_us(releases, 50), 3),
        "release_grant_p99_us": round(percentile_us(releases, 99), 3),
    }
    result["hit_over_floor_ratio"] = round(result["hit_p50_us"] / result["binding_floor_p50_us"], 2)
    print(
        f"acquire+release p50 {result['hit_p50_us']} µs (p99 {result['hit_p99_us']}); "
        f"admit with eviction p50 {result['evict_p50_us']} µs (p99 {result['evict_p99_us']}); "
        f"one binding call p50 {result['binding_floor_p50_us']} µs"
    )
    print(
        f"with {args.queued} queued: arrival p50 {result['arrival_p50_us']} µs "
        f"(p99 {result['arrival_p99_us']}); release with grant p50 "
        f"{result['release_grant_p50_us']} µs (p99 {result['release_grant_p99_us']})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
