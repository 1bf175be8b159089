"""Residency's defaults against the honest baseline: Ollama's queue and eviction plus the kernel's
page cache, replayed through the one scheduling engine.

Every scenario's trace goes through the engine the server runs (``residency.Engine``, driven by the
simulator on a virtual clock) twice, side by side. The baseline is Ollama as it really behaves on
Linux: ``queue=ollama`` (loaded models on a fast path, loads strictly FIFO, one at a time),
``policy=ollama`` eviction, and a kernel-LRU page cache of the host budget (llama.cpp maps model
files, so recently loaded files reload from RAM). The candidate is residency as it ships (the
server's own default settings): the affinity queue (requests for a loading or ready model never
wait behind other loads; a 60 s starvation deadline), the same eviction policy, and the core's
managed host tier (``HostTier``: which bytes of which files stay warm by decayed frequency, with
admission, and a prefetch while a load waits).

A load costs ``cached ÷ host bandwidth + uncached ÷ disk bandwidth + engine start``. Both share one
disk (sim.disk): concurrent loads split its bandwidth, a prefetch reads only while no load does —
so concurrency is never free, as it is not on a real NVMe. Host bandwidth
and the measured engine start come from ``benchmarks/bench_warm.py`` on this machine (a CPU runner:
its start is mostly the Python server's import; on a GPU machine add the CUDA context and the
upload at PCIe speed, ≈ 1–3 s). Configurations: disk 2 and 7 GB/s × host budget 2× and 3× the GPU
budget × engine start as measured and 2 s.

Scenarios: popularity α ∈ {0.7, 1.3} × inter-arrival CV ∈ {1, 4} (12 models, 1.5–65 GB, budget a
quarter of their total, Ollama's defaults: 5 min keep-alive, 3 models per device), plus three of
our own: on/off phases straddling the keep-alive, heavy traffic, and few large models. Ratios are
candidate ÷ baseline; the targets are the issue's, and ``targets_met`` says whether all are met.

``--policy tiered`` makes the candidate's GPU eviction tier-aware: among idle models with the same
keep-alive, the one whose file the host tier holds warm leaves first (its reload reads no disk),
then the least recently used.

Conversations (issue 13): a trace of multi-turn chats with growing context on small models
(0.25–4 GB, the size class the cost model is calibrated on: sim.conversations), replayed through
the candidate with KV persistence off (every turn on a new runner prefills its whole context, as
Ollama does) and on (the slots saved at the stop are restored). Reported under ``conversation_``.

Run: ``python benchmarks/bench_policies.py [--quick] [--policy gdsf|tiered]``. Last line: JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from typing import Any

from residency import policy_names
from residency.config import Settings
from residency.sim import SimConfig, SimResult, TraceConfig, make_trace, simulate

#: The candidate is residency as it ships: the server's own defaults, read from its settings.
_DEFAULTS = Settings.model_fields
CANDIDATE = {
    "queue": _DEFAULTS["queue"].default,
    "max_loads": _DEFAULTS["max_loads"].default,
    "starvation_s": _DEFAULTS["starvation_s"].default,
    "host_half_life_s": _DEFAULTS["host_cache_half_life_s"].default,
    "host_tier": "managed",
}
N_REQUESTS = 20_000
QUICK_REQUESTS = 2_000
#: Requests per second over all models: enough traffic that some models are always wanted, little
#: enough that the rarest ones go idle for about the keep-alive window.
TOTAL_RATE = 0.1

SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    *(
        (f"a={alpha} cv={cv:g}", {"alpha": alpha, "cv": cv})
        for alpha in (0.7, 1.3)
        for cv in (1.0, 4.0)
    ),
    # Bursts separated by idle periods around the keep-alive window.
    ("on/off", {"alpha": 1.0, "cv": 2.0, "on_mean_s": 120.0}),
    # Three times the traffic: queues form behind loads.
    ("heavy", {"alpha": 1.0, "cv": 2.0, "total_rate": 0.3}),
    # Six models of 10–65 GB: nearly every switch evicts.
    ("few large", {"alpha": 1.0, "cv": 1.0, "n_models": 6, "min_gb": 10.0}),
]

#: From ``python benchmarks/bench_warm.py --iterations 5`` on the 2-core dev machine with the
#: default runner (llama-server), the mean of two runs' medians (13.4 and 11.9 GB/s, 1.39 and
#: 1.52 s): page-cache read bandwidth and the engine's start once the file is read.
MEASURED_HOST_GB_PER_S = 12.6
MEASURED_ENGINE_START_S = 1.45
DISKS = (2.0, 7.0)
HOST_X = (2.0, 3.0)

#: The issue's targets: every scenario and configuration ("…_max"), geometric means per disk.
TARGETS = {
    "ttft_mean_ratio_max": 0.95,
    "ttft_p99_ratio_max": 0.95,
    "ttft_max_ratio_max": 1.05,
    "load_seconds_ratio_max": 1.05,
    "resident_gbs_ratio_max": 1.0,
    "ttft_mean_ratio_geomean_2gbps": 0.75,
    "ttft_p99_ratio_geomean_2gbps": 0.65,
    "ttft_mean_ratio_geomean_7gbps": 0.80,
    "ttft_p99_ratio_geomean_7gbps": 0.70,
}
RATIOS = {
    "ttft_mean": "ttft_mean_s",
    "ttft_p99": "ttft_p99_s",
    "ttft_max": "ttft_max_s",
    "load_seconds": "load_seconds",
    "resident_gbs": "resident_gb_s",
}


def row(name: str, label: str, r: SimResult) -> str:
    return (
        f"{name:<13}{label:<22}{r.cold_loads:>7}{r.load_seconds:>9.0f}{r.ttft_mean_s:>8.1f}"
        f"{r.ttft_p99_s:>8.1f}{r.ttft_max_s:>8.1f}{r.resident_gb_s / 1e3:>9.0f}"
        f"{r.host_hit_gb / 1e3:>8.1f}"
    )


#: The conversation trace: small models, chats of 8 turns on average adding ~400 tokens a turn.
CONVERSATIONS = {"alpha": 1.0, "cv": 2.0, "turns_mean": 8.0, "turn_tokens_mean": 400.0,
                 "min_gb": 0.25, "max_gb": 4.0, "n_models": 8, "total_rate": 0.1}  # fmt: skip


def conversations(n: int, policy: str, engine_start_s: float, host_gbps: float) -> dict[str, Any]:
    """The conversation trace with KV persistence off and on: first-token figures, both ways."""
    trace = make_trace(TraceConfig(n_requests=n, seed=11, disk_gb_per_s=2.0, **CONVERSATIONS))
    common = {"host_cache_x": 2.0, "host_gb_per_s": host_gbps, "engine_start_s": engine_start_s}
    runs = {
        persist: simulate(
            trace, SimConfig(policy=policy, kv_persist=persist, **CANDIDATE, **common)
        )
        for persist in (False, True)
    }
    print("\n-- conversations (disk 2 GB/s, host 2x): KV persistence off, on")
    for persist, r in runs.items():
        assert r.served + r.rejected == r.requests == len(trace), r
        print(row("conversation", "kv restore" if persist else "prefill", r)
              + f"  context {r.context_s:.0f} s ({r.context_prefills} prefills, "
              f"{r.context_restores} restores)")  # fmt: skip
    off, on = runs[False], runs[True]
    return {
        "conversation_ttft_mean_s_prefill": round(off.ttft_mean_s, 3),
        "conversation_ttft_mean_s_restore": round(on.ttft_mean_s, 3),
        "conversation_ttft_mean_ratio": round(on.ttft_mean_s / off.ttft_mean_s, 4),
        "conversation_ttft_p99_s_prefill": round(off.ttft_p99_s, 3),
        "conversation_ttft_p99_s_restore": round(on.ttft_p99_s, 3),
        "conversation_context_s_prefill": round(off.context_s, 1),
        "conversation_context_s_restore": round(on.context_s, 1),
        "conversation_cold_turns": off.context_prefills,
    }


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS} requests each")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--policy", default=_DEFAULTS["policy"].default,
                        help="the candidate's eviction policy")  # fmt: skip
    parser.add_argument(
        "--starvation",
        type=float,
        default=None,
        help="the candidate's starvation deadline, s (default: the server's)",
    )
    parser.add_argument("--host-gbps", type=float, default=MEASURED_HOST_GB_PER_S)
    parser.add_argument("--engine-start", type=float, default=MEASURED_ENGINE_START_S)
    args = parser.parse_args(argv)
    if args.policy not in policy_names():
        parser.error(f"unknown policy {args.policy!r}; known: {', '.join(policy_names())}")
    if args.starvation is not None:
        CANDIDATE["starvation_s"] = args.starvation
    n = args.requests or (QUICK_REQUESTS if args.quick else N_REQUESTS)
    started = time.perf_counter()
    print(
        f"{'scenario':<13}{'config':<22}{'loads':>7}{'load s':>9}{'mean s':>8}{'p99 s':>8}"
        f"{'max s':>8}{'res TB·s':>9}{'hit TB':>8}"
    )
    summary: list[dict[str, Any]] = []
    for disk, host_x, start in itertools.product(DISKS, HOST_X, (args.engine_start, 2.0)):
        config = f"disk {disk:g} GB/s, host {host_x:g}x, start {start:g} s"
        print(f"-- {config}")
        common = {"host_cache_x": host_x, "host_gb_per_s": args.host_gbps, "engine_start_s": start}
        baseline_cfg = SimConfig(policy="ollama", queue="ollama", host_tier="lru", **common)
        candidate_cfg = SimConfig(policy=args.policy, **CANDIDATE, **common)
        for seed, (name, overrides) in enumerate(SCENARIOS):
            params = {"total_rate": TOTAL_RATE, "disk_gb_per_s": disk, **overrides}
            trace = make_trace(TraceConfig(n_requests=n, seed=seed, **params))
            base = simulate(trace, baseline_cfg)
            cand = simulate(trace, candidate_cfg)
            for r in (base, cand):
                # Every request is accounted for: served or refused, none lost in the replay.
                assert r.served + r.rejected == r.requests == len(trace), r
            print(row(name, "ollama+lru", base))
            print(row(name, f"affinity+{args.policy}+tier", cand))
            entry: dict[str, Any] = {"scenario": name, "config": config, "disk": disk}
            for key, field in RATIOS.items():
                entry[key] = getattr(cand, field) / getattr(base, field)
            summary.append(entry)
    conversation = conversations(n, args.policy, args.engine_start, args.host_gbps)
    elapsed = time.perf_counter() - started
    print(f"\n{'scenario':<13}{'config':<34}" + "".join(f"{k + ' ×':>15}" for k in RATIOS))
    for e in summary:
        flags = "".join(f"{e[k]:>15.3f}" for k in RATIOS)
        print(f"{e['scenario']:<13}{e['config']:<34}{flags}")
    result: dict[str, Any] = {
        "configs": len(DISKS) * len(HOST_X) * 2,
        "scenarios": len(SCENARIOS),
    }
    for key in RATIOS:
        result[f"{key}_ratio_max"] = round(max(e[key] for e in summary), 4)
    for disk in DISKS:
        tag = f"{disk:g}gbps"
        for key in ("ttft_mean", "ttft_p99"):
            xs = [e[key] for e in summary if e["disk"] == disk]
            result[f"{key}_ratio_geomean_{tag}"] = round(geomean(xs), 4)
    # Where residency does not beat the baseline, by name: the honest part of the table.
    result["not_met"] = sorted(k for k, limit in TARGETS.items() if result[k] > limit)
    result["targets_met"] = not result["not_met"]
    result["requests_per_scenario"] = n
    result["candidate"] = f"affinity+{args.policy}+managed host tier"
    result.update(conversation)
    result["elapsed_s"] = round(elapsed, 1)
    print(f"elapsed {elapsed:.1f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
