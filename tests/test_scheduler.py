"""Scheduler tests with fake runners: real processes on loopback ports, budget by memory_limit."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from residency.config import ModelConfig, load_settings
from residency.errors import (
    InvalidArgumentError,
    ModelNotFoundError,
    ModelTooLargeError,
    RunnerError,
    ServerBusyError,
)
from residency.runners.http import TransportError
from residency.scheduler import Clock, Lease, Scheduler
from scheduler_helpers import MIB, ManualClock, alive, eventually, fake_model, group_members

pytestmark = pytest.mark.timeout(60)


def make_settings(models: list[ModelConfig], **kw: Any) -> Any:
    kw.setdefault("memory_limit", 250 * MIB)
    kw.setdefault("stop_timeout_s", 2.0)
    kw.setdefault("probe", "host")
    return load_settings(models=models, **kw)


@pytest.fixture
async def sched_factory() -> AsyncIterator[Any]:
    made: list[Scheduler] = []

    async def make(models: list[ModelConfig], clock: Clock | None = None, **kw: Any) -> Scheduler:
        s = Scheduler(make_settings(models, **kw), clock=clock)
        made.append(s)
        await s.start()
        return s

    yield make
    for s in made:
        await s.stop()
    gc.collect()  # a leaked transport or socket warns here, in the test that leaked it


async def chat(lease: Lease) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    r = await lease.client.post("/v1/chat/completions", body)
    assert r.status == 200, r.content
    return str(json.loads(r.content)["choices"][0]["message"]["content"])


def pid_of(lease: Lease) -> int:
    pid = lease.runner.pid
    assert pid is not None
    return pid


async def test_cold_load_then_warm_hit(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("a", tmp_path)])
    async with s.session("a") as lease:
        assert lease.cold
        assert lease.load_duration_ns > 0
        assert await chat(lease) == "reply from a"
        pid = pid_of(lease)
    async with s.session("a:latest") as lease:
        assert not lease.cold
        assert pid_of(lease) == pid
        assert await chat(lease) == "reply from a"
    [row] = s.resident()
    assert (row.name, row.state, row.refcount, row.context_length) == ("a", "ready", 0, 512)
    assert row.measured_bytes == 100 * MIB  # from the runner's buffer report
    assert s.core.stats("a").loads == 1


async def test_unknown_model_and_bad_options(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("a", tmp_path)])
    with pytest.raises(ModelNotFoundError, match=r"'nope' not found .*configured models: a"):
        async with s.session("nope"):
            pass
    with pytest.raises(InvalidArgumentError, match="num_ctx"):
        async with s.session("a", options={"num_ctx": -5}):
            pass
    with pytest.raises(InvalidArgumentError, match="keep_alive"):
        async with s.session("a", keep_alive="soon"):
            pass
    assert s.resident() == []


async def test_eviction_picks_the_idle_model_that_expires_first(
    sched_factory: Any, tmp_path: Path
) -> None:
    models = [fake_model(n, tmp_path) for n in ("a", "b", "c")]
    s = await sched_factory(models)
    async with s.session("a", keep_alive="1m") as la:
        pid_a = pid_of(la)
    async with s.session("b", keep_alive="10m") as lb:
        pid_b = pid_of(lb)
    async with s.session("c") as lc:  # 3 x 100 MiB > 250 MiB: one must go
        assert await chat(lc) == "reply from c"
        assert not alive(pid_a), "a expires first, so a is the victim"
        assert alive(pid_b)
    assert sorted(r.name for r in s.resident()) == ["b", "c"]
    assert s.core.devices()[0].reserved_bytes == 200 * MIB


async def test_keep_alive_expiry_on_an_injected_clock(sched_factory: Any, tmp_path: Path) -> None:
    clock = ManualClock()
    s = await sched_factory([fake_model("a", tmp_path)], clock=clock, keep_alive="10m")
    async with s.session("a") as lease:
        pid = pid_of(lease)
        clock.advance(3600)  # in use: never expires
        await asyncio.sleep(0.05)
        assert alive(pid)
    clock.advance(9 * 60)
    await asyncio.sleep(0.05)
    assert alive(pid)
    assert [r.name for r in s.resident()] == ["a"]
    [row] = s.resident()
    assert row.expires_at is not None
    clock.advance(61)
    await eventually(lambda: not alive(pid) and s.resident() == [], what="expiry")


async def test_keep_alive_zero_unloads_when_idle_and_negative_keeps_forever(
    sched_factory: Any, tmp_path: Path
) -> None:
    clock = ManualClock()
    s = await sched_factory([fake_model("a", tmp_path), fake_model("b", tmp_path)], clock=clock)
    async with s.session("a", keep_alive=0) as lease:
        pid_a = pid_of(lease)
        await asyncio.sleep(0.05)
        assert alive(pid_a), "0 unloads when the request ends, not before"
    await eventually(lambda: not alive(pid_a), what="keep_alive 0 unload")
    async with s.session("b", keep_alive=-1) as lease:
        pid_b = pid_of(lease)
    [row] = s.resident()
    assert row.expires_at is None
    clock.advance(10 * 365 * 24 * 3600)
    await asyncio.sleep(0.05)
    assert alive(pid_b)
    # Omitted keep_alive keeps the model's current value (forever), as in Ollama.
    async with s.session("b"):
        pass
    clock.advance(3600)
    await asyncio.sleep(0.05)
    assert alive(pid_b)


async def test_model_keep_alive_from_config(sched_factory: Any, tmp_path: Path) -> None:
    clock = ManualClock()
    s = await sched_factory([fake_model("a", tmp_path, keep_alive="30s")], clock=clock)
    async with s.session("a") as lease:
        pid = pid_of(lease)
    clock.advance(31)
    await eventually(lambda: not alive(pid), what="30 s keep-alive from the model's config")


async def test_option_change_reloads_and_a_larger_context_serves_smaller(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory([fake_model("a", tmp_path)])
    async with s.session("a") as lease:
        first = pid_of(lease)
        assert lease.ctx == 512
    async with s.session("a", options={"num_ctx": 1024}) as lease:
        second = pid_of(lease)
        assert lease.cold
        assert lease.ctx == 1024
    assert second != first
    assert not alive(first)
    async with s.session("a", options={"num_ctx": 256, "temperature": 0.1}) as lease:
        assert pid_of(lease) == second
        assert not lease.cold
        assert lease.ctx == 1024
    assert "--ctx 1024" in " ".join(lease.runner.argv())


async def test_reload_waits_for_the_busy_runner_to_go_idle(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory([fake_model("a", tmp_path)])
    async with s.session("a") as lease:
        first = pid_of(lease)
        bigger = asyncio.create_task(s.load("a", options={"num_ctx": 2048}))
        await asyncio.sleep(0.3)
        assert not bigger.done(), "must not kill a runner that is serving a request"
        assert await chat(lease) == "reply from a"
    reloaded = await asyncio.wait_for(bigger, 10)
    assert reloaded.ctx == 2048
    assert not alive(first)


async def test_queue_overflow_is_server_busy(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("a", tmp_path, 100 * MIB, "--load-s", "1")], max_queue=2)
    waiting = [asyncio.create_task(s.load("a")) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(ServerBusyError, match=r"max_queue 2") as info:
        async with s.session("a"):
            pass
    assert info.value.retry_after_s > 0
    await asyncio.gather(*waiting)
    async with s.session("a") as lease:  # the queue drained: served again
        assert not lease.cold


async def test_concurrent_requests_join_one_load(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("a", tmp_path, 100 * MIB, "--load-s", "0.5")])

    async def one() -> tuple[int, str]:
        async with s.session("a") as lease:
            return pid_of(lease), await chat(lease)

    results = await asyncio.gather(*(one() for _ in range(6)))
    assert len({pid for pid, _ in results}) == 1
    assert all(text == "reply from a" for _, text in results)
    assert s.core.stats("a").loads == 1
    assert s.core.reservation("a").refcount == 0


async def test_wait_until_the_busy_model_is_released(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("a", tmp_path), fake_model("b", tmp_path, 200 * MIB)])
    async with s.session("a") as la:
        pid_a = pid_of(la)
        b = asyncio.create_task(s.load("b"))
        await asyncio.sleep(0.3)
        assert not b.done(), "b fits only once a is idle"
        assert alive(pid_a)
        assert await chat(la) == "reply from a"
    lease_b = await asyncio.wait_for(b, 10)
    assert lease_b.cold
    assert not alive(pid_a)
    assert [r.name for r in s.resident()] == ["b"]


async def test_too_large_fails_precisely(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("huge", tmp_path, 300 * MIB), fake_model("a", tmp_path)])
    with pytest.raises(ModelTooLargeError, match=r"'huge' needs 300.0 MiB .*fits on no device"):
        await s.load("huge")
    async with s.session("a") as lease:  # still serving
        assert await chat(lease) == "reply from a"


async def test_pinned_models_are_never_evicted(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory(
        [fake_model("p", tmp_path, 200 * MIB, pinned=True), fake_model("a", tmp_path)]
    )
    async with s.session("p") as lease:
        pid_p = pid_of(lease)
    with pytest.raises(ModelTooLargeError):
        await s.load("a")
    assert alive(pid_p)


async def test_load_failure_fails_its_requests_and_frees_the_reservation(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory(
        [fake_model("bad", tmp_path, 100 * MIB, "--fail-load"), fake_model("a", tmp_path)]
    )
    results = await asyncio.gather(*(s.load("bad") for _ in range(3)), return_exceptions=True)
    for err in results:
        assert isinstance(err, RunnerError)
        assert "exit code 3 while loading" in str(err)
        assert "invalid magic number" in err.output_tail
    assert s.core.reservation("bad") is None
    assert s.core.devices()[0].reserved_bytes == 0
    async with s.session("a") as lease:
        assert await chat(lease) == "reply from a"


async def test_health_hang_times_out_by_stall_and_leaves_no_process(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory(
        [fake_model("hang", tmp_path, 100 * MIB, "--hang-health")], load_timeout="1s"
    )
    start = time.monotonic()
    with pytest.raises(RunnerError, match=r"made no progress for 1 s while loading") as info:
        await s.load("hang")
    assert time.monotonic() - start < 6
    assert "listening on" in info.value.output_tail
    assert s.resident() == []
    assert s.core.devices()[0].reserved_bytes == 0


async def test_a_slow_load_that_shows_progress_is_not_cut_short(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory(
        [fake_model("slow", tmp_path, 100 * MIB, "--load-s", "2")], load_timeout="1s"
    )
    lease = await s.load("slow")
    assert lease.load_duration_ns >= 2e9


async def test_one_slow_load_does_not_block_resident_models(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory(
        [fake_model("a", tmp_path), fake_model("slow", tmp_path, 100 * MIB, "--load-s", "2")]
    )
    await s.load("a")
    slow = asyncio.create_task(s.load("slow"))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    async with s.session("a") as lease:
        assert await chat(lease) == "reply from a"
    assert time.monotonic() - start < 0.5
    assert not slow.done()
    await slow


async def test_crash_mid_request_fails_that_request_only(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory(
        [fake_model("boom", tmp_path, 100 * MIB, "--crash-on-request"), fake_model("a", tmp_path)]
    )
    async with s.session("a"):
        pass
    async with s.session("boom") as lease:
        with pytest.raises(TransportError):
            await chat(lease)
        await eventually(lambda: not lease.alive, what="crash noticed")
        err = lease.error("chat failed")
        assert "exited (exit code 9)" in str(err)
        assert "simulated crash while serving" in err.output_tail
    assert s.core.reservation("boom") is None  # released by the crash, not by the lease
    assert [r.name for r in s.resident()] == ["a"]
    async with s.session("boom") as again:  # served by a fresh runner
        assert again.cold


async def test_a_wedged_idle_runner_fails_its_ping_and_is_replaced(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory(
        [fake_model("wedge", tmp_path, 100 * MIB, "--hang-after-s", "0.5")], ping_timeout_s=0.5
    )
    first = await s.load("wedge")
    await asyncio.sleep(1.2)  # idle for over a second: the next request pings it first
    start = time.monotonic()
    async with s.session("wedge") as lease:
        assert lease.cold, "the wedged runner was replaced by a fresh one"
        assert pid_of(lease) != pid_of(first)
        assert await chat(lease) == "reply from wedge"
    assert time.monotonic() - start < 5
    await eventually(lambda: not alive(pid_of(first)), what="the wedged runner killed")


async def test_a_busy_runner_is_not_pinged_nor_killed(sched_factory: Any, tmp_path: Path) -> None:
    # Its health endpoint stops answering after 0.5 s (as a runner saturated by generation may):
    # with a request in flight it is in use, so a new request must join it, not ping and kill it.
    s = await sched_factory(
        [fake_model("busy", tmp_path, 100 * MIB, "--hang-after-s", "0.5", "--request-s", "2")],
        ping_timeout_s=0.5,
    )
    first = await s.load("busy")

    async def long_request() -> str:
        async with s.session("busy") as lease:
            return await chat(lease)

    running = asyncio.create_task(long_request())
    await asyncio.sleep(1.2)
    async with s.session("busy") as lease:
        assert not lease.cold
        assert pid_of(lease) == pid_of(first)
        assert await chat(lease) == "reply from busy"
    assert await running == "reply from busy"


async def test_crash_while_idle_is_noticed_at_once(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("c", tmp_path, 100 * MIB, "--crash-after-s", "0.5")])
    lease = await s.load("c")
    await lease.runner.wait_exit()
    exited = time.monotonic()
    await eventually(lambda: s.core.reservation("c") is None, what="reservation freed")
    assert time.monotonic() - exited < 0.1
    assert "simulated crash" in lease.output_tail()


async def test_unload_now_when_idle_and_later_when_busy(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("a", tmp_path)])
    lease = await s.load("a")
    await s.unload("a")
    assert not alive(pid_of(lease))
    assert s.resident() == []
    async with s.session("a") as lease:
        await s.unload("a")
        assert alive(pid_of(lease))
        assert await chat(lease) == "reply from a"
    await eventually(lambda: not alive(pid_of(lease)), what="unload after the request")


async def test_a_cancelled_request_releases_its_reference(
    sched_factory: Any, tmp_path: Path
) -> None:
    s = await sched_factory([fake_model("a", tmp_path, 100 * MIB, "--load-s", "0.5")])
    task = asyncio.create_task(s.load("a"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: s.resident() != [] and s.resident()[0].state == "ready", what="load")
    assert s.core.reservation("a").refcount == 0


async def test_preload_at_start(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory([fake_model("a", tmp_path)], preload=["a"])
    await eventually(
        lambda: [(r.name, r.state) for r in s.resident()] == [("a", "ready")], what="preload"
    )


async def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    models = [
        fake_model("kids", tmp_path, 100 * MIB, "--child"),
        fake_model("stubborn", tmp_path, 100 * MIB, "--ignore-term"),
    ]
    s = Scheduler(make_settings(models, stop_timeout_s=1.0))
    await s.start()
    pgids = []
    for name in ("kids", "stubborn"):
        lease = await s.load(name)
        pgids.append(pid_of(lease))
    await eventually(lambda: len(group_members(pgids[0])) == 2, what="the child process")
    start = time.monotonic()
    await s.stop()
    await s.stop()  # idempotent
    assert time.monotonic() - start < 5
    for pgid in pgids:
        assert group_members(pgid) == [], f"process group {pgid} survived"
    assert os.getpgid(0) != pgids[0]


async def test_max_loaded_models_per_device(sched_factory: Any, tmp_path: Path) -> None:
    s = await sched_factory(
        [fake_model("a", tmp_path, 10 * MIB), fake_model("b", tmp_path, 10 * MIB)],
        max_loaded_models=1,
    )
    a = await s.load("a")
    await s.load("b")  # plenty of memory, but one model per device: a goes
    assert not alive(pid_of(a))
    assert [r.name for r in s.resident()] == ["b"]
