"""Queue disciplines compared by replaying traces through the one scheduling engine.

Every scenario's trace goes through the engine the server runs (``residency.Engine``, driven by the
simulator on a virtual clock) twice, side by side: the baseline is Ollama as it behaves —
``queue=ollama`` (loaded models on a fast path, loads strictly FIFO and one at a time) with
``policy=ollama`` eviction — and the candidate is residency's default (``queue=affinity``, same
eviction policy), so the difference is the queue discipline alone.

Scenarios: popularity α ∈ {0.7, 1.3} × inter-arrival CV ∈ {1, 4} (12 models, 1.5–65 GB, budget a
quarter of their total, 20,000 requests, Ollama's defaults: 5 min keep-alive, 3 models per device),
plus three of our own: on/off phases straddling the keep-alive, heavy traffic, and few large models.
Per scenario: load-seconds, TTFT (queueing + loading + waiting for a slot) p50/p99/max, idle and
resident GB·s, evictions. Ratios are candidate ÷ baseline.

Run: ``python benchmarks/bench_queue.py [--quick] [--policy gdsf]``. The last line is JSON. (No page
cache on either side: ``bench_policies.py`` adds the host tier against the honest baseline.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

# The same traces as bench_policies (its scenarios, sizes and rates), without the page cache.
from bench_policies import N_REQUESTS, QUICK_REQUESTS, SCENARIOS, TOTAL_RATE
from residency import policy_names
from residency.sim import SimConfig, SimResult, TraceConfig, make_trace, simulate

TARGETS = {
    "load_seconds_ratio_max": 1.01,
    "ttft_max_ratio_max": 1.0,
    "ttft_p99_ratio_max": 1.0,
    "ttft_p99_ratio_min": 0.5,
}


def row(name: str, label: str, r: SimResult) -> str:
    return (
        f"{name:<13}{label:<17}{r.cold_loads:>7}{r.load_seconds:>10.0f}{r.ttft_p50_s:>8.1f}"
        f"{r.ttft_p99_s:>8.1f}{r.ttft_max_s:>9.1f}{r.idle_gb_s / 1e3:>10.0f}"
        f"{r.resident_gb_s / 1e3:>10.0f}{r.evictions:>7}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS} requests each")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--policy", default="ollama", help="the candidate's eviction policy")
    args = parser.parse_args(argv)
    if args.policy not in policy_names():
        parser.error(f"unknown policy {args.policy!r}; known: {', '.join(policy_names())}")
    n = args.requests or (QUICK_REQUESTS if args.quick else N_REQUESTS)
    baseline_cfg = SimConfig(policy="ollama", queue="ollama")
    candidate_cfg = SimConfig(policy=args.policy, queue="affinity")
    started = time.perf_counter()
    print(
        f"{'scenario':<13}{'queue+policy':<17}{'loads':>7}{'load s':>10}{'p50 s':>8}{'p99 s':>8}"
        f"{'max s':>9}{'idle TB·s':>10}{'res TB·s':>10}{'evict':>7}"
    )
    summary = []
    for seed, (name, overrides) in enumerate(SCENARIOS):
        params = {"total_rate": TOTAL_RATE, **overrides}
        trace = make_trace(TraceConfig(n_requests=n, seed=seed, **params))
        base = simulate(trace, baseline_cfg)
        cand = simulate(trace, candidate_cfg)
        for r in (base, cand):
            # Every request is accounted for: served or refused, none lost in the replay.
            assert r.served + r.rejected == r.requests == len(trace), r
        print(row(name, "ollama+ollama", base))
        print(row(name, f"affinity+{args.policy}", cand))
        summary.append(
            {
                "scenario": name,
                "load_seconds_ratio": cand.load_seconds / base.load_seconds,
                "ttft_p50_ratio": cand.ttft_p50_s / base.ttft_p50_s,
                "ttft_p99_ratio": cand.ttft_p99_s / base.ttft_p99_s,
                "ttft_max_ratio": cand.ttft_max_s / base.ttft_max_s,
                "idle_gbs_ratio": cand.idle_gb_s / base.idle_gb_s,
                "evictions": [base.evictions, cand.evictions],
            }
        )
    elapsed = time.perf_counter() - started
    print(f"\n{'scenario':<13}{'load s ×':>10}{'p50 ×':>8}{'p99 ×':>8}{'max ×':>8}{'idle ×':>8}")
    for s in summary:
        print(
            f"{s['scenario']:<13}{s['load_seconds_ratio']:>10.3f}{s['ttft_p50_ratio']:>8.3f}"
            f"{s['ttft_p99_ratio']:>8.3f}{s['ttft_max_ratio']:>8.3f}{s['idle_gbs_ratio']:>8.3f}"
        )
    result: dict[str, Any] = {
        "scenarios": len(summary),
        "load_seconds_ratio_max": round(max(s["load_seconds_ratio"] for s in summary), 4),
        "ttft_p99_ratio_max": round(max(s["ttft_p99_ratio"] for s in summary), 4),
        "ttft_p99_ratio_min": round(min(s["ttft_p99_ratio"] for s in summary), 4),
        "ttft_max_ratio_max": round(max(s["ttft_max_ratio"] for s in summary), 4),
        "requests_per_scenario": n,
        "candidate": f"affinity+{args.policy}",
    }
    result["targets_met"] = (
        result["load_seconds_ratio_max"] <= TARGETS["load_seconds_ratio_max"]
        and result["ttft_max_ratio_max"] <= TARGETS["ttft_max_ratio_max"]
        and result["ttft_p99_ratio_max"] <= TARGETS["ttft_p99_ratio_max"]
        and result["ttft_p99_ratio_min"] <= TARGETS["ttft_p99_ratio_min"]
    )
    result["elapsed_s"] = round(elapsed, 1)
    print(f"elapsed {elapsed:.1f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
