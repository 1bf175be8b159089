"""Model swaps through residency against llama.cpp's own router (`llama-server --models-dir
--models-max 1`), interleaved in one run, with the same llama-server binary and the same models.

Two models — the embedded Gemma 3 270M and a tiny generated llama — and room for one: every
request for the other model is a swap (stop the resident runner, start the other, load, answer).
Each iteration, for each server in alternating order: swap to tiny, swap to Gemma, one warm
request to Gemma. Requests are OpenAI chat, 8 tokens, unstreamed; timed from send to the whole
answer. residency runs llama-server with KV persistence off, so both do the same work (the
router saves nothing).

    python benchmarks/bench_swap.py [--iterations 7] [--quick]

Last stdout line, one JSON object (medians, ms): residency_swap_p50_ms, router_swap_p50_ms,
swap_ratio_vs_router_p50 (residency / router over all swaps), the same per target model, warm
requests both ways and warm_ratio_vs_router_p50. Target: both ratios ≤ 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from estimate_models import write_llama
from residency.embedded import default_model_path
from residency.runners.build import find_llama_server

CTX = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(argv: list[str], log: Path, url: str, ready_path: str) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "RESIDENCY_"))}
    if os.environ.get("RESIDENCY_CACHE_DIR"):
        env["RESIDENCY_CACHE_DIR"] = os.environ["RESIDENCY_CACHE_DIR"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                sys.exit(f"{argv[0]} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{argv[0]} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chat(client: httpx.Client, url: str, model: str) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body, timeout=300)
    took = time.perf_counter() - t0
    assert r.status_code == 200, f"{url} {model}: {r.status_code} {r.text[:500]}"
    assert r.json()["choices"][0]["message"]["content"] is not None
    return took * 1e3


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="2 iterations")
    args = ap.parse_args()
    if args.quick:
        args.iterations = 2
    binary = find_llama_server()
    if binary is None:
        sys.exit("no llama-server: build it with scripts/build-llama-server.sh")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "models"
        models.mkdir()
        (models / "gemma.gguf").symlink_to(default_model_path())
        write_llama(models / "tiny.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
        config = tmp / "residency.toml"
        # The same runner flags both ways: residency's defaults (embeddings with mean pooling,
        # llama.cpp's built-in gemma template for GGUFs without one, no host prompt cache)
        # given to the router too.
        config.write_text(
            f'runner = "llama-server"\nllama_server = "{binary}"\nmax_loaded_models = 1\n'
            f'default_ctx = {CTX}\nkv_persist = false\nkeep_alive = "-1"\n'
            + "".join(
                f'[[models]]\nname = "{m}"\npath = "{models / m}.gguf"\nchat_format = "gemma"\n'
                for m in ("gemma", "tiny")
            )
        )
        res_port, router_port = free_port(), free_port()
        servers = {
            "residency": f"http://127.0.0.1:{res_port}",
            "router": f"http://127.0.0.1:{router_port}",
        }
        res_argv = [sys.executable, "-m", "residency", "serve", "--port", str(res_port),
                    "--config", str(config), "--log-level", "warning"]  # fmt: skip
        router_argv = [str(binary), "--models-dir", str(models), "--models-max", "1",
                       "--ctx-size", str(CTX), "--parallel", "1", "--host", "127.0.0.1",
                       "--embeddings", "--pooling", "mean", "--no-jinja", "--chat-template",
                       "gemma", "--cache-ram", "0",
                       "--port", str(router_port)]  # fmt: skip
        swaps: dict[tuple[str, str], list[float]] = {}
        warm: dict[str, list[float]] = {"residency": [], "router": []}
        with (
            process(res_argv, tmp / "residency.log", servers["residency"], "/"),
            process(router_argv, tmp / "router.log", servers["router"], "/health"),
            # A new connection per request: a kept-alive one may have idled out during the
            # other server's swap, and the same cost lands on both servers.
            httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client,
        ):
            for url in servers.values():
                chat(client, url, "gemma")  # warm-up: page cache, first-start costs
            for i in range(args.iterations):
                order = ["residency", "router"] if i % 2 == 0 else ["router", "residency"]
                for who in order:
                    url = servers[who]
                    for model in ("tiny", "gemma"):
                        swaps.setdefault((who, model), []).append(chat(client, url, model))
                    warm[who].append(chat(client, url, "gemma"))
                print(
                    f"iteration {i}: "
                    + ", ".join(f"{w} {m} {v[-1]:.0f} ms" for (w, m), v in swaps.items())
                    + f", warm residency {warm['residency'][-1]:.0f} ms, "
                    f"router {warm['router'][-1]:.0f} ms",
                    flush=True,
                )
    res_all = swaps[("residency", "tiny")] + swaps[("residency", "gemma")]
    router_all = swaps[("router", "tiny")] + swaps[("router", "gemma")]
    result = {
        "residency_swap_p50_ms": p50(res_all),
        "router_swap_p50_ms": p50(router_all),
        "swap_ratio_vs_router_p50": round(p50(res_all) / p50(router_all), 3),
        "residency_swap_to_tiny_p50_ms": p50(swaps[("residency", "tiny")]),
        "router_swap_to_tiny_p50_ms": p50(swaps[("router", "tiny")]),
        "residency_swap_to_gemma_p50_ms": p50(swaps[("residency", "gemma")]),
        "router_swap_to_gemma_p50_ms": p50(swaps[("router", "gemma")]),
        "residency_warm_p50_ms": p50(warm["residency"]),
        "router_warm_p50_ms": p50(warm["router"]),
        "warm_ratio_vs_router_p50": round(p50(warm["residency"]) / p50(warm["router"]), 3),
        "iterations": args.iterations,
        "target_ratio": 1.1,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
