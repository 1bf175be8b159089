"""keep_alive governance (issue 18, item 3): the operator's keep_alive_min / keep_alive_max /
client_keep_alive, at the top level, per model and per API key, through the API with the real
scheduler and fake runner processes; /api/ps says where each expiry came from and who set it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.api import create_app
from residency.config import ApiKeyConfig, ModelConfig
from residency.errors import ConfigError
from residency.keepalive import KeepAliveRule, govern, parse_keep_alive
from residency.scheduler import Scheduler
from scheduler_helpers import fake_model
from test_scheduler import make_settings

pytestmark = pytest.mark.timeout(60)

S = 1_000_000_000
ALICE = "alice-secret-key-0123456789"
BOB = "bob-secret-key-0123456789abc"


def rule(client: Any = None, lo: str | None = None, hi: str | None = None) -> KeepAliveRule:
    return KeepAliveRule.parse(client, lo, hi)


@pytest.mark.parametrize(
    ("asked", "r", "expected", "source"),
    [
        (None, rule("clamp", "1m", "1h"), None, "server"),  # no request value: the default
        (30 * S, rule(None, None, None), 30 * S, "request"),  # no bounds: as Ollama
        (30 * S, rule("clamp", "1m", "1h"), 60 * S, "policy"),
        (0, rule("clamp", "1m", None), 60 * S, "policy"),
        (-1, rule("clamp", None, "1h"), 3600 * S, "policy"),
        (-1, rule("clamp", "1m", None), -1, "request"),  # forever is longer than any minimum
        (600 * S, rule("clamp", "1m", "1h"), 600 * S, "request"),
        (-1, rule("honour", "1m", "1h"), -1, "request"),
        (30 * S, rule("ignore", None, None), 300 * S, "server"),
    ],
)
def test_govern(asked: int | None, r: KeepAliveRule, expected: int | None, source: str) -> None:
    choice = govern(asked, 300 * S, "server", r)
    assert (choice.ns, choice.source, choice.requested_ns) == (expected, source, asked)


def test_levels_override_field_by_field_and_bounds_are_checked() -> None:
    key = rule(None, None, "30s")
    model = rule("clamp", "1m", None)
    server = rule("ignore", None, "1h")
    merged = key.over(model.over(server))
    assert merged == KeepAliveRule("clamp", 60 * S, 30 * S)
    with pytest.raises(ConfigError, match="keep_alive_min"):
        make_settings([], keep_alive_min="2h", keep_alive_max="1h")
    with pytest.raises(ValueError, match="client_keep_alive"):
        ModelConfig(name="m", path=Path("/x"), client_keep_alive="obey")  # type: ignore[arg-type]


@asynccontextmanager
async def served(models: list[ModelConfig], **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    s = Scheduler(make_settings(models, **kw))
    app = create_app(s.settings, scheduler=s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


async def generate(c: httpx.AsyncClient, model: str, keep_alive: Any, key: str = "") -> None:
    body: dict[str, Any] = {"model": model, "prompt": "hi", "stream": False}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = await c.post("/api/generate", json=body, headers=headers)
    assert r.status_code == 200, r.text


async def ps(c: httpx.AsyncClient, model: str, key: str = "") -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = await c.get("/api/ps", headers=headers)
    assert r.status_code == 200, r.text
    (row,) = [m for m in r.json()["models"] if m["name"].split(":")[0] == model]
    keep_alive: dict[str, Any] = row["keep_alive"]
    return keep_alive


async def test_clamp_bounds_what_clients_ask(tmp_path: Path) -> None:
    models = [fake_model("a", tmp_path)]
    async with served(models, keep_alive_min="1m", keep_alive_max="1h") as c:
        await generate(c, "a", -1)  # forever, clamped to the maximum
        ka = await ps(c, "a")
        assert ka == {
            "seconds": 3600,
            "source": "policy",
            "requested_seconds": -1,
            "set_by": {"key": None, "peer": "10.1.2.3"},
        }
        await generate(c, "a", 0)  # "unload when done" is raised to the minimum: it stays
        ka = await ps(c, "a")
        assert (ka["seconds"], ka["source"], ka["requested_seconds"]) == (60, "policy", 0)
        await generate(c, "a", "10m")  # within the bounds: as asked
        ka = await ps(c, "a")
        assert (ka["seconds"], ka["source"]) == (600, "request")
        await generate(c, "a", None)  # asks nothing: the model keeps what it has
        assert (await ps(c, "a"))["seconds"] == 600


async def test_ignore_and_honour_per_model(tmp_path: Path) -> None:
    models = [
        fake_model("ignored", tmp_path, keep_alive="7m", client_keep_alive="ignore"),
        fake_model("trusted", tmp_path, client_keep_alive="honour"),
        fake_model("plain", tmp_path),
    ]
    async with served(models, keep_alive="5m", keep_alive_max="2m", memory_limit=None) as c:
        await generate(c, "ignored", "1h")
        ka = await ps(c, "ignored")
        assert (ka["seconds"], ka["source"], ka["requested_seconds"]) == (420, "model", 3600)
        assert ka["set_by"] is None  # its value was not used: the model's default was
        await generate(c, "trusted", -1)
        ka = await ps(c, "trusted")
        assert (ka["seconds"], ka["source"]) == (-1, "request")
        await generate(c, "plain", "1h")
        ka = await ps(c, "plain")
        assert (ka["seconds"], ka["source"]) == (120, "policy")


async def test_a_keys_limits_and_its_name(tmp_path: Path) -> None:
    keys = [
        ApiKeyConfig(name="alice", key=ALICE, keep_alive_max="30s"),
        ApiKeyConfig(name="bob", key=BOB),
    ]
    async with served([fake_model("a", tmp_path)], api_keys=keys) as c:
        await generate(c, "a", -1, key=BOB)
        ka = await ps(c, "a", key=BOB)
        assert (ka["seconds"], ka["source"]) == (-1, "request")
        assert ka["set_by"] == {"key": "bob", "peer": "10.1.2.3"}
        await generate(c, "a", -1, key=ALICE)  # alice's key is held to 30 s
        ka = await ps(c, "a", key=ALICE)
        assert (ka["seconds"], ka["source"], ka["requested_seconds"]) == (30, "policy", -1)
        assert ka["set_by"]["key"] == "alice"


async def test_a_preloaded_model_shows_the_server_default(tmp_path: Path) -> None:
    async with served([fake_model("a", tmp_path)], keep_alive="4m") as c:
        r = await c.post("/api/generate", json={"model": "a"})  # a load, no keep_alive
        assert r.json()["done_reason"] == "load"
        ka = await ps(c, "a")
        assert ka == {
            "seconds": 240,
            "source": "server",
            "requested_seconds": None,
            "set_by": None,
        }
    assert parse_keep_alive("4m") == 240 * S
