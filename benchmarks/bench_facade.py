"""Facade overhead: the same requests sent straight to the runner and through residency.

Starts `residency serve` (real llama-cpp-python runner, real Gemma 3 270M), warms the model, finds
the runner's port, then interleaves identical non-streaming requests to both targets:
- at 1 client (request pairs in random order), and at 32 concurrent clients (alternating rounds);
- time to first token of streamed chats, direct SSE vs residency's SSE passthrough;
- for reference, Ollama's /api/chat (translated, NDJSON) against the runner's own chat endpoint.

Added latency = percentile(through residency) − percentile(direct), both from the same run.
Any proxy pays for one more hop (two more socket writes and process wake-ups); as the in-run floor
for that, the same pairs also go through a byte-level TCP relay (no HTTP parsing at all) in its
own process, and `facade_over_relay_p50_ms` is what residency costs beyond the bare hop.
Last line: {"added_p50_ms", "added_p99_ms", "ttft_added_p50_ms", ...}. Target: added p50 ≤ 1 ms.

    python benchmarks/bench_facade.py [--pairs 200] [--rounds 6] [--ttft-pairs 60] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MODEL = "gemma3:270m"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say OK."}],
    "max_tokens": 1,
    "temperature": 0,
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used (its children, the runner, not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def relay(listen_port: int, target_port: int) -> None:
    """A byte-level TCP relay to the runner: the cheapest possible extra hop."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def start_relay(target: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--relay", str(port), target.rsplit(":", 1)[1]]
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("relay did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runner_port(server_pid: int) -> int:
    """The port of the llama_cpp.server child the server started (its --port argument)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and b"llama_cpp.server" in argv:
            return int(argv[argv.index(b"--port") + 1])
    raise RuntimeError("no runner process found")


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp / "residency.toml"
    # discover = false: the embedded Gemma, whatever models this machine holds.
    config.write_text('keep_alive = "-1"\ndefault_ctx = 1024\ndiscover = false\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "RESIDENCY_"))}
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "residency", "serve", "--port", str(port), "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**env, "RESIDENCY_LOG_LEVEL": "warning"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "server.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("residency serve did not start")


Send = Callable[[], Awaitable[float]]


def timed_post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Send:
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}

    async def send() -> float:
        t0 = time.perf_counter()
        r = await client.post(url, content=payload, headers=headers)
        r.read()
        elapsed = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
        return elapsed

    return send


def timed_first_token(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], *, sse: bool
) -> Send:
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}

    async def send() -> float:
        t0 = time.perf_counter()
        first = None
        async with client.stream("POST", url, content=payload, headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code}")
            async for line in r.aiter_lines():
                if first is None and _has_token(line, sse=sse):
                    first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError(f"{url}: no token in the stream")
        return first

    return send


def _has_token(line: str, *, sse: bool) -> bool:
    if sse:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return False
        choice = json.loads(line[6:]).get("choices") or [{}]
        return bool((choice[0].get("delta") or {}).get("content"))
    if not line.strip():
        return False
    return bool((json.loads(line).get("message") or {}).get("content"))


async def pairs(direct: Send, facade: Send, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n interleaved pairs at one client, order randomised per pair."""
    d: list[float] = []
    f: list[float] = []
    for _ in range(n):
        if random.random() < 0.5:
            d.append(await direct())
            f.append(await facade())
        else:
            f.append(await facade())
            d.append(await direct())
    return np.array(d), np.array(f)


async def concurrent_rounds(
    direct: Send, facade: Send, clients: int, rounds: int
) -> tuple[np.ndarray, np.ndarray]:
    """Alternating rounds of `clients` simultaneous requests to one target, then the other."""
    d: list[float] = []
    f: list[float] = []
    for i in range(rounds * 2):
        target, out = ((direct, d), (facade, f))[(i + (i // 2)) % 2]  # D F F D D F ...
        out.extend(await asyncio.gather(*(target() for _ in range(clients))))
    return np.array(d), np.array(f)


def added(d: np.ndarray, f: np.ndarray) -> dict[str, float]:
    p = lambda a, q: float(np.percentile(a, q)) * 1e3  # noqa: E731
    return {
        "direct_p50_ms": round(p(d, 50), 3),
        "facade_p50_ms": round(p(f, 50), 3),
        "added_p50_ms": round(p(f, 50) - p(d, 50), 3),
        "direct_p99_ms": round(p(d, 99), 3),
        "facade_p99_ms": round(p(f, 99), 3),
        "added_p99_ms": round(p(f, 99) - p(d, 99), 3),
        # Rounds and pairs are taken side by side: the median of their differences cancels the
        # machine's drift between them (a cross-check of added_p50_ms, which is the target).
        "paired_added_p50_ms": round(p(f - d, 50), 3),
        "n": len(d),
    }


async def bench(
    url: str, runner: str, relay_url: str, server_pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        direct = timed_post(client, runner + "/v1/chat/completions", CHAT)
        facade = timed_post(client, url + "/v1/chat/completions", CHAT)
        for _ in range(10):  # warm both paths and the runner's prompt cache
            await direct()
            await facade()
        cpu0 = cpu_seconds(server_pid)
        one = added(*await pairs(direct, facade, args.pairs))
        # The server's own CPU per request: robust against a noisy machine, unlike latency.
        one["server_cpu_ms_per_request"] = round(
            (cpu_seconds(server_pid) - cpu0) / args.pairs * 1e3, 3
        )
        print("1 client, /v1/chat/completions:", one, flush=True)

        via_relay = timed_post(client, relay_url + "/v1/chat/completions", CHAT)
        for _ in range(5):
            await via_relay()
        hop = added(*await pairs(direct, via_relay, args.pairs))
        print("1 client, through a bare TCP relay (the hop floor):", hop, flush=True)

        many = added(*await concurrent_rounds(direct, facade, 32, args.rounds))
        print("32 clients, /v1/chat/completions:", many, flush=True)

        stream = {**CHAT, "max_tokens": 4, "stream": True}
        ttft = added(
            *await pairs(
                timed_first_token(client, runner + "/v1/chat/completions", stream, sse=True),
                timed_first_token(client, url + "/v1/chat/completions", stream, sse=True),
                args.ttft_pairs,
            )
        )
        print("time to first token, SSE passthrough:", ttft, flush=True)

        ollama_body = {
            "model": MODEL,
            "messages": CHAT["messages"],
            "stream": False,
            "options": {"num_predict": 1, "temperature": 0},
        }
        ollama = added(
            *await pairs(
                direct, timed_post(client, url + "/api/chat", ollama_body), args.pairs // 2
            )
        )
        print("1 client, /api/chat (translated) vs the runner's chat:", ollama, flush=True)

        ollama_stream = {**ollama_body, "stream": True, "options": {"num_predict": 4}}
        ttft_ollama = added(
            *await pairs(
                timed_first_token(client, runner + "/v1/chat/completions", stream, sse=True),
                timed_first_token(client, url + "/api/chat", ollama_stream, sse=False),
                args.ttft_pairs,
            )
        )
        print("time to first token, /api/chat NDJSON:", ttft_ollama, flush=True)
    return {
        "added_p50_ms": one["added_p50_ms"],
        "added_p99_ms": one["added_p99_ms"],
        "ttft_added_p50_ms": ttft["added_p50_ms"],
        "direct_p50_ms": one["direct_p50_ms"],
        "paired_added_p50_ms": one["paired_added_p50_ms"],
        "relay_added_p50_ms": hop["added_p50_ms"],
        "facade_over_relay_p50_ms": round(one["added_p50_ms"] - hop["added_p50_ms"], 3),
        "server_cpu_ms_per_request": one["server_cpu_ms_per_request"],
        "c32_added_p50_ms": many["added_p50_ms"],
        "c32_added_p99_ms": many["added_p99_ms"],
        "c32_direct_p50_ms": many["direct_p50_ms"],
        "ollama_chat_added_p50_ms": ollama["added_p50_ms"],
        "ollama_ttft_added_p50_ms": ttft_ollama["added_p50_ms"],
        "pairs": args.pairs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ttft-pairs", type=int, default=60)
    parser.add_argument("--relay", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a handful of requests: proves it runs, measures little",
    )
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.rounds, args.ttft_pairs = 10, 1, 4
    if args.relay:
        asyncio.run(relay(*args.relay))
        return 0
    random.seed(1)
    with tempfile.TemporaryDirectory(prefix="bench-facade-") as tmp:
        proc, url = start_server(Path(tmp))
        try:
            warm = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=300)
            warm.raise_for_status()
            runner = f"http://127.0.0.1:{runner_port(proc.pid)}"
            relay_proc, relay_url = start_relay(runner)
            try:
                result = asyncio.run(bench(url, runner, relay_url, proc.pid, args))
            finally:
                relay_proc.terminate()
                relay_proc.wait(10)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    # The facade adds work to every request; it cannot be faster than the direct path by more
    # than the noise. A large negative number means the measurement is broken, not fast.
    assert result["added_p50_ms"] > -5, result
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
