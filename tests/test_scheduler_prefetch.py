"""The server executes the engine's Prefetch: a request that must wait for a model that is not
resident has its file admitted to the host tier (and read ahead) during the wait, as the simulator
does with the very same action."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from residency.config import load_settings
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, eventually, fake_model

pytestmark = pytest.mark.timeout(60)


async def test_a_request_waiting_for_a_busy_victim_prefetches_its_file(tmp_path: Path) -> None:
    models = [fake_model("a", tmp_path), fake_model("b", tmp_path, 200 * MIB)]
    settings = load_settings(
        models=models,
        memory_limit=250 * MIB,
        stop_timeout_s=2.0,
        probe="host",
        host_cache_bytes=1 << 30,
    )
    s = Scheduler(settings)
    await s.start()
    try:
        host = s._executor.host_cache if s._executor is not None else None
        assert host is not None
        async with s.session("a"):
            b = asyncio.create_task(s.load("b"))
            # b cannot load while a is busy; its file is admitted to the tier meanwhile.
            await eventually(lambda: any(host.kept(k) for k in ("b", "b:latest")))
            assert not b.done()
        await asyncio.wait_for(b, 10)
    finally:
        await s.stop()
        gc.collect()
