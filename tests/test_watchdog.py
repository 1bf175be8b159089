"""The watchdog (issue 14, item 7) on a real scheduler with fake runner processes: a blocked
event loop, a dead timer, a hung idle runner, thrash and queue timeouts turn /health red with the
reason, metrics count them, and /health turns green again once the failure has passed."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.api.app import create_app
from residency.config import ModelConfig, load_settings
from residency.errors import ServerBusyError
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, alive, eventually, fake_model

pytestmark = pytest.mark.timeout(60)

FAST = {
    "watchdog_interval_s": 0.05,
    "watchdog_loop_lag_s": 0.5,
    "watchdog_hold_s": 0.5,
    "stop_timeout_s": 2.0,
    "probe": "host",
}


def settings(models: list[ModelConfig], **kw: Any) -> Any:
    return load_settings(models=models, **{"memory_limit": 250 * MIB, **FAST, **kw})


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Any]:
    """make(models, **settings) → (scheduler, httpx client on the app); all stopped after."""
    stack: list[tuple[Scheduler, Any, httpx.AsyncClient]] = []

    async def make(models: list[ModelConfig], **kw: Any) -> tuple[Scheduler, httpx.AsyncClient]:
        s = settings(models, **kw)
        sched = Scheduler(s)
        app = create_app(s, scheduler=sched)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1")
        stack.append((sched, lifespan, client))
        return sched, client

    yield make
    for _sched, lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
    gc.collect()


def metric(sched: Scheduler, name: str, **labels: str) -> float:
    value = sched.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_blocked_event_loop_turns_health_red_then_green(
    served: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sched, client = await served([fake_model("a", tmp_path)])
    await asyncio.sleep(0.2)  # the watchdog's heartbeat and monitor are running
    time.sleep(1.5)  # noqa: ASYNC251 - the point: a blocking call stalls the event loop
    r = await client.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "unhealthy"
    assert "event loop" in r.json()["failures"]["event_loop"]
    assert metric(sched, "residency_watchdog_failures_total", check="event_loop") >= 1
    # The monitor thread logged where the loop was stuck while it was.
    assert "it is at:" in caplog.text
    assert "test_a_blocked_event_loop_turns_health_red_then_green" in caplog.text
    await eventually(lambda: sched.watchdog is not None and sched.watchdog.health().ok, 5)
    r = await client.get("/health")
    assert (r.status_code, r.json()) == (
        200,
        {"status": "ok", "failures": {}, "waiting": 0, "models_loaded": 0},
    )
    assert metric(sched, "residency_healthy") == 1


async def test_a_dead_decision_loop_is_reported(served: Any, tmp_path: Path) -> None:
    sched, client = await served([fake_model("a", tmp_path)])
    timer = sched._timer_task
    assert timer is not None
    timer.cancel()
    await asyncio.gather(timer, return_exceptions=True)
    await eventually(lambda: not sched.watchdog.health().ok, 5)  # type: ignore[union-attr]
    r = await client.get("/health")
    assert r.status_code == 503
    assert "timer task ended" in r.json()["failures"]["decision_loop"]


async def test_a_queued_request_times_out_with_503_and_retry_after(
    served: Any, tmp_path: Path
) -> None:
    """Room for one model: b waits while a is busy, and past queue_timeout_s it gets 503."""
    models = [fake_model("a", tmp_path, 200 * MIB), fake_model("b", tmp_path, 200 * MIB)]
    sched, client = await served(models, queue_timeout_s=0.5)
    async with sched.session("a"):
        t0 = time.monotonic()
        with pytest.raises(ServerBusyError, match=r"waited 0\.5 s in the queue for 'b'") as err:
            await sched.load("b")
        assert 0.5 <= time.monotonic() - t0 < 5
        assert err.value.retry_after_s == 1.0
        r = await client.post("/api/generate", json={"model": "b", "prompt": "hi", "stream": False})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "queue_timeout" in r.json()["error"]
    assert metric(sched, "residency_queue_timeouts_total", model="b") == 2
    health = await client.get("/health")
    assert health.status_code == 503
    assert "waited" in health.json()["failures"]["queue"]
    assert sched.engine.queued() == 0


async def test_thrash_is_detected(served: Any, tmp_path: Path) -> None:
    """Two models that do not fit together, asked for in turn: each load evicts the other."""
    models = [fake_model("a", tmp_path, 200 * MIB), fake_model("b", tmp_path, 200 * MIB)]
    sched, client = await served(models, thrash_reloads=3, thrash_window_s=60, watchdog_hold_s=30)
    for _ in range(3):
        await sched.load("a")
        await sched.load("b")
    health = (await client.get("/health")).json()
    assert "thrash" in health["failures"]
    assert "reloads of evicted models" in health["failures"]["thrash"]
    assert "a, b" in health["failures"]["thrash"]
    assert metric(sched, "residency_watchdog_failures_total", check="thrash") == 1


async def test_below_the_thrash_bound_all_is_well(served: Any, tmp_path: Path) -> None:
    models = [fake_model("a", tmp_path, 200 * MIB), fake_model("b", tmp_path, 200 * MIB)]
    sched, client = await served(models, thrash_reloads=10)
    for _ in range(2):
        await sched.load("a")
        await sched.load("b")
    assert "thrash" not in (await client.get("/health")).json()["failures"]


async def test_an_idle_runner_that_hangs_is_found_and_replaced(served: Any, tmp_path: Path) -> None:
    sched, client = await served(
        [fake_model("a", tmp_path)],
        idle_ping_interval_s=0.2,
        ping_timeout_s=0.3,
        watchdog_hold_s=30,
    )
    async with sched.session("a") as lease:
        pid = lease.runner.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # hangs while idle: nobody asks it anything
    try:
        await eventually(lambda: not alive(pid), 10, "the hung idle runner stopped")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    r = await client.get("/health")
    assert r.status_code == 503
    assert "a's idle runner stopped answering" in r.json()["failures"]["idle_runner"]
    assert metric(sched, "residency_runner_crashes_total", model="a") == 1
    async with sched.session("a") as lease:  # the next request gets a fresh runner
        assert lease.cold
        assert lease.runner.pid != pid
