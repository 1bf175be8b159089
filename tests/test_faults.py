"""The fault suite, fast half: real runner processes (tests/fake_runner.py) behind the real app,
hurt the ways runners get hurt — killed idle or mid-stream, stopped (hung) mid-request, failing
every load, a port already taken, a memory probe that errs. Each fault fails only the requests it
hit, with a clear message, frees the model's reservation, and the next request recovers.

The real llama-server and real GGUFs (corrupt, truncated) are in test_faults_llama_server.py.
Timings are printed (`pytest -s`) as the fault figures; they are asserted only as loose bounds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.api import create_app
from residency.config import ModelConfig
from residency.memory import SimulatedDevice
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, alive, eventually, fake_model
from serve_process import runner_pids
from test_scheduler import make_settings

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def served(
    models: list[ModelConfig], **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Scheduler]]:
    """The app over a real scheduler, reached in-process."""
    s = Scheduler(make_settings(models, **settings))
    app = create_app(s.settings, scheduler=s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=30
        ) as client:
            yield client, s
    gc.collect()


def pid_of(model: str) -> int:
    """The one live fake runner serving `model` (started by this process)."""
    pids = [p for p in runner_pids(os.getpid(), f"--name\0{model}\0".encode()) if alive(p)]
    assert len(pids) == 1, pids
    return pids[0]


async def generate(client: httpx.AsyncClient, model: str, **extra: Any) -> httpx.Response:
    return await client.post(
        "/api/generate", json={"model": model, "prompt": "hi", "stream": False, **extra}
    )


def figure(what: str, seconds: float) -> None:
    print(f"\nFAULT FIGURE {what}: {seconds * 1000:.0f} ms")


async def test_a_runner_killed_while_idle_is_replaced_for_the_very_next_request(
    tmp_path: Path,
) -> None:
    async with served([fake_model("a", tmp_path)]) as (client, s):
        assert (await generate(client, "a")).status_code == 200
        for _ in range(3):  # the request follows the kill at once: no time to notice the exit
            pid = pid_of("a")
            os.kill(pid, signal.SIGKILL)
            start = time.monotonic()
            r = await generate(client, "a")
            assert r.status_code == 200, r.text
            assert r.json()["response"].strip() == "reply from a"
            assert r.json()["load_duration"] > 0  # a fresh runner, loaded for it
            assert pid_of("a") != pid
            figure(
                "SIGKILL idle -> next request served by a fresh runner", time.monotonic() - start
            )
        assert [row.name for row in s.resident()] == ["a"]
        assert s.failing() == []  # each crash was followed by a served request: no streak


async def test_a_runner_killed_mid_stream_fails_that_stream_only(tmp_path: Path) -> None:
    models = [fake_model("a", tmp_path, 100 * MIB, "--chunk-s", "1"), fake_model("b", tmp_path)]
    async with served(models, memory_limit=400 * MIB) as (client, s):
        assert (await generate(client, "b")).status_code == 200
        assert (await generate(client, "a")).status_code == 200
        pid = pid_of("a")

        async def stream() -> list[dict[str, Any]]:
            body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post("/api/chat", json=body)
            assert r.status_code == 200
            return [json.loads(line) for line in r.text.splitlines() if line]

        task = asyncio.create_task(stream())
        await asyncio.sleep(0.5)  # the first chunk is out, the second one a second away
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        lines = await task
        figure("SIGKILL mid-stream -> the stream's error line", time.monotonic() - killed)
        assert lines[0]["message"]["content"] == "reply "
        assert "'a'" in lines[-1].get("error", ""), lines[-1]
        await eventually(lambda: s.core.reservation("a") is None, what="a's reservation freed")
        assert (await generate(client, "b")).json()["load_duration"] == 0  # b never noticed
        r = await generate(client, "a")
        assert r.status_code == 200
        assert r.json()["load_duration"] > 0


async def test_a_hung_runner_fails_its_request_with_504_and_is_replaced(tmp_path: Path) -> None:
    # Each request keeps the CPU busy for 1.5 s before answering (a prefill): longer than the
    # stall timeout, and never cut short for it. Stopped (SIGSTOP) mid-request, it stalls.
    model = fake_model("h", tmp_path, 100 * MIB, "--request-s", "1.5", "--spin")
    async with served([model], upstream_stall_timeout_s=0.5) as (client, s):
        r = await generate(client, "h")
        assert r.status_code == 200, r.text  # busy for 3 × the stall timeout: not a stall
        pid = pid_of("h")
        pending = asyncio.create_task(generate(client, "h"))
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        r = await pending
        noticed = time.monotonic() - stopped
        figure("SIGSTOP mid-request -> 504", noticed)
        assert r.status_code == 504, r.text
        assert "'h'" in r.json()["error"]
        assert "stalled" in r.json()["error"]
        assert noticed < 5
        await eventually(lambda: not alive(pid), 10, "the hung runner killed (SIGKILL)")
        figure("SIGSTOP mid-request -> runner gone", time.monotonic() - stopped)
        await eventually(lambda: s.core.reservation("h") is None, what="its reservation freed")
        r = await generate(client, "h")
        assert r.status_code == 200
        assert r.json()["load_duration"] > 0  # a fresh runner
        [row] = s.resident()
        assert row.name == "h"


async def test_a_model_that_always_fails_backs_off_then_opens_its_circuit(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    models = [
        fake_model("bad", tmp_path, 100 * MIB, "--fail-load-while", str(broken)),
        fake_model("a", tmp_path),
    ]
    settings = {"failure_backoff_s": 0.3, "circuit_failures": 3, "circuit_cooldown_s": 1.0}
    async with served(models, **settings) as (client, s):
        for _ in range(2):  # the 1st failure reloads at once; the 2nd backs off 0.3 s
            r = await generate(client, "bad")
            assert r.status_code == 502, r.text
            assert "exit code 3 while loading" in r.json()["error"]
        start = time.monotonic()
        r = await generate(client, "bad")  # waits out the backoff, fails a 3rd time: open
        assert r.status_code == 502
        assert time.monotonic() - start >= 0.3
        start = time.monotonic()
        r = await generate(client, "bad")
        figure("open circuit -> 503", time.monotonic() - start)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert "failed 3 times in a row" in r.json()["error"]
        assert "exit code 3 while loading" in r.json()["error"]  # the last failure's reason
        openai = await client.post(
            "/v1/chat/completions",
            json={"model": "bad", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert openai.status_code == 503, openai.text
        assert openai.json()["error"]["code"] == "model_failing"
        assert "retry-after" in openai.headers
        [failing] = (await client.get("/api/ps")).json()["failing"]
        assert failing["name"] == "bad:latest"
        assert (failing["state"], failing["failures"]) == ("open", 3)
        metrics = (await client.get("/metrics")).text
        assert 'residency_model_circuit_opens_total{model="bad"} 1.0' in metrics
        assert 'residency_model_consecutive_failures{model="bad",state="open"} 3.0' in metrics
        assert (await generate(client, "a")).status_code == 200  # other models unaffected
        assert s.core.reservation("bad") is None
        assert not runner_pids(os.getpid(), b"--name\0bad\0")

        broken.unlink()  # the cause is fixed: after the cool-down, the trial load succeeds
        await asyncio.sleep(1.0)
        assert (await client.get("/api/ps")).json()["failing"][0]["state"] == "half_open"
        r = await generate(client, "bad")
        assert r.status_code == 200, r.text
        assert (await client.get("/api/ps")).json()["failing"] == []  # closed


async def test_a_taken_port_fails_that_load_and_the_next_one_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from residency.runners import base

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    ports = iter([taken])
    real = base.free_port
    monkeypatch.setattr(base, "free_port", lambda: next(ports, None) or real())
    try:
        async with served([fake_model("a", tmp_path)]) as (client, s):
            r = await generate(client, "a")
            assert r.status_code == 502, r.text
            assert "exit code 1 while loading" in r.json()["error"]
            assert s.core.devices()[0].reserved_bytes == 0
            r = await generate(client, "a")  # on a free port
            assert r.status_code == 200, r.text
    finally:
        squatter.close()


async def test_memory_probe_errors_do_not_fail_requests(tmp_path: Path) -> None:
    sim = tmp_path / "gpu.sim"
    SimulatedDevice.create(sim, 1024 * MIB, lag_s=0.0)
    models = [fake_model(n, tmp_path, 600 * MIB, sim=sim) for n in ("a", "b")]
    async with served(models, memory_limit=None, simulated_device=sim) as (client, s):
        assert (await generate(client, "a")).status_code == 200
        SimulatedDevice.open(sim).fail_queries(-1, "NVML_ERROR_GPU_IS_LOST")
        r = await generate(client, "b")  # evicts a: the recovery wait cannot probe
        assert r.status_code == 200, r.text
        [row] = s.resident()
        assert row.name == "b"
        SimulatedDevice.open(sim).fail_queries(0, "")
        assert (await generate(client, "a")).status_code == 200
