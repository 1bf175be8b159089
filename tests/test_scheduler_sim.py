"""The scheduler on a simulated GPU: fake runners allocate on it, and it reports frees late.

These show why the recovery wait exists: without it, a load into memory the driver has not yet
reported free fails with out-of-memory, exactly as on a real GPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from residency.config import ModelConfig, load_settings
from residency.errors import RunnerError
from residency.memory import SimulatedDevice
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, alive, eventually, fake_model

pytestmark = pytest.mark.timeout(60)

GIB = 1024 * MIB


def make(sim: Path, models: list[ModelConfig], **kw: Any) -> Scheduler:
    kw.setdefault("stop_timeout_s", 2.0)
    settings: Any = load_settings(models=models, simulated_device=sim, **kw)
    return Scheduler(settings)


@pytest.fixture
def sim(tmp_path: Path) -> Path:
    path = tmp_path / "gpu.sim"
    SimulatedDevice.create(path, GIB, lag_s=0.4)
    return path


async def test_the_device_budget_comes_from_the_probe(sim: Path, tmp_path: Path) -> None:
    async with make(sim, [fake_model("a", tmp_path, sim=sim)], gpu_overhead=100 * MIB) as s:
        [dev] = s.core.devices()
        assert (dev.id, dev.total_bytes, dev.budget_bytes) == ("sim:0", GIB, GIB - 100 * MIB)
        async with s.session("a") as lease:
            assert lease.device == "sim:0"
        [row] = s.resident()
        assert row.size_vram == 100 * MIB  # a GPU stand-in: its bytes count as VRAM


async def test_eviction_waits_for_the_device_to_show_the_memory(sim: Path, tmp_path: Path) -> None:
    models = [fake_model(n, tmp_path, 600 * MIB, sim=sim) for n in ("a", "b")]
    async with make(sim, models) as s:
        a = await s.load("a")
        start = time.monotonic()
        b = await s.load("b")  # a must go, and its 600 MiB show up free, before b can allocate
        assert not alive(a.runner.pid or 0)
        assert time.monotonic() - start >= 0.35, "loaded before the device reported the memory"
        assert b.cold
        [row] = s.resident()
        assert row.name == "b"


async def test_without_the_wait_the_load_runs_out_of_memory(sim: Path, tmp_path: Path) -> None:
    # Fault injected: a recovery timeout far below the device's reporting lag (what trusting one's
    # own numbers at once amounts to): the new runner finds the memory still taken.
    SimulatedDevice.open(sim).set_lag(2.0)  # longer than a fake runner takes to start
    models = [fake_model(n, tmp_path, 600 * MIB, sim=sim) for n in ("a", "b")]
    async with make(sim, models, recovery_timeout_s=0.01) as s:
        await s.load("a")
        with pytest.raises(RunnerError, match="exit code 1 while loading") as info:
            await s.load("b")
        assert "OutOfMemory" in info.value.output_tail
        assert s.core.devices()[0].reserved_bytes == 0  # the failed load gave its bytes back
        await eventually(lambda: SimulatedDevice.open(sim).query(0).free_bytes == GIB, 5)
        assert (await s.load("b")).cold  # and the scheduler keeps serving


async def test_after_a_crash_the_next_load_waits_for_the_memory(sim: Path, tmp_path: Path) -> None:
    models = [
        fake_model("crashy", tmp_path, 600 * MIB, "--crash-after-s", "0.3", sim=sim),
        fake_model("b", tmp_path, 600 * MIB, sim=sim),
    ]
    SimulatedDevice.open(sim).set_lag(2.0)  # longer than a fake runner takes to start
    async with make(sim, models) as s:
        lease = await s.load("crashy")
        await lease.runner.wait_exit()
        crashed = time.monotonic()
        await eventually(lambda: s.core.reservation("crashy") is None, 1)
        # The driver still shows the dead runner's 600 MiB for 2 s: b's load must wait for it
        # (else its allocation fails and the load raises).
        b = await s.load("b")
        assert b.cold
        assert time.monotonic() - crashed >= 1.9
        assert [r.name for r in s.resident()] == ["b"]


async def test_measured_bytes_from_the_probe_when_the_runner_reports_none(
    sim: Path, tmp_path: Path
) -> None:
    quiet = fake_model("quiet", tmp_path, 300 * MIB, "--no-report", sim=sim, memory=200 * MIB)
    async with make(sim, [quiet]) as s:
        await s.load("quiet")
        [row] = s.resident()
        assert row.estimated_bytes == 200 * MIB
        assert row.measured_bytes == 300 * MIB  # what the device lost while it loaded
