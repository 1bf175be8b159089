"""Estimator accuracy against llama.cpp's own accounting, and the seed formula's beside it.

Loads the real Gemma 3 270M (and a few generated GGUFs of other shapes) in llama.cpp through
llama-cpp-python for a grid of options, parses the buffer sizes llama.cpp logs, and compares the
estimate's total with their sum. Prints a table, then one JSON line:
{"cases", "max_total_err_pct", "median_total_err_pct", "seed_formula_max_err_pct", ...}.
Target: every case within 5 % or 16 MiB (whichever is larger) of llama.cpp's sum.

    python benchmarks/bench_estimate.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from residency.embedded import default_model_path
from residency.estimate import estimate
from residency.estimate.measure import Measured, measure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from estimate_models import write_llama

MiB = 1 << 20
GRID = [
    {"ctx": ctx, "parallel": par, "kv_type": kv}
    for ctx in (2048, 8192, 32768)
    for par in (1, 4)
    for kv in ("f16", "q8_0")
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two small cases: proves it runs")
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        gemma = default_model_path()
        others = [
            write_llama(d / "llama-attn.gguf", n_head=16, n_head_kv=4, n_ff=512),
            write_llama(d / "llama-ffn.gguf", n_layer=3, n_head=4, n_head_kv=4, n_ff=8192),
            write_llama(
                d / "gemma3-swa.gguf",
                arch="gemma3",
                n_layer=7,
                n_head=8,
                n_ff=768,
                n_vocab=2048,
                sliding_window=256,
                tied_output=True,
            ),
        ]
        cases: list[tuple[Path, dict[str, Any]]] = [(gemma, g) for g in GRID]
        cases += [(gemma, {"ctx": 131072}), (gemma, {"ctx": 8192, "ubatch": 1024})]
        cases += [(m, {"ctx": c}) for m in others for c in (4096, 32768)]
        if args.quick:
            cases = [(gemma, GRID[0]), (others[0], {"ctx": 4096})]
        # Two children at a time: 2 cores; each one is at most ~3 GiB.
        with ThreadPoolExecutor(max_workers=2) as pool:
            measured: list[Measured] = list(pool.map(lambda c: measure(c[0], **c[1]), cases))

        rows = []
        for (path, opts), m in zip(cases, measured, strict=True):
            est = estimate(path, **opts)
            total = m.total_bytes
            err = 100.0 * (est.total_bytes - total) / total
            seed_err = 100.0 * (est.seed_formula_bytes - total) / total
            ok = abs(est.total_bytes - total) <= max(0.05 * total, 16 * MiB)
            rows.append((path.name, opts, est, m, err, seed_err, ok))

    print(
        f"{'model':<26} {'options':<42} {'weights':>15} {'KV':>15} {'compute':>17} "
        f"{'total':>17} {'err%':>6} {'seed%':>7}"
    )
    for name, opts, est, m, err, seed_err, ok in rows:

        def pair(a: int, b: int) -> str:
            return f"{a / MiB:.1f}/{b / MiB:.1f}"

        print(
            f"{name:<26} {json.dumps(opts):<42} {pair(est.weights_bytes, m.kind('model')):>15} "
            f"{pair(est.kv_bytes, m.kind('KV')):>15} "
            f"{pair(est.compute_bytes, m.kind('compute')):>17} "
            f"{pair(est.total_bytes, m.total_bytes):>17} {err:>+6.2f} {seed_err:>+7.1f}"
            + ("" if ok else "  OUT OF TARGET")
        )
    print("(estimate/measured MiB; err% = estimate vs llama.cpp's sum; seed% = the seed formula's)")
    errs = [abs(r[4]) for r in rows]
    result = {
        "cases": len(rows),
        "max_total_err_pct": round(max(errs), 3),
        "median_total_err_pct": round(statistics.median(errs), 3),
        "seed_formula_max_err_pct": round(max(abs(r[5]) for r in rows), 1),
        "within_target": sum(r[6] for r in rows),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(result))
    return 0 if all(r[6] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
