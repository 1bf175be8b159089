"""API keys, browser origins and Host names (issue 14, items 1 and 2), on the app with a fake
scheduler: every route refuses a missing or wrong key in its API's error shape, keys have names and
model allow-lists, a foreign web page (Origin) or a DNS-rebinding name (Host) is refused whatever
its Content-Type."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from api_fakes import serving
from residency.api.app import create_app
from residency.api.security import origin_allowed, warn_if_exposed
from residency.config import ApiKeyConfig, Settings
from residency.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

ALICE = "alice-secret-key-0123456789"
BOB = "bob-secret-key-0123456789abc"
GEN_BODY = {"model": "gemma3:270m", "prompt": "hi", "stream": False}
MODEL_A = "gemma3:270m"
OPENAI_BODY = {"model": "gemma3:270m", "messages": [{"role": "user", "content": "hi"}]}


def keyed(**kw: Any) -> Settings:
    keys = [
        ApiKeyConfig(name="alice", key=ALICE),
        ApiKeyConfig(name="bob", key=BOB, models=["other"]),
    ]
    return Settings(api_keys=keys, **kw)


def every_route() -> list[tuple[str, str]]:
    schema = create_app(Settings()).openapi()
    return [
        (method.upper(), path.replace("{model}", "gemma3:270m"))
        for path, ops in schema["paths"].items()
        for method in ops
    ]


async def test_every_route_but_the_banner_needs_a_key() -> None:
    routes = every_route()
    assert len(routes) >= 15
    async with serving(settings=keyed(auth_health=True)) as s:
        for method, path in routes:
            r = await s.client.request(method, path, json=GEN_BODY)
            if path == "/":
                assert r.status_code == 200
                continue
            assert r.status_code == 401, (method, path)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            if path.startswith("/v1/"):  # OpenAI's shape, which its client turns into an error
                assert error["code"] == "invalid_api_key"
                assert "API key" in error["message"]
            else:
                assert isinstance(error, str)
                assert "API key" in error
            wrong = await s.client.request(
                method, path, json=GEN_BODY, headers={"Authorization": "Bearer nope-" + ALICE}
            )
            assert wrong.status_code == 401, (method, path)
        assert s.sched.sessions == []  # nothing reached the scheduler
        ok = await s.client.post(
            "/api/generate", json=GEN_BODY, headers={"Authorization": f"Bearer {ALICE}"}
        )
        assert ok.status_code == 200
        scrape = await s.client.get("/metrics", headers={"Authorization": f"bearer {ALICE}"})
        assert 'residency_http_refused_total{reason="key"}' in scrape.text
        assert 'residency_http_key_requests_total{key="alice"}' in scrape.text


async def test_metrics_and_health_can_be_left_open() -> None:
    async with serving(settings=keyed(auth_metrics=False)) as s:
        assert (await s.client.get("/metrics")).status_code == 200
        health = await s.client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        assert (await s.client.get("/api/tags")).status_code == 401
    async with serving(settings=keyed()) as s:
        assert (await s.client.get("/metrics")).status_code == 401  # protected by default
        assert (await s.client.get("/health")).status_code == 200  # open by default


async def test_a_keys_model_allow_list_and_its_name_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "residency.access")
    async with serving(names=("gemma3:270m", "other"), settings=keyed()) as s:
        bob = {"Authorization": f"Bearer {BOB}"}
        refused = await s.client.post("/api/generate", json=GEN_BODY, headers=bob)
        assert refused.status_code == 403
        assert "bob" in refused.json()["error"]
        refused = await s.client.post("/v1/chat/completions", json=OPENAI_BODY, headers=bob)
        assert refused.status_code == 403
        assert refused.json()["error"]["message"]
        ok = await s.client.post("/api/generate", json={**GEN_BODY, "model": "other"}, headers=bob)
        assert ok.status_code == 200
        assert [x["model"] for x in s.sched.sessions] == ["other"]
        tags = (await s.client.get("/api/tags", headers=bob)).json()["models"]
        assert [m["name"] for m in tags] == ["other:latest"]
        cards = (await s.client.get("/v1/models", headers=bob)).json()["data"]
        assert [c["id"] for c in cards] == ["other:latest"]
        shown = await s.client.post("/api/show", json={"model": MODEL_A}, headers=bob)
        assert shown.status_code == 403
        assert (await s.client.get(f"/v1/models/{MODEL_A}", headers=bob)).status_code == 403
        alice = {"Authorization": f"Bearer {ALICE}"}
        assert len((await s.client.get("/api/tags", headers=alice)).json()["models"]) == 2
        # /api/ps lists only the resident models the key may use.
        s.sched.loaded = {"gemma3:270m", "other"}
        running = (await s.client.get("/api/ps", headers=bob)).json()["models"]
        assert [m["name"] for m in running] == ["other:latest"]
        running = (await s.client.get("/api/ps", headers=alice)).json()["models"]
        assert sorted(m["name"] for m in running) == ["gemma3:270m", "other:latest"]
    assert any(
        "key=bob" in r.getMessage() and "status=200" in r.getMessage() for r in caplog.records
    )
    assert ALICE not in caplog.text
    assert BOB not in caplog.text


def test_keys_from_the_environment_and_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from residency.api.security import load_keys

    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\nci:{ALICE}\nbot:{BOB}:gemma3:270m,other\n")
    monkeypatch.setenv("RESIDENCY_API_KEY", "from-the-environment-0123")
    monkeypatch.setenv("RESIDENCY_API_KEYS_FILE", str(key_file))
    keys = {k.name: k for k in load_keys(Settings())}
    assert set(keys) == {"env", "ci", "bot"}
    assert keys["ci"].models is None
    # A model name may hold a colon: the list is everything after the key's colon, split on ','.
    assert keys["bot"].models == frozenset({"gemma3:270m", "other"})
    key_file.write_text(f"short:abc\nok:{ALICE}\n")
    with pytest.raises(ConfigError, match="line 1") as err:
        load_keys(Settings())
    assert "abc" not in str(err.value)  # never echo a secret


async def test_loud_warning_when_exposed_without_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "residency.security")
    assert warn_if_exposed(Settings(host="0.0.0.0"), []) is True
    assert "WITHOUT API KEYS" in caplog.text
    assert warn_if_exposed(Settings(), []) is False
    assert warn_if_exposed(keyed(host="0.0.0.0"), [object()]) is False  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost", True),
        ("http://localhost:3000", True),
        ("https://127.0.0.1:8443", True),
        ("http://[::1]:5173", True),
        ("app://obsidian.md", True),
        ("vscode-webview://abc", True),
        ("http://localhost.evil.com", False),
        ("http://localhost:3000.evil.com", False),
        ("https://evil.example", False),
        ("null", False),
    ],
)
def test_origin_rules(origin: str, allowed: bool) -> None:
    assert origin_allowed(origin, []) is allowed


def test_configured_origin_patterns() -> None:
    assert origin_allowed("https://app.example.com", ["https://app.example.com"])
    assert origin_allowed("https://a.example.com", ["https://*.example.com"])
    assert not origin_allowed("https://example.com.evil", ["https://*.example.com"])
    assert origin_allowed("https://anything", ["*"])


async def test_a_foreign_web_page_cannot_drive_the_server() -> None:
    """A page on evil.example POSTs text/plain (no CORS preflight) to 127.0.0.1:11434."""
    async with serving() as s:
        for path in ("/api/generate", "/api/chat", "/v1/chat/completions", "/api/delete"):
            r = await s.client.post(
                path,
                content=b'{"model": "gemma3:270m", "prompt": "hi", "keep_alive": 0}',
                headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
            )
            assert r.status_code == 403, path
        assert s.sched.sessions == []
        assert s.sched.unloaded == []
        pre = await s.client.options("/api/generate", headers={"Origin": "https://evil.example"})
        assert pre.status_code == 403
        assert "access-control-allow-origin" not in pre.headers
        # A page served from loopback (a local web UI) may, and is told so.
        local = {"Origin": "http://localhost:3000"}
        pre = await s.client.options("/api/generate", headers=local)
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        ok = await s.client.post("/api/generate", json=GEN_BODY, headers=local)
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    async with serving(settings=Settings(origins="https://ui.example")) as s:
        ok = await s.client.post(
            "/api/generate", json=GEN_BODY, headers={"Origin": "https://ui.example"}
        )
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:11434", True),
        ("127.0.0.1:11434", True),
        ("[::1]:11434", True),
        ("box.local", True),
        ("192.168.1.7:11434", True),
        ("rebind.evil.example:11434", False),  # DNS rebinding: the page's own name, our address
        ("evil.example", False),
    ],
)
async def test_host_names_when_bound_to_loopback(host: str, allowed: bool) -> None:
    async with serving() as s:
        r = await s.client.post(
            "/api/generate",
            content=b'{"model": "gemma3:270m", "prompt": "hi", "stream": false}',
            headers={"Host": host, "Content-Type": "text/plain"},
        )
        assert (r.status_code == 200) is allowed, r.text
        assert (r.status_code == 403) is not allowed


async def test_host_is_not_checked_when_bound_beyond_loopback() -> None:
    async with serving(settings=keyed(host="0.0.0.0")) as s:
        r = await s.client.get(
            "/api/tags", headers={"Host": "gpu-box.corp:11434", "Authorization": f"Bearer {ALICE}"}
        )
        assert r.status_code == 200


async def test_the_official_clients_send_their_keys_and_read_the_401() -> None:
    """ollama's Client(headers=...) and openai's api_key=, against uvicorn on a loopback port."""
    import ollama
    import openai

    from test_api_limits import live

    async with live(keyed()) as (port, _):
        url = f"http://127.0.0.1:{port}"
        good = ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {ALICE}"})
        assert [m.model for m in (await good.list()).models] == ["gemma3:270m"]
        answer = await good.generate(model="gemma3:270m", prompt="hi", stream=False)
        assert answer.done
        anonymous = ollama.AsyncClient(host=url)
        with pytest.raises(ollama.ResponseError) as err:
            await anonymous.list()
        for c in (good, anonymous):
            await c._client.aclose()
        assert err.value.status_code == 401
        assert "API key" in err.value.error

        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
        assert [m.id async for m in client.models.list()] == ["gemma3:270m"]
        wrong = openai.AsyncOpenAI(base_url=url + "/v1", api_key="wrong-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            await wrong.models.list()
        await client.close()
        await wrong.close()
