"""Reload (issue 14, item 6) in-process, with fake runner processes: who may reload, API keys
rotated by a reload, settings that need a restart reported, and only changed models restarted
(the real server and llama-server: test_e2e_reload.py)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.api.app import create_app
from residency.config import ApiKeyConfig, ModelConfig, Settings, load_settings
from residency.errors import ServerBusyError
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, eventually, fake_model

pytestmark = pytest.mark.timeout(60)

ALICE = "alice-secret-key-0123456789"
BOB = "bob-secret-key-0123456789abc"
CAROL = "carol-secret-key-0123456789"


def settings(models: list[ModelConfig], **kw: Any) -> Settings:
    kw.setdefault("memory_limit", 500 * MIB)
    return load_settings(models=models, probe="host", **kw)


@pytest.fixture
async def app_for() -> AsyncIterator[Callable[..., Any]]:
    """app_for(settings, reload_to, client_host) → (scheduler, client): reload reads reload_to()."""
    made: list[tuple[Any, httpx.AsyncClient]] = []

    async def make(
        first: Settings, reload_to: Callable[[], Settings], host: str = "127.0.0.1"
    ) -> tuple[Scheduler, httpx.AsyncClient]:
        sched = Scheduler(first)
        app = create_app(first, scheduler=sched, reload_settings=reload_to)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        transport = httpx.ASGITransport(app, client=(host, 40000))
        client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")
        made.append((lifespan, client))
        return sched, client

    yield make
    for lifespan, client in reversed(made):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
    gc.collect()


async def test_only_changed_models_restart(app_for: Any, tmp_path: Path) -> None:
    a, b = fake_model("a", tmp_path), fake_model("b", tmp_path)
    new = settings([a.model_copy(update={"ctx": 1024}), b, fake_model("c", tmp_path)], max_queue=7)
    sched, client = await app_for(settings([a, b]), lambda: new)
    async with sched.session("a") as lease:
        old_a = lease.runner.pid
    async with sched.session("b") as lease:
        old_b = lease.runner.pid
    r = await client.post("/api/residency/reload")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "reloaded",
        "added": ["c"],
        "removed": [],
        "changed": ["a"],
        "unchanged": 1,
        "restart_required": ["max_queue"],  # read once at start-up: reported, not applied
    }
    assert sched.engine.queued() == 0
    async with sched.session("a") as lease:
        assert lease.cold
        assert lease.runner.pid != old_a
        assert lease.ctx == 1024
    async with sched.session("b") as lease:
        assert not lease.cold
        assert lease.runner.pid == old_b
    async with sched.session("c") as lease:
        assert lease.cold
    assert (
        sched.metrics.registry.get_sample_value("residency_config_reloads_total", {"result": "ok"})
        == 1
    )


async def test_without_keys_only_loopback_may_reload(app_for: Any, tmp_path: Path) -> None:
    s = settings([fake_model("a", tmp_path)])
    _, remote = await app_for(s, lambda: s, host="10.1.2.3")
    r = await remote.post("/api/residency/reload")
    assert r.status_code == 403
    assert "only from this machine" in r.json()["error"]


async def test_only_an_unrestricted_key_may_reload_and_keys_rotate(
    app_for: Any, tmp_path: Path
) -> None:
    models = [fake_model("a", tmp_path)]
    keys = [
        ApiKeyConfig(name="alice", key=ALICE),
        ApiKeyConfig(name="bob", key=BOB, models=["a"]),
    ]
    rotated = settings(models, api_keys=[ApiKeyConfig(name="carol", key=CAROL)])
    _, client = await app_for(settings(models, api_keys=keys), lambda: rotated, host="10.1.2.3")

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    assert (await client.post("/api/residency/reload")).status_code == 401
    r = await client.post("/api/residency/reload", headers=auth(BOB))
    assert r.status_code == 403
    assert "'bob' is limited to some models" in r.json()["error"]
    r = await client.post("/api/residency/reload", headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert r.json()["restart_required"] == []  # keys are applied live
    assert (await client.get("/api/tags", headers=auth(ALICE))).status_code == 401
    assert (await client.get("/api/tags", headers=auth(CAROL))).status_code == 200


async def test_an_invalid_configuration_changes_nothing(app_for: Any, tmp_path: Path) -> None:
    models = [fake_model("a", tmp_path)]
    keys = [ApiKeyConfig(name="alice", key=ALICE)]
    bad_key_file = tmp_path / "keys"
    bad_key_file.write_text("carol:short\n")

    def broken() -> Settings:
        return settings(models, api_keys=keys, api_keys_file=bad_key_file)

    sched, client = await app_for(settings(models, api_keys=keys), broken)
    headers = {"Authorization": f"Bearer {ALICE}"}
    r = await client.post("/api/residency/reload", headers=headers)
    assert r.status_code == 422
    assert "line 1: expected name:key" in r.json()["error"]
    assert "short" not in r.json()["error"]  # a key file's secrets are never echoed
    assert (await client.get("/api/tags", headers=headers)).status_code == 200
    assert [e.name for e in sched.models()] == ["a"]
    assert (
        sched.metrics.registry.get_sample_value(
            "residency_config_reloads_total", {"result": "failed"}
        )
        == 1
    )


async def test_without_a_way_to_reread_reload_is_not_available(tmp_path: Path) -> None:
    s = settings([fake_model("a", tmp_path)])
    app = create_app(s, scheduler=Scheduler(s))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            r = await c.post("/api/residency/reload")
            assert r.status_code == 404
            assert "no configuration to re-read" in r.json()["error"]


async def test_a_request_queued_for_a_reconfigured_model_is_told_to_retry(
    app_for: Any, tmp_path: Path
) -> None:
    """Room for one model: b's request waits behind busy a when b's configuration changes. It
    was sized for the old one: 503 + Retry-After, and a retry loads the new configuration."""
    a, b = fake_model("a", tmp_path, 100 * MIB), fake_model("b", tmp_path, 100 * MIB)
    new = settings([a, b.model_copy(update={"ctx": 1024})], memory_limit=150 * MIB)
    sched, client = await app_for(settings([a, b], memory_limit=150 * MIB), lambda: new)
    async with sched.session("a"):
        waiting = asyncio.create_task(sched.load("b"))
        await eventually(lambda: sched.engine.queued() == 1, 10, "b queued")
        assert (await client.post("/api/residency/reload")).json()["changed"] == ["b"]
        with pytest.raises(ServerBusyError, match="'b' was reconfigured while this request waited"):
            await waiting
    async with sched.session("b") as lease:
        assert lease.ctx == 1024
