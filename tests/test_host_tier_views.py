"""The host page cache where people look: /api/ps's ``host_tier`` (models loaded or not, filtered by
the API key), ``residency_model_warm_bytes`` for files whose model is not loaded, and ``residency
ps``'s WARM column with the models warm in RAM but not loaded below the table."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_fakes import FakeHostTier, FakeWarmFile, serving
from residency import pagecache
from residency.cli_client import cmd_ps
from residency.config import ApiKeyConfig, Settings, load_settings
from residency.embedded import cache_dir
from residency.scheduler import Scheduler
from residency.scheduler.host_cache import HostCache
from residency.scheduler.rows import host_tier_view
from scheduler_helpers import MIB, fake_model

pytestmark = pytest.mark.timeout(60)

ALICE = "alice-secret-key-0123456789"
BOB = "bob-secret-key-0123456789abc"
TIER = FakeHostTier(
    budget_bytes=12_000_000_000,
    kept_bytes=700_000_000,
    files=[FakeWarmFile("gemma3:270m", 253_000_000), FakeWarmFile("other", 450_000_000)],
)


async def test_ps_shows_the_host_tier_with_files_of_models_not_loaded() -> None:
    async with serving(names=("gemma3:270m", "other")) as s:
        s.sched.tier = TIER
        s.sched.loaded = {"gemma3:270m"}
        body = (await s.client.get("/api/ps")).json()
        # Ollama's list keeps its meaning: the loaded models only.
        assert [m["name"] for m in body["models"]] == ["gemma3:270m"]
        assert body["host_tier"] == {
            "budget_bytes": 12_000_000_000,
            "kept_bytes": 700_000_000,
            "files": [
                {"name": "gemma3:270m", "warm_bytes": 253_000_000, "kept": True},
                {"name": "other:latest", "warm_bytes": 450_000_000, "kept": True},
            ],
        }
        s.sched.tier = None  # host_cache_bytes 0: the page cache is the kernel's
        assert (await s.client.get("/api/ps")).json()["host_tier"] is None


async def test_ps_host_tier_lists_only_the_files_a_key_may_use() -> None:
    keys = [
        ApiKeyConfig(name="alice", key=ALICE),
        ApiKeyConfig(name="bob", key=BOB, models=["other"]),
    ]
    async with serving(names=("gemma3:270m", "other"), settings=Settings(api_keys=keys)) as s:
        s.sched.tier = TIER
        bob = (await s.client.get("/api/ps", headers={"Authorization": f"Bearer {BOB}"})).json()
        assert [f["name"] for f in bob["host_tier"]["files"]] == ["other:latest"]
        alice = (await s.client.get("/api/ps", headers={"Authorization": f"Bearer {ALICE}"})).json()
        assert len(alice["host_tier"]["files"]) == 2


async def test_metrics_show_warm_bytes_of_models_not_loaded() -> None:
    async with serving(names=("gemma3:270m", "other")) as s:
        s.sched.tier = TIER
        s.sched.loaded = {"gemma3:270m"}
        text = (await s.client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    warm = {
        (x.labels["model"], x.labels["device"]): x.value
        for x in families["residency_model_warm_bytes"].samples
    }
    # The loaded model once, on its device (its row's measure); the other on no device.
    assert warm == {("gemma3:270m", "cuda:0"): 200_000_000, ("other", ""): 450_000_000}
    assert families["residency_host_cache_budget_bytes"].samples[0].value == 12_000_000_000
    assert families["residency_host_cache_kept_bytes"].samples[0].value == 700_000_000


class _Answers:
    """The CLI's client, answering /api/ps with a fixed body."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def call(self, method: str, path: str, body: Any = None, *, long: bool = False) -> Any:
        assert (method, path) == ("GET", "/api/ps")
        return self.body


def _ps_body(files: list[dict[str, Any]]) -> dict[str, Any]:
    loaded = {
        "name": "gemma3:270m",
        "digest": "0123456789abcdef",
        "size": 500_000_000,
        "size_vram": 0,
        "context_length": 2048,
        "expires_at": None,
        "device": "host",
        "state": "ready",
        "warm_bytes": 253_000_000,
    }
    tier = {"budget_bytes": 12_000_000_000, "kept_bytes": 700_000_000, "files": files}
    return {"models": [loaded], "host_tier": tier}


def _ps(body: dict[str, Any], *, as_json: bool = False) -> str:
    out = io.StringIO()
    assert cmd_ps(argparse.Namespace(json=as_json), _Answers(body), out) == 0  # type: ignore[arg-type]
    return out.getvalue()


def test_residency_ps_shows_warm_bytes_and_the_models_warm_but_not_loaded() -> None:
    files = [
        {"name": "gemma3:270m", "warm_bytes": 253_000_000, "kept": True},  # loaded: in the table
        {"name": "other:latest", "warm_bytes": 450_000_000, "kept": False},
        {"name": "cold:latest", "warm_bytes": 0, "kept": True},  # kept but not in RAM now
    ]
    lines = _ps(_ps_body(files)).splitlines()
    header = lines[0].split()
    assert header == [
        "NAME",
        "ID",
        "SIZE",
        "PROCESSOR",
        "CONTEXT",
        "UNTIL",
        "DEVICE",
        "WARM",
        "STATE",
    ]
    assert "253 MB" in lines[1]
    assert lines[2] == ""
    assert lines[3] == "Warm in host RAM, not loaded (host cache 700 MB kept of 12 GB):"
    assert lines[4].split() == ["NAME", "WARM", "KEPT"]
    assert lines[5].split() == ["other:latest", "450", "MB", "no"]
    assert len(lines) == 6  # not the loaded model, nor the cold one


def test_residency_ps_adds_nothing_when_no_model_is_warm_but_not_loaded() -> None:
    loaded_only = _ps(_ps_body([{"name": "gemma3:270m", "warm_bytes": 1, "kept": True}]))
    assert len(loaded_only.splitlines()) == 2
    no_tier = _ps_body([])
    no_tier["host_tier"] = None
    no_tier["models"][0]["warm_bytes"] = None
    (_, row) = _ps(no_tier).splitlines()
    assert row.split()[-2:] == ["-", "ready"]  # WARM unknown, STATE


def test_residency_ps_json_dumps_the_host_tier() -> None:
    assert '"host_tier"' in _ps(_ps_body([]), as_json=True)


# ---- the view's facts come from the host cache and the kernel ---------------------------------
SIZE = 8 << 20


@pytest.fixture
def model_file() -> Iterator[Path]:
    folder = cache_dir() / "test-host-tier-views"  # a disk: tmpfs pages can never be dropped
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.bin"
    with path.open("wb") as f:
        f.write(os.urandom(SIZE))
        f.flush()
        os.fsync(f.fileno())
    yield path
    path.unlink(missing_ok=True)


async def test_the_view_reads_the_host_cache_and_mincore(model_file: Path) -> None:
    cache = HostCache(budget_bytes=4 * SIZE, min_file_bytes=0)
    assert host_tier_view(None, ["a"]) is None  # no host cache: the kernel's page cache
    view = host_tier_view(cache, ["a", "never-seen"])
    assert view is not None
    assert (view.budget_bytes, view.kept_bytes, view.files) == (4 * SIZE, 0, ())
    # A runner loads "a" and exits: the tier keeps its file, which stays warm while not loaded.
    cache.mapped("a", model_file, 1)
    pagecache.warm(model_file)  # what the runner's load read
    cache.loaded("a", 2)
    cache.unmapped("a", 3)
    while cache._tasks:
        await asyncio.gather(*list(cache._tasks))
    view = host_tier_view(cache, ["a", "never-seen"])
    assert view is not None
    (f,) = view.files
    assert (f.name, f.warm_bytes, f.kept) == ("a", SIZE, True)
    assert view.kept_bytes == SIZE
    pagecache.drop(model_file)  # the kernel let it go: the view says what mincore says
    view = host_tier_view(cache, ["a"])
    assert view is not None
    assert view.files[0].warm_bytes <= SIZE // 20
    await cache.aclose()


async def test_only_those_who_ask_for_warm_bytes_pay_for_mincore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real scheduler with a host cache and a loaded fake runner: counting rows (/health,
    # /v1/models, load progress) measures nothing; reading a row's warm bytes (/api/ps) does.
    calls: list[Path] = []
    real = pagecache.resident_bytes

    def counted(path: Path | str) -> int:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(pagecache, "resident_bytes", counted)
    settings = load_settings(
        models=[fake_model("a", tmp_path)], memory_limit=250 * MIB, probe="host",
        host_cache_bytes=1 << 30, stop_timeout_s=2.0,
    )  # fmt: skip
    s = Scheduler(settings)
    await s.start()
    try:
        await s.load("a")
        calls.clear()
        (row,) = s.resident()
        assert calls == []
        first = row.warm_bytes
        assert first is not None
        assert row.warm_bytes == first
        assert calls == [tmp_path / "a.bin"]  # measured once, when first read
    finally:
        await s.stop()
