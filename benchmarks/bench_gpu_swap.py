"""End-to-end swap on a real GPU: ``residency serve``, two llama-server models that cannot share it.

Needs an NVIDIA GPU and a CUDA build of ``llama-server``. Two entries serve one generated
cache-heavy GGUF (32 layers; ``--ctx`` sets its KV cache, 8 GiB at 65536). A ballast process holds
all of the GPU's memory except ~1.4 models' worth, and ``memory_limit`` lets residency budget one
model: every request for the other is a full swap — SIGKILL the resident runner, wait until the
GPU really shows its memory back (the recovery watcher on the real probe), start the other, serve.

Each iteration asks the other model through the Ollama API (``/api/generate``, 2 tokens) and
records its ``load_duration`` and the server's own phase log (victim stop, memory wait, start).

    python benchmarks/bench_gpu_swap.py --llama-server build/bin/llama-server

Last line: one JSON object (medians in ms).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_models import write_llama
from gpu_common import GIB, MIB, Holder
from residency.estimate import estimate
from residency.memory import open_probe
from residency.runners.llama import llama_server_estimate_options

_LOADED = re.compile(
    r"loaded (?P<key>\S+) on \S+ in (?P<total>[0-9.]+) s \(stop (?P<n>\d+) victims "
    r"(?:(?P<stop>[0-9.]+) ms|alongside the start), memory (?P<mem>[0-9.]+) ms, "
    r"start (?P<start>[0-9.]+) ms"
)
_RECOVERY = re.compile(
    r"recovery on \S+: (?P<outcome>\w+) after (?P<s>[0-9.]+) s \((?P<polls>\d+) polls"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=65536)
    ap.add_argument("--log", type=Path, help="keep the server's log here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        gguf = write_llama(
            d / "kv.gguf",
            n_layer=32,
            n_embd=1024,
            n_head=8,
            n_head_kv=8,
            n_ff=1024,
            n_vocab=4096,
            ctx_train=131072,
        )
        need = estimate(
            gguf,
            device="gpu",
            gpu_layers="all",
            **llama_server_estimate_options(ctx=args.ctx, parallel=1, kv_type="f16"),
        ).gpu_bytes
        port = 11500
        config = d / "residency.toml"
        config.write_text(
            f'port = {port}\nllama_server = "{args.llama_server}"\n'
            f'memory_limit = {int(need * 1.6)}\nkeep_alive = "-1"\n'
            + "".join(
                f'[[models]]\nname = "{n}"\npath = "{gguf}"\nrunner = "llama-server"\n'
                f"ctx = {args.ctx}\ngpu_layers = -1\n"
                for n in ("swap-a", "swap-b")
            )
        )
        log_path = args.log or d / "serve.log"
        nvml = open_probe("nvml")
        free0 = nvml.query(0).free_bytes
        with log_path.open("w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "residency", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        ballast: Holder | None = None
        rows: list[dict[str, Any]] = []
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + "/api/version", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            # The server's own CUDA context (the cuda probe) exists once it has read the device.
            time.sleep(1.0)
            server_ctx = free0 - nvml.query(0).free_bytes
            keep = int(1.4 * need)
            ballast_bytes = nvml.query(0).free_bytes - keep
            ballast = Holder(ballast_bytes)
            print(
                f"need {need / GIB:.2f} GiB per model, budget {need * 1.6 / GIB:.2f} GiB, "
                f"server context {server_ctx / MIB:.0f} MiB, ballast {ballast_bytes / GIB:.1f} GiB,"
                f" free {nvml.query(0).free_bytes / GIB:.2f} GiB",
                flush=True,
            )
            with httpx.Client(base_url=url, timeout=300) as client:
                for i in range(args.iterations + 1):
                    name = "swap-a" if i % 2 == 0 else "swap-b"
                    mark = log_path.stat().st_size
                    t0 = time.monotonic()
                    r = client.post(
                        "/api/generate",
                        json={
                            "model": name,
                            "prompt": "hello",
                            "stream": False,
                            "raw": True,
                            "options": {"num_predict": 2},
                        },
                    )
                    wall = time.monotonic() - t0
                    r.raise_for_status()
                    body = r.json()
                    time.sleep(0.2)  # the log lines of this swap are written by now
                    with log_path.open() as f:
                        f.seek(mark)
                        text = f.read()
                    loaded = _LOADED.search(text)
                    rec = _RECOVERY.search(text)
                    row: dict[str, Any] = {
                        "model": name,
                        "wall_ms": wall * 1e3,
                        "load_duration_ms": body.get("load_duration", 0) / 1e6,
                        "free_gib": nvml.query(0).free_bytes / GIB,
                    }
                    if loaded:
                        row.update(
                            victims=int(loaded["n"]),
                            stop_ms=float(loaded["stop"] or 0),
                            memory_ms=float(loaded["mem"]),
                            start_ms=float(loaded["start"]),
                        )
                    if rec:
                        row.update(
                            recovery=rec["outcome"],
                            recovery_ms=float(rec["s"]) * 1e3,
                            polls=int(rec["polls"]),
                        )
                    print(
                        json.dumps(
                            {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
                        ),
                        flush=True,
                    )
                    if i > 0:  # the first load has no victim
                        rows.append(row)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            if ballast is not None:
                ballast.exit()
                ballast.reap()
        tail = log_path.read_text().splitlines()[-5:]

    swaps = [r for r in rows if r.get("victims")]

    def med(key: str) -> float | None:
        v = [r[key] for r in swaps if key in r]
        return round(statistics.median(v), 1) if v else None

    result = {
        "swaps": len(swaps),
        "requests": len(rows),
        "swap_wall_p50_ms": med("wall_ms"),
        "load_duration_p50_ms": med("load_duration_ms"),
        "stop_p50_ms": med("stop_ms"),
        "memory_wait_p50_ms": med("memory_ms"),
        "recovery_p50_ms": med("recovery_ms"),
        "runner_start_p50_ms": med("start_ms"),
        "recovered": sum(r.get("recovery") == "RECOVERED" for r in swaps),
        "model_gib": round(need / GIB, 2),
        "ctx": args.ctx,
    }
    if not swaps:
        print("\n".join(tail))
    print(json.dumps(result))
    return 0 if swaps else 1


if __name__ == "__main__":
    raise SystemExit(main())
