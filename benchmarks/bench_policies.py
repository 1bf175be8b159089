"""Eviction and keep-alive policies compared on the real core by trace simulation.

Four scenarios (popularity α ∈ {0.7, 1.3} × inter-arrival CV ∈ {1, 4}), 12 models from 1.5 to
65 GB on one device whose budget is about a quarter of their total, 20,000 requests each, fixed
seeds, with Ollama's defaults (5 min keep-alive, 3 models per device). Every policy in
``policy_names()`` runs on the same traces, side by side. An offline bound shows how much any
eviction order could gain: Belady's rule (evict the model whose next request is furthest away) in a
plain cache model that knows the future.

Run: ``python benchmarks/bench_policies.py [--candidate gdsf] [--plot PATH]``.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from residency import policy_names
from residency.sim import SimConfig, SimResult, Trace, TraceConfig, make_trace, simulate

SCENARIOS = [(alpha, cv) for alpha in (0.7, 1.3) for cv in (1.0, 4.0)]
N_REQUESTS = 20_000
#: Requests per second over all models: enough traffic that some models are always wanted, little
#: enough that the rarest ones go idle for about the keep-alive window.
TOTAL_RATE = 0.1
TARGET_LOAD_REDUCTION_PCT = 30.0


def untimed_load_seconds(trace: Trace, max_models: int, belady: bool) -> float:
    """Load seconds in a plain cache model (instant loads, no queueing) that evicts either in
    Ollama's order (equal keep-alives, so by name) or by Belady's rule (furthest next request first,
    knowing the future). Their ratio bounds what any eviction order can gain on this trace."""
    sizes = [m.bytes for m in trace.models]
    cost = [m.load_seconds for m in trace.models]
    seq = trace.model.tolist()
    n = len(seq)
    next_use = [n] * n
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = seen.get(seq[i], n)
        seen[seq[i]] = i
    resident: dict[int, int] = {}  # model → index of its next request
    used = 0
    total = 0.0
    for i, m in enumerate(seq):
        if m not in resident:
            total += cost[m]
            while used + sizes[m] > trace.budget_bytes or len(resident) + 1 > max_models:
                if belady:
                    victim = max(resident, key=lambda k: resident[k])
                else:
                    victim = min(resident, key=lambda k: trace.models[k].key)
                used -= sizes[victim]
                del resident[victim]
            used += sizes[m]
        resident[m] = next_use[i]
    return total


def plot(rows: list[tuple[str, SimResult]], policies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(name for name, _ in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(policies)
    for ax, metric, label in (
        (axes[0], "load_seconds", "load seconds (total)"),
        (axes[1], "idle_gb_s", "idle resident memory (GB·s)"),
    ):
        for j, policy in enumerate(policies):
            values = [
                getattr(r, metric)
                for s in scenarios
                for name, r in rows
                if name == s and r.policy == policy
            ]
            xs = [k + (j - (len(policies) - 1) / 2) * width for k in range(len(scenarios))]
            ax.bar(xs, values, width, label=policy)
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"residency policies, {N_REQUESTS} requests per scenario (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", default="gdsf", help="policy measured against ollama")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "out" / "policies.png")
    parser.add_argument("--requests", type=int, default=N_REQUESTS)
    args = parser.parse_args(argv)
    policies = policy_names()
    if args.candidate not in policies:
        parser.error(f"unknown policy {args.candidate!r}; known: {', '.join(policies)}")
    sim = SimConfig()
    started = time.perf_counter()

    rows: list[tuple[str, SimResult]] = []
    summary = []
    header = (
        f"{'scenario':<14}{'policy':<17}{'loads':>7}{'load s':>10}{'Δload':>8}{'idle GB·s':>12}"
        f"{'Δidle':>8}{'p50 s':>7}{'p99 s':>8}{'p99×':>6}{'evict':>7}{'expire':>7}"
    )
    print(header)
    for seed, (alpha, cv) in enumerate(SCENARIOS):
        trace = make_trace(
            TraceConfig(
                alpha=alpha, cv=cv, n_requests=args.requests, total_rate=TOTAL_RATE, seed=seed
            )
        )
        name = f"a={alpha} cv={cv:g}"
        results = {p: simulate(trace, SimConfig(policy=p)) for p in policies}
        base = results["ollama"]
        for p in policies:
            r = results[p]
            # Every request is accounted for: served or refused, none lost in the simulation.
            assert r.served + r.rejected == r.requests == len(trace), r
            rows.append((name, r))
            print(
                f"{name:<14}{p:<17}{r.cold_loads:>7}{r.load_seconds:>10.0f}"
                f"{100 * (r.load_seconds / base.load_seconds - 1):>+7.1f}%"
                f"{r.idle_gb_s:>12.0f}{100 * (r.idle_gb_s / base.idle_gb_s - 1):>+7.1f}%"
                f"{r.ttft_p50_s:>7.1f}{r.ttft_p99_s:>8.1f}{r.ttft_p99_s / base.ttft_p99_s:>6.2f}"
                f"{r.evictions:>7}{r.expirations:>7}"
            )
        ollama_order = untimed_load_seconds(trace, sim.max_models, belady=False)
        belady = untimed_load_seconds(trace, sim.max_models, belady=True)
        bound_pct = 100 * (1 - belady / ollama_order)
        print(
            f"{name:<14}{'offline bound':<17}  Belady's order (knows the future) saves "
            f"{bound_pct:.1f}% of Ollama's load seconds in an untimed cache model"
        )
        c = results[args.candidate]
        summary.append(
            {
                "scenario": name,
                "load_seconds_reduction_pct": 100 * (1 - c.load_seconds / base.load_seconds),
                "idle_gbs_increase_pct": 100 * (c.idle_gb_s / base.idle_gb_s - 1),
                "ttft_p99_ratio": c.ttft_p99_s / base.ttft_p99_s,
                "offline_bound_reduction_pct": bound_pct,
            }
        )

    plot(rows, policies, args.plot)
    elapsed = time.perf_counter() - started
    print(f"plot: {args.plot}   elapsed: {elapsed:.1f} s   candidate: {args.candidate}")
    min_red = min(s["load_seconds_reduction_pct"] for s in summary)
    max_idle = max(s["idle_gbs_increase_pct"] for s in summary)
    p99_max = max(s["ttft_p99_ratio"] for s in summary)
    result = {
        "scenarios": summary,
        "candidate": args.candidate,
        "min_load_seconds_reduction_pct": round(min_red, 2),
        "max_idle_gbs_increase_pct": round(max_idle, 2),
        "ttft_p99_ratio_max": round(p99_max, 4),
        "targets_met": min_red >= TARGET_LOAD_REDUCTION_PCT and max_idle <= 0 and p99_max <= 1,
        "elapsed_s": round(elapsed, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
