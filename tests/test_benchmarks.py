"""Benchmarks cannot rot: each one runs in its quick mode and must finish with its JSON line.

Only that is asserted — a quick run measures too little to judge speed — so a change that breaks a
benchmark (an import, a renamed call, a changed signature) fails CI instead of the next person who
runs it. The GPU benchmarks (``bench_gpu_*``) need CUDA and are left out; a benchmark without a
``--quick`` mode yet is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from residency.runners.build import find_llama_server

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CPU_BENCHMARKS = sorted(
    p for p in BENCHMARKS.glob("bench_*.py") if not p.name.startswith("bench_gpu_")
)
#: Seconds one quick run may take on the 2-core CI machine (the slowest starts a real runner).
QUICK_LIMIT_S = 240
#: Benchmarks that start the real llama-cpp-python runner.
NEEDS_LLAMA_CPP = {"bench_facade.py", "bench_estimate.py"}
#: Benchmarks that start llama.cpp's llama-server (scripts/build-llama-server.sh builds it).
NEEDS_LLAMA_SERVER = {"bench_swap.py", "bench_kv_restore.py", "bench_cancel.py", "bench_warm.py"}


@pytest.mark.timeout(QUICK_LIMIT_S + 30)
@pytest.mark.parametrize("bench", CPU_BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_runs_in_quick_mode(bench: Path, tmp_path: Path) -> None:
    if "--quick" not in bench.read_text():
        pytest.skip(f"{bench.name} has no --quick mode yet")
    if bench.name in NEEDS_LLAMA_CPP and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(f"{bench.name} needs llama-cpp-python")
    if bench.name in NEEDS_LLAMA_SERVER and find_llama_server() is None:
        pytest.skip(f"{bench.name} needs llama-server (scripts/build-llama-server.sh)")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(bench), "--quick"],
        cwd=tmp_path,  # anything a benchmark writes beside itself by default stays out of the tree
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_LIMIT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{bench.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{bench.name} printed nothing"
    result = json.loads(lines[-1])
    assert isinstance(result, dict), f"{bench.name}'s last line is not a JSON object: {lines[-1]}"
