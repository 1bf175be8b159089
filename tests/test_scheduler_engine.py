"""The Scheduler as a driver of the core's engine: races, timings, and the differential test that
replays one trace through the simulator and through the real Scheduler (fake runners, virtual
clock) and compares the engine's actions one by one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from residency.config import load_settings
from residency.errors import ConfigError
from residency.scheduler import Lease, Scheduler
from residency.sim import ModelSpec, SimConfig, Trace, TraceConfig, simulate
from residency.sim.trace import GB
from scheduler_helpers import MIB, fake_model
from virtual_time import ARRIVE, NS, SERVED, FakeRunner, VirtualClock, fake_scheduler

pytestmark = pytest.mark.timeout(60)

GiB = 1 << 30


async def hold(
    s: Scheduler, clock: VirtualClock, model: str, at_s: float, for_s: float, *, kind: int = ARRIVE
) -> Lease:
    """A request for `model` arriving at `at_s` that keeps its lease `for_s` seconds."""
    await clock.sleep_until(round(at_s * NS), kind)
    async with s.session(model) as lease:
        await clock.sleep_until(clock.now_ns() + round(for_s * NS), SERVED)
    return lease


async def replay(s: Scheduler, clock: VirtualClock, *requests: Any) -> list[Lease]:
    await s.start()
    try:
        tasks = [
            asyncio.create_task(hold(s, clock, *r[:3], kind=r[3] if len(r) > 3 else ARRIVE))
            for r in requests
        ]
        await clock.run_until(lambda: all(t.done() for t in tasks))
        return [t.result() for t in tasks]
    finally:
        stopping = asyncio.create_task(s.stop())
        await clock.run_until(stopping.done)


async def test_a_request_joining_a_load_reports_its_real_wait(tmp_path: Path) -> None:
    clock = VirtualClock()
    s = fake_scheduler(tmp_path, {"a": (6 * GiB, 5.0)}, budget=8 * GiB, clock=clock)
    first, joined, warm = await replay(s, clock, ("a", 0, 1), ("a", 2, 1), ("a", 7, 1))
    assert (first.cold, first.load_duration_ns) == (True, 5 * NS)
    assert (joined.cold, joined.load_duration_ns, joined.queue_duration_ns) == (True, 3 * NS, 0)
    assert (warm.cold, warm.load_duration_ns) == (False, 0)


async def test_a_request_behind_a_busy_model_reports_its_queue_time(tmp_path: Path) -> None:
    clock = VirtualClock()
    models = {"a": (6 * GiB, 2.0), "b": (6 * GiB, 5.0)}
    s = fake_scheduler(tmp_path, models, budget=8 * GiB, clock=clock, lag_s=1.0)
    _, b = await replay(s, clock, ("a", 0, 10), ("b", 1, 1))
    # a is busy until 12; then a stops (1 s lag) and b loads (5 s): ready at 18.
    assert b.cold
    assert b.queue_duration_ns == 11 * NS
    assert b.load_duration_ns == 17 * NS


async def test_a_request_racing_its_models_eviction_waits_and_reloads(tmp_path: Path) -> None:
    clock = VirtualClock()
    models = {"a": (6 * GiB, 1.0), "b": (6 * GiB, 1.0)}
    s = fake_scheduler(tmp_path, models, budget=8 * GiB, clock=clock)
    # At 3 s, b's arrival makes idle a its victim; a's request comes in the same instant.
    leases = await replay(s, clock, ("a", 0, 1), ("b", 3, 1), ("a", 3, 1))
    assert [(x.model, x.cold) for x in leases] == [("a", True), ("b", True), ("a", True)]
    assert s.core.stats("a").loads == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(("kind", "reloads"), [(SERVED, False), (ARRIVE, True)])
async def test_a_request_at_the_instant_its_keep_alive_expires(
    tmp_path: Path, kind: int, reloads: bool
) -> None:
    """Before the timer ticks, the idle model serves it; after, it waits for the stop and
    reloads. Either way it is served."""
    clock = VirtualClock()
    s = fake_scheduler(tmp_path, {"a": (GiB, 2.0)}, budget=8 * GiB, clock=clock, keep_alive="10s")
    # Ready at 2, idle from 3, expires at 13; the second request arrives at exactly 13.
    _, late = await replay(s, clock, ("a", 0, 1), ("a", 13, 1, kind))
    assert late.cold is reloads
    assert s.core.stats("a").loads == (2 if reloads else 1)  # type: ignore[union-attr]


async def test_a_crashed_idle_runner_is_replaced(tmp_path: Path) -> None:
    clock = VirtualClock()
    runners: list[FakeRunner] = []
    s = fake_scheduler(tmp_path, {"a": (GiB, 1.0)}, budget=8 * GiB, clock=clock, runners=runners)

    async def crash_at(t: float) -> Lease:
        await clock.sleep_until(round(t * NS))
        runners[0].crash()
        assert s.core.reservation("a") is None  # freed at once: the process holds nothing
        return await hold(s, clock, "a", t, 1)

    await s.start()
    first = asyncio.create_task(hold(s, clock, "a", 0, 1))
    again = asyncio.create_task(crash_at(5))
    await clock.run_until(lambda: first.done() and again.done())
    assert again.result().cold
    assert len(runners) == 2
    stopping = asyncio.create_task(s.stop())
    await clock.run_until(stopping.done)


async def test_race_with_real_runner_processes(tmp_path: Path) -> None:
    """Two real runners, room for one: b evicts idle a while a's request arrives in the same
    loop turn. Both are served (before the engine, a got `model 'a' is unloading` → 500)."""
    models = [fake_model("a", tmp_path, 200 * MIB), fake_model("b", tmp_path, 200 * MIB)]
    settings = load_settings(models=models, memory_limit=250 * MIB, probe="host", stop_timeout_s=2)
    async with Scheduler(settings) as s:
        await s.load("a")
        b, a = await asyncio.wait_for(asyncio.gather(s.load("b"), s.load("a")), 30)
        assert (b.cold, a.cold) == (True, True)
        assert [r.name for r in s.resident()] == ["a"]


async def test_joined_load_timing_with_a_real_runner(tmp_path: Path) -> None:
    models = [fake_model("a", tmp_path, 100 * MIB, "--load-s", "0.6")]
    settings = load_settings(models=models, memory_limit=250 * MIB, probe="host", stop_timeout_s=2)
    async with Scheduler(settings) as s:
        first = asyncio.create_task(s.load("a"))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        joined = await s.load("a")
        waited = time.monotonic() - start
        await first
    assert joined.cold
    assert joined.load_duration_ns / 1e9 == pytest.approx(waited, abs=0.05)
    assert waited > 0.2


def small_trace(seed: int, n: int = 150) -> Trace:
    rng = np.random.default_rng(seed)
    models = [
        ModelSpec(f"m{i}", int(gb * GB), 0.0, float(load))
        for i, (gb, load) in enumerate([(6, 4.0), (3, 2.5), (2, 1.5), (9, 6.0), (1, 1.0)])
    ]
    return Trace(
        config=TraceConfig(),
        models=models,
        budget_bytes=12 * GB,
        times=np.cumsum(rng.exponential(2.0, n)),
        model=rng.choice(len(models), n, p=[0.35, 0.25, 0.2, 0.1, 0.1]).astype(np.int64),
        service=rng.gamma(2.0, 1.5, n),
    )


@pytest.mark.parametrize(
    ("queue", "max_loads", "seed"), [("ollama", 0, 11), ("affinity", 0, 12), ("affinity", 1, 10)]
)
async def test_differential_simulator_and_scheduler_take_the_same_actions(
    tmp_path: Path, queue: str, max_loads: int, seed: int
) -> None:
    trace = small_trace(seed=seed)
    cfg = SimConfig(
        queue=queue, keep_alive_s=20.0, parallel=1 << 20, max_models=3, journal=True,
        max_loads=max_loads, starvation_s=0.0,
    )  # fmt: skip
    expected = simulate(trace, cfg).journal
    assert any(" load " in f" {line} " and "after" in line for line in expected)  # evictions
    assert any("keep-alive expired" in line for line in expected)

    clock = VirtualClock()
    models = {m.key: (m.bytes, m.load_seconds) for m in trace.models}
    s = fake_scheduler(
        tmp_path,
        models,
        budget=trace.budget_bytes,
        clock=clock,
        lag_s=cfg.recovery_lag_s,
        keep_alive="20s",
        queue=queue,
        max_loaded_models=cfg.max_models,
        max_queue=100_000,
        max_loads=max_loads,
        starvation_s=cfg.starvation_s,
        journal=True,
    )
    journal: list[str] = []
    finished = 0

    async def request(i: int) -> None:
        nonlocal finished
        key = trace.models[int(trace.model[i])].key
        await hold(s, clock, key, float(trace.times[i]), float(trace.service[i]))
        finished += 1
        if finished == len(trace):  # the simulator stops at the last completion
            journal.extend(s.engine.journal())

    await s.start()
    tasks = [asyncio.create_task(request(i)) for i in range(len(trace))]
    await clock.run_until(lambda: all(t.done() for t in tasks))
    for t in tasks:
        t.result()
    stopping = asyncio.create_task(s.stop())
    await clock.run_until(stopping.done)
    assert journal == list(expected)


async def test_ollama_discipline_with_real_runners(tmp_path: Path) -> None:
    """queue = "ollama": requests that arrive while their model loads wait in the FIFO queue and
    are granted once it is ready (not cold, their wait is queue time), as Ollama serves them."""
    models = [fake_model("a", tmp_path, 100 * MIB, "--load-s", "0.5")]
    settings = load_settings(
        models=models, memory_limit=250 * MIB, probe="host", stop_timeout_s=2, queue="ollama"
    )
    async with Scheduler(settings) as s:
        assert s.engine.discipline.name == "OLLAMA"
        first = asyncio.create_task(s.load("a"))
        await asyncio.sleep(0.1)
        followers = await asyncio.gather(*(s.load("a") for _ in range(3)))
        lead = await first
    assert lead.cold
    assert not any(f.cold for f in followers)
    assert all(f.queue_duration_ns > 0.2 * NS for f in followers)
    assert s.core.stats("a").loads == 1  # type: ignore[union-attr]


def test_queue_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="queue"):
        load_settings(queue="lifo")
    assert load_settings().queue == "affinity"
    assert load_settings(queue="ollama", starvation_s=30).starvation_s == 30
