"""Estimator against llama.cpp on CUDA: llama-server's buffer report and the VRAM it really took.

Needs an NVIDIA GPU, NVML and a CUDA build of llama.cpp's ``llama-server`` (``--llama-server``).
For each model and option set, starts llama-server with the command line residency's
``llama-server`` runner builds (plus ``-lv 4``: at its default verbosity llama-server hides
llama.cpp's buffer lines), waits for /health, sends one prompt of ~1,500 tokens (so every
per-batch allocation has happened), and compares, in MiB:

- the estimate's GPU weights, KV cache and compute buffer with llama.cpp's ``CUDA0`` lines;
- the estimate's host share with llama.cpp's host lines (``CPU``, ``CPU_Mapped``, ``CUDA_Host``);
- the device's free-memory drop (NVML; this process holds no CUDA context) while the runner is up,
  after the prompt: its excess over the CUDA0 buffers is the per-runner overhead (CUDA context,
  kernels, cuBLAS, ggml's pool) that ``DEFAULT_GPU_OVERHEAD_BYTES`` stands for.

Models: generated GGUFs (tests/estimate_models.py) of several shapes, and the embedded Gemma 3
270M when it is present (or ``--gemma PATH``).

    python benchmarks/bench_gpu_estimate.py --llama-server build/bin/llama-server

Last line: one JSON object (per-component error percentages and the measured overheads).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf import GGMLQuantizationType

from estimate_models import write_llama
from gpu_common import Holder
from residency.estimate import estimate, read_model
from residency.estimate.measure import Measured, parse_buffers
from residency.memory import open_probe
from residency.runners import LaunchSpec, LlamaServerRunner

MIB = 1 << 20


def models(d: Path, gemma: Path | None) -> dict[str, Path]:
    out = {
        "llama-attn": write_llama(d / "llama-attn.gguf", n_head=16, n_head_kv=4, n_ff=512),
        "llama-ffn": write_llama(d / "llama-ffn.gguf", n_layer=3, n_head=4, n_head_kv=4, n_ff=8192),
        # Q8_0 rows of 640: ggml-cuda pads them to 1024 elements.
        "qwen2-q8": write_llama(
            d / "qwen2-q8.gguf",
            arch="qwen2",
            n_layer=6,
            n_embd=640,
            n_head=5,
            n_head_kv=1,
            n_ff=1792,
            n_vocab=8192,
            weight_type=GGMLQuantizationType.Q8_0,
            tied_output=True,
        ),
        "gemma3-swa": write_llama(
            d / "gemma3-swa.gguf",
            arch="gemma3",
            n_layer=7,
            n_head=8,
            n_ff=768,
            n_vocab=2048,
            sliding_window=256,
            tied_output=True,
        ),
        # A cache-heavy model: 32 layers, 8 KV heads of 128; weights ~0.3 GiB.
        "llama-kv": write_llama(
            d / "llama-kv.gguf",
            n_layer=32,
            n_embd=1024,
            n_head=8,
            n_head_kv=8,
            n_ff=1024,
            n_vocab=4096,
            ctx_train=131072,
        ),
    }
    if gemma is not None and gemma.is_file():
        out["gemma3-270m"] = gemma
    else:  # Gemma 3 270M's shapes (262k vocabulary, tied output, SWA), Q8_0 weights
        out["gemma3-270m"] = write_llama(
            d / "gemma3-270m-like.gguf",
            arch="gemma3",
            n_layer=18,
            n_embd=640,
            n_head=4,
            n_head_kv=1,
            head_dim=256,
            n_ff=2048,
            n_vocab=262144,
            ctx_train=32768,
            sliding_window=512,
            tied_output=True,
            weight_type=GGMLQuantizationType.Q8_0,
        )
    return out


def cases(names: dict[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if "gemma3-270m" in names:
        out += [
            ("gemma3-270m", {"ctx": 4096}),
            ("gemma3-270m", {"ctx": 32768}),
            ("gemma3-270m", {"ctx": 8192, "parallel": 4}),
            ("gemma3-270m", {"ctx": 8192, "kv_type": "q8_0"}),
            ("gemma3-270m", {"ctx": 8192, "gpu_layers": 9}),
            ("gemma3-270m", {"ctx": 8192, "gpu_layers": 18}),  # layers, not the output
        ]
    out += [
        ("llama-attn", {"ctx": 4096}),
        ("llama-attn", {"ctx": 32768}),
        ("llama-attn", {"ctx": 8192, "parallel": 4}),
        ("llama-ffn", {"ctx": 4096}),
        ("qwen2-q8", {"ctx": 8192}),
        ("qwen2-q8", {"ctx": 8192, "gpu_layers": 3}),
        ("gemma3-swa", {"ctx": 16384}),
        ("gemma3-swa", {"ctx": 16384, "kv_type": "q8_0"}),
        ("llama-kv", {"ctx": 16384}),
        ("llama-kv", {"ctx": 16384, "gpu_layers": 16}),
    ]
    return out


def nvml_handle() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None


def process_used(nvml: Any, pid: int) -> int | None:
    """The runner's own VRAM as NVML accounts it per process (None where it cannot)."""
    if nvml is None:
        return None
    pynvml, handle = nvml
    try:
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
    except Exception:
        return None
    return None


def estimate_options(opts: dict[str, Any]) -> dict[str, Any]:
    """What residency's scheduler passes the estimator for a llama-server model."""
    from residency.runners.llama import llama_server_estimate_options

    return llama_server_estimate_options(
        ctx=opts["ctx"], parallel=opts.get("parallel", 1), kv_type=opts.get("kv_type", "f16")
    )


def run_case(  # noqa: PLR0917
    binary: str, path: Path, opts: dict[str, Any], probe: Any, nvml: Any, log_dir: Path, tag: str
) -> dict[str, Any]:
    info = read_model(path)
    layers = opts.get("gpu_layers", -1)
    spec = LaunchSpec(
        name=tag,
        model_path=path,
        ctx=opts["ctx"],
        parallel=opts.get("parallel", 1),
        kv_type=opts.get("kv_type", "f16"),
        gpu_layers=layers,
        device="cuda:0",
        # -lv 4: llama.cpp's own INFO lines (the buffer sizes) are hidden at llama-server's default
        args=("-lv", "4"),
        binary=binary,
    )
    runner = LlamaServerRunner(spec)
    argv = runner.argv()
    log_path = log_dir / f"{tag}.log"
    free0 = probe.query(0).free_bytes
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=runner.environment()
        )
    try:
        url = f"http://127.0.0.1:{runner.port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{tag}: llama-server exited {proc.returncode}:\n"
                    + log_path.read_text()[-3000:]
                )
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"{tag}: not ready after 120 s")
            time.sleep(0.02)
        ready_s = time.monotonic() - t0
        free_ready = probe.query(0).free_bytes
        n_prompt = min(1500, opts["ctx"] - 16)
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(300, info.n_vocab, n_prompt)]
        r = httpx.post(
            url + "/completion",
            json={"prompt": prompt, "n_predict": 4, "cache_prompt": False},
            timeout=120,
        )
        r.raise_for_status()
        free_used = probe.query(0).free_bytes
        per_process = process_used(nvml, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    m = parse_buffers(text)
    est = estimate(
        path,
        device="gpu",
        gpu_layers="all" if layers < 0 else layers,
        **estimate_options(opts),
    )
    fa_lines = [ln.strip() for ln in text.splitlines() if "flash" in ln.lower()]
    return {
        "model": path.stem if tag.startswith(path.stem) else tag,
        "opts": opts,
        "measured": m,
        "estimate": est,
        "drop_ready": free0 - free_ready,
        "drop_used": free0 - free_used,
        "per_process": per_process,
        "ready_s": ready_s,
        "fa": " | ".join(fa_lines),
        "repack": "CPU_REPACK" in text,
    }


def gpu_kind(m: Measured, what: str) -> int:
    return sum(
        b
        for (dev, k), b in m.buffers.items()
        if k == what and dev.startswith("CUDA") and not dev.endswith("_Host")
    )


def host_total(m: Measured) -> int:
    return sum(
        b
        for (dev, _), b in m.buffers.items()
        if not (dev.startswith("CUDA") and not dev.endswith("_Host"))
    )


def pct(est: int, real: int) -> float | None:
    return None if real == 0 else round(100.0 * (est - real) / real, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", required=True, help="a CUDA build of llama-server")
    ap.add_argument("--gemma", type=Path, help="Gemma 3 270M GGUF (default: the embedded one)")
    ap.add_argument("--logs", type=Path, help="keep llama-server's logs here")
    ap.add_argument("--only", help="run only the cases of this model")
    ap.add_argument("--raw", type=Path, help="write the measurements as JSON (re-estimate later)")
    args = ap.parse_args()
    gemma = args.gemma
    if gemma is None:
        try:
            from residency.embedded import default_model_path

            gemma = default_model_path()
        except Exception:
            gemma = None
    probe = open_probe("nvml")
    nvml = nvml_handle()
    # What a bare CUDA context costs (a process that allocates 1 MiB through libcudart).
    free0 = probe.query(0).free_bytes
    holder = Holder(MIB)
    context_mib = (free0 - probe.query(0).free_bytes) / MIB - 1
    holder.exit()
    holder.reap()
    print(f"bare CUDA context + 1 MiB: {context_mib:.1f} MiB", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        log_dir = args.logs or d
        log_dir.mkdir(parents=True, exist_ok=True)
        names = models(d, gemma)
        for i, (name, opts) in enumerate(cases(names)):
            if args.only and name != args.only:
                continue
            row = run_case(
                args.llama_server, names[name], opts, probe, nvml, log_dir, f"{name}-{i}"
            )
            row["model"] = name
            rows.append(row)
            m, e = row["measured"], row["estimate"]
            gw, gk, gc = gpu_kind(m, "model"), gpu_kind(m, "KV"), gpu_kind(m, "compute")
            gpu_sum = gw + gk + gc + gpu_kind(m, "RS") + gpu_kind(m, "output")
            row["cmp"] = {
                "gpu_weights": (e.gpu_weights_bytes, gw),
                "gpu_kv": (e.gpu_kv_bytes, gk),
                "gpu_compute": (e.gpu_compute_bytes, gc),
                "gpu_buffers": (e.gpu_bytes - e.overhead_bytes, gpu_sum),
                "host": (e.host_bytes, host_total(m)),
            }
            row["overhead_ready"] = row["drop_ready"] - gpu_sum
            row["overhead_used"] = row["drop_used"] - gpu_sum
            cells = "  ".join(
                f"{k} {a / MIB:.1f}/{b / MIB:.1f} ({pct(a, b)}%)"
                for k, (a, b) in row["cmp"].items()
            )
            pp = row["per_process"]
            print(
                f"{name:<12} {json.dumps(opts):<40} {cells}  drop {row['drop_used'] / MIB:.1f}"
                f"  overhead {row['overhead_ready'] / MIB:.1f}->{row['overhead_used'] / MIB:.1f}"
                f"  per-process {None if pp is None else round(pp / MIB, 1)}"
                f"  ready {row['ready_s']:.2f}s  {row['fa']}  repack={row['repack']}",
                flush=True,
            )
            print(
                "   buffers:",
                {f"{dv}/{k}": round(b / MIB, 2) for (dv, k), b in m.buffers.items()},
                flush=True,
            )

    if args.raw:
        args.raw.write_text(
            json.dumps(
                [
                    {
                        "model": r["model"],
                        "opts": r["opts"],
                        "buffers": {f"{dv}/{k}": b for (dv, k), b in r["measured"].buffers.items()},
                        "drop_ready": r["drop_ready"],
                        "drop_used": r["drop_used"],
                        "per_process": r["per_process"],
                        "ready_s": r["ready_s"],
                        "fa": r["fa"],
                        "repack": r["repack"],
                    }
                    for r in rows
                ],
                indent=1,
            )
        )

    def errs(key: str) -> list[float]:
        return [abs(v) for r in rows if (v := pct(*r["cmp"][key])) is not None]

    overheads = [r["overhead_used"] / MIB for r in rows]
    result: dict[str, Any] = {"cases": len(rows), "bare_context_mib": round(context_mib, 1)}
    for key in ("gpu_weights", "gpu_kv", "gpu_compute", "gpu_buffers", "host"):
        e = errs(key)
        result[f"{key}_max_err_pct"] = round(max(e), 2) if e else None
        result[f"{key}_median_err_pct"] = round(statistics.median(e), 2) if e else None
    result["overhead_mib_median"] = round(statistics.median(overheads), 1)
    result["overhead_mib_max"] = round(max(overheads), 1)
    result["overhead_mib_min"] = round(min(overheads), 1)
    result["overhead_ready_mib_median"] = round(
        statistics.median(r["overhead_ready"] / MIB for r in rows), 1
    )
    pp = [r["per_process"] - r["cmp"]["gpu_buffers"][1] for r in rows if r["per_process"]]
    result["per_process_overhead_mib_median"] = (
        round(statistics.median(pp) / MIB, 1) if pp else None
    )
    result["gpu_total_with_overhead_max_err_pct"] = round(
        max(abs(100.0 * (r["estimate"].gpu_bytes - r["drop_used"]) / r["drop_used"]) for r in rows),
        2,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
