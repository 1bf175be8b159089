"""The load scenario (issue 14): many concurrent requests over several models, more than fit,
against a real `residency serve` with fake runner processes and a bounded queue.

Used by tests/test_load.py (asserts nothing hangs, every answer is 200 or 503 + Retry-After, and
nothing leaks) and benchmarks/bench_load.py (reports throughput and latency percentiles).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from e2e_server import ServeProcess, serving
from serve_process import runner_pids, wait_until

FAKE_RUNNER = Path(__file__).with_name("fake_runner.py")
MIB = 1024 * 1024


@dataclass
class LoadResult:
    statuses: dict[int, int]
    latencies_s: list[float]
    served_latencies_s: list[float]
    wall_s: float
    #: 503s that lacked a Retry-After header (must be 0).
    busy_without_retry_after: int
    errors: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        served = sorted(self.served_latencies_s)
        every = sorted(self.latencies_s)

        def pct(xs: list[float], p: float) -> float:
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 1) if xs else 0.0

        return {
            "requests": len(self.latencies_s),
            "served": self.statuses.get(200, 0),
            "busy_503": self.statuses.get(503, 0),
            "other": sum(n for s, n in self.statuses.items() if s not in (200, 503)),
            "wall_s": round(self.wall_s, 2),
            "throughput_rps": round(len(every) / self.wall_s, 1),
            "served_rps": round(len(served) / self.wall_s, 1),
            "p50_ms": pct(every, 0.50),
            "p99_ms": pct(every, 0.99),
            "max_ms": pct(every, 1.0),
            "served_p50_ms": pct(served, 0.50),
            "served_p99_ms": pct(served, 0.99),
            "mean_ms": round(statistics.fmean(every) * 1e3, 1) if every else 0.0,
        }


def config(
    models: int, sim: Path, *, room: int, max_queue: int, queue: str, queue_timeout_s: float
) -> str:
    """`models` fake models of 100 MiB each on a simulated GPU with room for `room` of them."""
    from residency.memory import SimulatedDevice

    SimulatedDevice.create(sim, room * 100 * MIB + 10 * MIB, lag_s=0.02)
    text = (
        f'simulated_device = "{sim}"\nmax_queue = {max_queue}\nqueue = "{queue}"\n'
        f"queue_timeout_s = {queue_timeout_s}\nstop_timeout_s = 2.0\nmax_loaded_models = 8\n"
    )
    for i in range(models):
        command = [sys.executable, str(FAKE_RUNNER), "--port", "{port}", "--name", "{name}",
                   "--bytes", str(100 * MIB), "--ctx", "{ctx}", "--request-s", "0.01",
                   "--sim", str(sim)]  # fmt: skip
        text += (
            f'[[models]]\nname = "m{i}"\npath = "{FAKE_RUNNER}"\nrunner = "command"\n'
            f"ctx = 512\nmemory = {100 * MIB}\ncommand = {json.dumps(command)}\n"
        )
    return text


async def post(host: str, port: int, path: str, body: bytes) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 POST on its own connection (status, headers), body read to its end.

    A bare asyncio client: a pooled one (httpx) spends more CPU than the server under test once
    a thousand requests share its pool, which would measure the client."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json"
                f"\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        await reader.read()  # connection: close delimits the body
        return int(status_line.split()[1]), headers
    finally:
        writer.close()
        await writer.wait_closed()


async def fire(url: str, requests: int, models: int, timeout_s: float, seed: int = 0) -> LoadResult:
    """`requests` chats at once, each for a random model; every one bounded by `timeout_s`."""
    rng = random.Random(seed)
    targets = [f"m{rng.randrange(models)}" for _ in range(requests)]
    host, port = url.removeprefix("http://").split(":")
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    served: list[float] = []
    errors: list[str] = []
    bare_busy = 0
    start = asyncio.Event()

    async def one(model: str) -> None:
        nonlocal bare_busy
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                           "stream": False}).encode()  # fmt: skip
        await start.wait()
        t0 = time.monotonic()
        try:
            status, headers = await asyncio.wait_for(post(host, int(port), "/api/chat", body),
                                                     timeout_s)  # fmt: skip
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as err:
            errors.append(f"{model}: {err!r}")  # a hang past timeout_s lands here
            latencies.append(time.monotonic() - t0)
            return
        took = time.monotonic() - t0
        latencies.append(took)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            served.append(took)
        elif status == 503 and "retry-after" not in headers:
            bare_busy += 1

    tasks = [asyncio.create_task(one(m)) for m in targets]
    await asyncio.sleep(0.1)  # every task waits at the gate: they start together
    t0 = time.monotonic()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    return LoadResult(statuses, latencies, served, wall, bare_busy, errors)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> list[str]:
    """What the process has open (socket:[…] and anon_inode kinds without their numbers)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            out.append(link if link.startswith("anon") else link.split("[")[0])
        except OSError:
            continue
    return sorted(out)


def ps(srv: ServeProcess) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = httpx.get(srv.url + "/api/ps", timeout=10).json()["models"]
    return models


def unload_all(srv: ServeProcess) -> None:
    for m in ps(srv):
        r = httpx.post(srv.url + "/api/generate", json={"model": m["name"], "keep_alive": 0},
                       timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
    wait_until(lambda: not ps(srv), 30, "every model unloaded")
    wait_until(lambda: not runner_pids(srv.proc.pid, FAKE_RUNNER.name.encode()), 30, "runners gone")


def chat(srv: ServeProcess, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    r = httpx.post(srv.url + "/api/chat", json=body, timeout=30)
    assert r.status_code == 200, r.text


def warm_up(srv: ServeProcess, room: int) -> int:
    """Requests, an eviction (the recovery watcher's eventfd is made on the first) and unloads,
    so what is made once exists; returns the server's fd count then. Then `room` models are
    loaded: the load starts as a busy server would be, full."""
    for i in range(room + 1):
        chat(srv, f"m{i}")
    unload_all(srv)
    count = fds(srv.proc.pid)
    for i in range(room):
        chat(srv, f"m{i}")
    return count


def run(
    tmp: Path,
    *,
    requests: int,
    models: int,
    room: int,
    max_queue: int,
    queue: str = "affinity",
    queue_timeout_s: float = 20.0,
    timeout_s: float = 40.0,
) -> tuple[LoadResult, dict[str, Any]]:
    """The scenario on a fresh server; returns the result and what was left afterwards."""
    text = config(models, tmp / "gpu.sim", room=room, max_queue=max_queue, queue=queue,
                  queue_timeout_s=queue_timeout_s)  # fmt: skip
    with serving(tmp, text, start_timeout_s=60) as srv:
        fds_before = warm_up(srv, room)
        result = asyncio.run(fire(srv.url, requests, models, timeout_s))
        after = {"ps": ps(srv), "runners": runner_pids(srv.proc.pid, FAKE_RUNNER.name.encode())}
        after["health"] = httpx.get(srv.url + "/health", timeout=10).json()
        unload_all(srv)
        # The client's connections are closed: the server's sockets follow within a moment.
        deadline = time.monotonic() + 10
        while fds(srv.proc.pid) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        after["fds_before"], after["fds_after"] = fds_before, fds(srv.proc.pid)
        after["fd_kinds"] = fd_kinds(srv.proc.pid)
        after["log"] = srv.log_path.read_text(errors="replace")
    return result, after
