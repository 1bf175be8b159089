"""Load: N concurrent chats over 6 fake models with room for 2 and a queue of 64, against a real
`residency serve` (tests/load_scenario.py), once with residency's queue (affinity) and once with
Ollama's discipline (one FIFO queue, one load at a time) as the in-run baseline.

Every request must end as 200 or 503 + Retry-After within the bound; the figures are throughput
(answers per second), served per second, p50/p99 of every answer and of the served ones.

Run: ``python benchmarks/bench_load.py [--quick] [--requests N]``.
Last line: {"requests", "affinity": {...}, "ollama": {...}, "served_ratio", "p99_ratio"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from load_scenario import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 requests (CI's smoke run)")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    n = 200 if args.quick else args.requests
    out: dict[str, object] = {"requests": n}
    figures_of: dict[str, dict[str, float]] = {}
    for queue in ("affinity", "ollama"):
        with tempfile.TemporaryDirectory() as tmp:
            result, after = run(Path(tmp), requests=n, models=6, room=2, max_queue=64, queue=queue)
        figures = result.figures()
        ok = (
            not result.errors
            and set(result.statuses) <= {200, 503}
            and result.busy_without_retry_after == 0
            and all(m["refcount"] == 0 for m in after["ps"])
        )
        if not ok:
            raise SystemExit(f"{queue}: {result.statuses} {result.errors[:3]} {after['ps']}")
        print(f"{queue:9s}", json.dumps(figures))
        out[queue] = figures_of[queue] = figures
    a, o = figures_of["affinity"], figures_of["ollama"]
    out["served_ratio"] = round(a["served"] / max(1, o["served"]), 2)
    out["p99_ratio"] = round(a["p99_ms"] / max(1.0, o["p99_ms"]), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
