"""What noticing new or removed models on disk costs: an Ollama store of 100 models and a Hugging
Face cache of 20 repositories, built from tiny real GGUFs in a temporary directory.

Measures, in the same run:
- check: ``Discovery.fingerprint`` — the stat walk a listing or an unknown name pays at most every
  ``discover_interval_s`` to tell whether anything changed (the common case: nothing did);
- rescan: ``DiscoveredModels.refresh`` after one more ``ollama pull`` (the new file's header only);
- baseline: a full scan from nothing (every manifest parsed, every header read), what a naive
  "rescan on every listing" would pay.

Last line: {"models", "check_p50_ms", "rescan_p50_ms", "full_scan_p50_ms", "check_vs_full_scan"}.
``--quick`` (the test suite's run): 10 + 4 models and fewer repetitions, to show it still works.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from estimate_models import write_llama
from model_stores import write_hf_repo, write_ollama_model
from residency.catalog import DiscoveredModels
from residency.config import Settings
from residency.registry import make_entry

N_OLLAMA = 100
N_HF = 20


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    n_ollama, n_hf = (10, 4) if quick else (N_OLLAMA, N_HF)
    runs, checks, pulls = (2, 20, 2) if quick else (5, 200, 10)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shape = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_head_kv": 1}
        ggufs = [write_llama(tmp / f"m{i}.gguf", seed=i, **shape) for i in range(n_ollama + n_hf)]
        for i in range(n_ollama):
            write_ollama_model(tmp / "ollama", f"model{i}:q{i}", ggufs[i], params={"num_ctx": 2048})
        for i in range(n_hf):
            write_hf_repo(tmp / "hf", f"org/repo{i}", {f"r{i}-Q4_K_M.gguf": ggufs[n_ollama + i]})
        settings = Settings(discover=True, ollama_models=tmp / "ollama", hf_cache=tmp / "hf")

        full = []
        for _ in range(runs):
            t = time.perf_counter()
            found = DiscoveredModels(settings, make_entry)
            full.append(time.perf_counter() - t)
        models = len(found.entries())
        assert models == n_ollama + n_hf, models

        check = []
        for _ in range(checks):
            t = time.perf_counter()
            found._discovery.fingerprint()
            check.append(time.perf_counter() - t)

        now = [0.0]
        found = DiscoveredModels(settings, make_entry, clock=lambda: now[0])
        rescan = []
        for i in range(pulls):
            write_ollama_model(tmp / "ollama", f"pulled{i}:1b", ggufs[i])
            now[0] += 10
            t = time.perf_counter()
            assert found.refresh()
            rescan.append(time.perf_counter() - t)
        assert len(found.entries()) == models + pulls

    result = {
        "models": models,
        "check_p50_ms": _median_ms(check),
        "rescan_p50_ms": _median_ms(rescan),
        "full_scan_p50_ms": _median_ms(full),
        "check_vs_full_scan": round(statistics.median(check) / statistics.median(full), 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
