"""The app around the routers: OpenAPI schema, /metrics, the access log, `serve`'s settings."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families

from api_fakes import FakeRunner, serving
from residency import cli
from residency.api import ollama, ollama_models, openai, operations
from residency.api.app import BODY_MODELS

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3:270m"

EXPECTED_ROUTES = {
    ("POST", "/api/generate"),
    ("POST", "/api/chat"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("GET", "/api/ps"),
    ("GET", "/api/tags"),
    ("POST", "/api/show"),
    ("GET", "/api/version"),
    ("GET", "/"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/metrics"),
    ("GET", "/health"),
    ("POST", "/api/residency/reload"),
}


async def test_openapi_schema_matches_the_endpoints() -> None:
    async with serving() as s:
        r = await s.client.get("/openapi.json")
        assert r.status_code == 200
        schema = r.json()
        published = {
            (method.upper(), path.replace("{model:path}", "{model}"))
            for path, ops in schema["paths"].items()
            for method in ops
        }
        assert published == EXPECTED_ROUTES
        # Every route the app serves is published (HEAD / aside), and nothing else.
        served = {
            (m, r.path.replace("{model:path}", "{model}"))
            for r in [
                *ollama.router.routes,
                *ollama_models.router.routes,
                *openai.router.routes,
                *operations.router.routes,
                *s.app.routes,
            ]
            if isinstance(r, APIRoute) and r.include_in_schema
            for m in r.methods
        }
        assert served == EXPECTED_ROUTES
        components = schema["components"]["schemas"]
        for path, ops in schema["paths"].items():
            for method, op in ops.items():
                if method != "post" or path == "/api/residency/reload":  # it takes no body
                    continue
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                name = ref.rsplit("/", 1)[1]
                assert name in components, (path, name)
        # The published bodies are the models the routes validate with.
        for model in BODY_MODELS:
            assert set(model.model_fields) <= set(components[model.__name__]["properties"])
        chat = components["ChatRequest"]
        assert "model" in chat["required"]
        assert chat["properties"]["messages"]["anyOf"][0]["items"]["$ref"].endswith("/ChatMessage")
        assert components["OpenAIChatRequest"]["properties"]["keep_alive"]


async def test_generation_routes_skip_fastapi_routing_with_the_same_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving() as s:
        assert s.app.direct_routes == {
            ("POST", "/api/generate"),
            ("POST", "/api/chat"),
            ("POST", "/api/embed"),
            ("POST", "/api/embeddings"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/embeddings"),
        }
        routed: list[str] = []
        real_call = FastAPI.__call__

        async def spy(app: Any, scope: Any, receive: Any, send: Any) -> None:
            routed.append(scope.get("path", ""))
            await real_call(app, scope, receive, send)

        monkeypatch.setattr(FastAPI, "__call__", spy)
        r = await s.client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 400  # errors keep their shape on the direct path
        assert "messages" in r.json()["error"]["message"]
        r = await s.client.post("/api/chat", json={"model": MODEL, "messages": [], "stream": False})
        assert r.status_code == 200
        assert r.json()["done_reason"] == "load"
        assert routed == []
        assert (await s.client.get("/api/ps")).status_code == 200
        assert routed == ["/api/ps"]  # everything else goes through FastAPI


def sample(text: str, name: str, **labels: str) -> float | None:
    """A sample's value in an exposition, parsed by prometheus-client's own parser (so number
    formatting is the library's business, not the test's); None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


async def test_metrics_count_requests_loads_and_residents() -> None:
    async with serving() as s:
        await s.client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        await s.client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        await s.client.post("/api/generate", json={"model": "nope", "prompt": "x"})
        r = await s.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.text
        lines = set(text.splitlines())
        gen = {"api": "ollama", "endpoint": "/api/generate"}
        assert sample(text, "residency_http_requests_total", **gen, status="200") == 2
        assert sample(text, "residency_http_requests_total", **gen, status="404") == 1
        assert sample(text, "residency_cold_requests_total", model=MODEL) == 1
        # load_duration is a histogram now: its _sum is what the old _total counter said.
        assert sample(text, "residency_load_duration_seconds_sum", model=MODEL) == 1.5
        assert sample(text, "residency_load_duration_seconds_count", model=MODEL) == 1
        assert sample(text, "residency_leases_total", model=MODEL) == 2
        on_gpu = {"model": MODEL, "device": "cuda:0"}
        assert sample(text, "residency_model_resident", **on_gpu, state="ready") == 1
        assert sample(text, "residency_model_measured_bytes", **on_gpu) == 480000000
        assert sample(text, "residency_http_requests_in_flight") == 0
        assert sample(text, "residency_models_configured") == 1
        assert sample(text, "residency_device_free_bytes", device="cuda:0") == 7e9
        assert sample(text, "residency_time_to_first_token_seconds_count", model=MODEL) == 2
        # Well-formed exposition: every sample belongs to a declared family.
        families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
        for line in lines:
            if line and not line.startswith("#"):
                name = line.split("{")[0].split()[0]
                assert any(name == f or name.startswith(f + "_") for f in families), line


async def test_one_structured_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="residency.access")
    async with serving(FakeRunner()) as s:
        await s.client.post(
            "/api/chat",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        )
        await s.client.post("/v1/chat/completions", json={"model": "nope", "messages": [{}]})
    records = [r for r in caplog.records if r.name == "residency.access"]
    assert len(records) == 2
    first: dict[str, Any] = records[0].residency_request  # type: ignore[attr-defined]
    assert first["endpoint"] == "/api/chat"
    assert first["model"] == MODEL
    assert first["status"] == 200
    assert first["stream"] is True
    assert first["cold"] is True
    assert first["load_ms"] == 1500.0
    assert first["queue_ms"] == 0.001
    assert "endpoint=/api/chat model=gemma3:270m status=200" in records[0].getMessage()
    assert "cold=true load_ms=1500.0" in records[0].getMessage()
    second = records[1].residency_request  # type: ignore[attr-defined]
    assert second["status"] == 400
    assert "error=" in records[1].getMessage()


def _serve_settings(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Any:
    """Runs `residency serve ARGV` with uvicorn replaced; returns the settings it would serve."""
    from residency import server

    seen: dict[str, Any] = {}

    def fake_serve(settings: Any, *, log_level: str = "info", reload_settings: Any = None) -> int:
        seen["settings"] = settings
        seen["log_level"] = log_level
        # A reload re-reads the same sources: the same settings while nothing changed.
        assert reload_settings() == settings
        return 0

    monkeypatch.setattr(server, "serve", fake_serve)
    monkeypatch.setattr(server, "_configure_logging", lambda level: None)  # leave pytest's alone
    assert cli.main(["serve", *argv]) == 0
    return seen["settings"]


def test_serve_defaults_and_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OLLAMA_HOST", "RESIDENCY_HOST", "RESIDENCY_PORT", "RESIDENCY_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    s = _serve_settings(monkeypatch, [])
    assert (s.host, s.port) == ("127.0.0.1", 11434)
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:12345")
    s = _serve_settings(monkeypatch, [])
    assert (s.host, s.port) == ("127.0.0.1", 12345)
    s = _serve_settings(monkeypatch, ["--port", "23456"])
    assert (s.host, s.port) == ("127.0.0.1", 23456)


def test_serve_reads_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    config = tmp_path / "residency.toml"
    config.write_text('port = 31337\nkeep_alive = "10m"\n')
    s = _serve_settings(monkeypatch, ["--config", str(config)])
    assert s.port == 31337
    assert s.keep_alive == "10m"


def test_serve_reports_a_bad_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from residency import server

    monkeypatch.setattr(server, "_configure_logging", lambda level: None)
    config = tmp_path / "bad.toml"
    config.write_text("port = 'eleven'\n")
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "residency: error:" in err
    assert "port" in err


def test_serve_parser() -> None:
    args = cli.build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "1"])
    assert isinstance(args, argparse.Namespace)
    assert (args.host, args.port, args.config) == ("0.0.0.0", 1, None)
