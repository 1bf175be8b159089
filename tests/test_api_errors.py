"""Every error path of both APIs: status, body shape, headers; and clients that disconnect."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from api_fakes import FakeRunner, FakeScheduler, ndjson, serving, sse
from residency.api import create_app
from residency.api.proxy import WATCH_DISCONNECT_AFTER_S
from residency.config import Settings
from residency.errors import (
    InvalidArgumentError,
    ModelTooLargeError,
    RunnerError,
    ServerBusyError,
)

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3:270m"
OLLAMA_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
OPENAI_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def assert_ollama_error(r: httpx.Response, status: int, *fragments: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    for f in fragments:
        assert f in body["error"]
    return str(body["error"])


def assert_openai_error(r: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for f in fragments:
        assert f in err["message"]
    return dict(err)


@pytest.mark.parametrize(
    ("endpoint", "body", "fragment"),
    [
        ("/api/chat", b'{"model": "x", "messages": [', "invalid JSON"),
        ("/api/generate", b"", "missing request body"),
        ("/api/generate", b'{"prompt": "hi"}', "model: Field required"),
        ("/api/chat", b'{"model": "x", "messages": [{"content": "hi"}]}', "messages.0.role"),
        ("/api/chat", b'{"model": "x", "messages": [], "stream": "maybe"}', "stream"),
        ("/api/embed", b'{"model": "x"}', "input"),
        ("/api/show", b"{}", "model"),
        ("/api/generate", b"[1, 2]", "object"),
    ],
)
async def test_ollama_malformed_requests_are_400(endpoint: str, body: bytes, fragment: str) -> None:
    async with serving() as s:
        r = await s.client.post(endpoint, content=body)
        assert_ollama_error(r, 400, fragment)
        assert s.sched.sessions == []


@pytest.mark.parametrize(
    ("endpoint", "body", "fragment"),
    [
        ("/v1/chat/completions", b"{nope", "invalid JSON"),
        ("/v1/chat/completions", b'{"messages": []}', "model"),
        ("/v1/completions", b'{"model": "x"}', "prompt"),
        ("/v1/embeddings", b'{"model": "x", "input": "a", "encoding_format": "hex"}', "encoding"),
    ],
)
async def test_openai_malformed_requests_are_400(endpoint: str, body: bytes, fragment: str) -> None:
    async with serving() as s:
        err = assert_openai_error(await s.client.post(endpoint, content=body), 400, fragment)
        assert err["type"] == "invalid_request_error"


async def test_bad_keep_alive_is_400_before_queueing() -> None:
    async with serving() as s:
        r = await s.client.post("/api/chat", json={**OLLAMA_CHAT, "keep_alive": "5 parsecs"})
        assert_ollama_error(r, 400, "keep_alive")
        r = await s.client.post("/v1/chat/completions", json={**OPENAI_CHAT, "keep_alive": "soon"})
        assert_openai_error(r, 400, "keep_alive")
        assert s.sched.sessions == []


async def test_unknown_model_is_404_in_both_shapes() -> None:
    async with serving() as s:
        r = await s.client.post("/api/chat", json={**OLLAMA_CHAT, "model": "llama9"})
        assert_ollama_error(r, 404, "llama9")
        r = await s.client.post("/api/show", json={"model": "llama9"})
        assert_ollama_error(r, 404, "llama9")
        r = await s.client.post("/api/generate", json={"model": "llama9", "keep_alive": 0})
        assert_ollama_error(r, 404, "llama9")
        r = await s.client.post("/v1/chat/completions", json={**OPENAI_CHAT, "model": "llama9"})
        err = assert_openai_error(r, 404, "llama9")
        assert err["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("exc", "status", "fragment"),
    [
        (ServerBusyError("server busy: 512 requests waiting", retry_after_s=2.5), 503, "busy"),
        (RunnerError("runner failed to start", "CUDA out of memory"), 502, "failed to start"),
        (ModelTooLargeError("model needs 80 GiB"), 500, "80 GiB"),
        (InvalidArgumentError("option num_ctx must be a positive integer"), 400, "num_ctx"),
    ],
)
async def test_scheduler_errors_map_to_statuses(exc: Exception, status: int, fragment: str) -> None:
    async with serving() as s:
        s.sched.fail_with = exc
        for stream in (False, True):
            r = await s.client.post("/api/chat", json={**OLLAMA_CHAT, "stream": stream})
            assert_ollama_error(r, status, fragment)
            r = await s.client.post("/v1/chat/completions", json={**OPENAI_CHAT, "stream": stream})
            err = assert_openai_error(r, status, fragment)
            assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
            if status == 503:
                assert r.headers["retry-after"] == "3"


async def test_runner_rejection_is_400_with_its_message() -> None:
    runner = FakeRunner(
        error=(400, {"error": {"message": "Requested tokens (9000) exceed context window of 4096"}})
    )
    async with serving(runner) as s:
        r = await s.client.post("/api/chat", json=OLLAMA_CHAT)
        assert_ollama_error(r, 400, "exceed context window")
        r = await s.client.post("/v1/chat/completions", json=OPENAI_CHAT)
        assert_openai_error(r, 400, "exceed context window")
        assert s.sched.refcount == 0


async def test_runner_validation_detail_is_reported() -> None:
    detail = {"detail": [{"loc": ["body", "messages", 0, "role"], "msg": "bad role"}]}
    async with serving(FakeRunner(error=(422, detail))) as s:
        r = await s.client.post("/v1/chat/completions", json=OPENAI_CHAT)
        assert_openai_error(r, 400, "messages.0.role: bad role")


async def test_runner_failure_is_502_with_its_message_and_a_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = FakeRunner(error=(500, {"error": "llama_decode returned -1"}))
    runner.output.append("/secret/path: another request's output")
    async with serving(runner) as s:
        for stream in (False, True):
            r = await s.client.post("/api/chat", json={**OLLAMA_CHAT, "stream": stream})
            msg = assert_ollama_error(r, 502, "llama_decode returned -1", "HTTP 500")
            # The runner's log stays in the server's log, under the id the client is given.
            assert "last words" not in msg
            assert "secret" not in msg
            rid = r.headers["x-request-id"]
            assert f"request {rid}" in msg
            logged = [rec.getMessage() for rec in caplog.records if rid in rec.getMessage()]
            assert any("another request's output" in line for line in logged)
        r = await s.client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        err = assert_openai_error(r, 502, "llama_decode returned -1")
        assert "last words" not in err["message"]
        assert s.sched.refcount == 0


async def test_runner_unreachable_is_502() -> None:
    runner = FakeRunner(unreachable=True)
    async with serving(runner) as s:
        r = await s.client.post("/api/generate", json={"model": MODEL, "prompt": "x"})
        assert_ollama_error(r, 502, "connection refused", MODEL)
        r = await s.client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert_openai_error(r, 502, "connection refused")


async def test_error_after_streaming_began_ends_the_stream_with_an_error_line() -> None:
    async with serving(FakeRunner(fail_after=2)) as s:
        r = await s.client.post("/api/chat", json={**OLLAMA_CHAT, "stream": True})
        assert r.status_code == 200  # the headers went out with the first token
        lines = ndjson(r.text)
        assert [line["message"]["content"] for line in lines[:2]] == ["Hel", "lo"]
        assert lines[-1] == {"error": lines[-1]["error"]}
        assert "runner exploded" in lines[-1]["error"]

        r = await s.client.post("/v1/chat/completions", json={**OPENAI_CHAT, "stream": True})
        events = sse(r.text)
        assert "[DONE]" not in events
        assert "runner exploded" in events[-1]["error"]["message"]
        assert s.sched.refcount == 0
        metrics = (await s.client.get("/metrics")).text
        assert 'endpoint="/api/chat",status="stream_error"} 1' in metrics


async def test_unknown_route_and_method_use_the_api_shape() -> None:
    async with serving() as s:
        assert_ollama_error(await s.client.post("/api/nothing", json={}), 404, "Not Found")
        assert_openai_error(await s.client.get("/v1/nothing"), 404, "Not Found")
        assert_ollama_error(await s.client.get("/api/chat"), 405, "Method Not Allowed")


# ---- clients that go away ---------------------------------------------------------------------


class RawClient:
    """Drives the ASGI app directly, so a test decides exactly when the client disconnects."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.messages: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def post(
        self, path: str, body: dict[str, Any], *, disconnect_after_chunks: int | None = None
    ) -> None:
        data = json.dumps(body).encode()
        delivered = False
        chunks = 0

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": data, "more_body": False}
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal chunks
            if self.gone.is_set():
                return  # as uvicorn does: sends after a disconnect go nowhere
            self.messages.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                chunks += 1
                if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
                    self.gone.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 11434),
        }
        await self.app(scope, receive, send)


async def _until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def _raw(runner: FakeRunner) -> tuple[Any, FakeScheduler]:
    sched = FakeScheduler(runner)
    return create_app(Settings(), scheduler=sched), sched


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/chat/completions", {**OPENAI_CHAT, "stream": True}),
    ],
)
async def test_disconnect_mid_stream_stops_reading_and_releases(
    path: str, body: dict[str, Any]
) -> None:
    runner = FakeRunner(tokens=[f"t{i} " for i in range(100)], token_delay_s=0.01)
    app, sched = await _raw(runner)
    async with app.router.lifespan_context(app):
        client = RawClient(app)
        t0 = time.monotonic()
        await asyncio.wait_for(client.post(path, body, disconnect_after_chunks=3), 5)
        assert time.monotonic() - t0 < 1.0  # not the 1 s the whole generation takes
        assert sched.refcount == 0
        assert sched.sessions[-1]["released"] is True
        sent_at_disconnect = runner.tokens_sent
        await asyncio.sleep(0.1)
        assert runner.tokens_sent == sent_at_disconnect < 100  # nobody reads the runner any more
        registry = app.state.residency.metrics.registry
        api = (path.split("/")[1] == "v1" and "openai") or "ollama"
        labels = {"api": api, "endpoint": path, "status": "499"}
        assert registry.get_sample_value("residency_http_requests_total", labels) == 1
        assert registry.get_sample_value("residency_http_requests_in_flight") == 0


async def test_disconnect_while_waiting_for_the_model_leaves_the_queue() -> None:
    runner = FakeRunner()
    app, sched = await _raw(runner)
    sched.acquire_delay_s = 30  # queued behind other work, or loading
    async with app.router.lifespan_context(app):
        client = RawClient(app)
        task = asyncio.ensure_future(client.post("/api/chat", OLLAMA_CHAT))
        await asyncio.sleep(0.1)
        assert len(sched.sessions) == 1
        client.gone.set()
        await asyncio.wait_for(task, 2)
        assert sched.refcount == 0
        assert runner.requests == []  # the runner never heard of it
        assert not any(m["type"] == "http.response.start" for m in client.messages)


async def test_a_client_gone_at_once_is_noticed_once_watching_starts() -> None:
    runner = FakeRunner()
    app, sched = await _raw(runner)
    sched.acquire_delay_s = 30
    async with app.router.lifespan_context(app):
        client = RawClient(app)
        client.gone.set()  # gone before the request even waits for its model
        t0 = time.monotonic()
        await asyncio.wait_for(client.post("/v1/chat/completions", OPENAI_CHAT), 2)
        # Watching starts WATCH_DISCONNECT_AFTER_S in; the queue slot is freed right then.
        assert WATCH_DISCONNECT_AFTER_S <= time.monotonic() - t0 < WATCH_DISCONNECT_AFTER_S + 0.5
        assert sched.refcount == 0
        assert runner.requests == []


async def test_disconnect_during_a_non_streamed_generation_releases() -> None:
    runner = FakeRunner(tokens=[f"t{i} " for i in range(100)], token_delay_s=0.01)
    app, sched = await _raw(runner)
    async with app.router.lifespan_context(app):
        client = RawClient(app)
        task = asyncio.ensure_future(client.post("/v1/chat/completions", OPENAI_CHAT))
        task2 = asyncio.ensure_future(RawClient(app).post("/api/chat", OLLAMA_CHAT))
        await asyncio.sleep(0.15)
        client.gone.set()
        await asyncio.wait_for(task, 2)
        # The OpenAI request was cut; the Ollama one (a different client) completes.
        await asyncio.wait_for(task2, 5)
        assert sched.refcount == 0
        assert all(s["released"] for s in sched.sessions)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", OPENAI_CHAT),
        ("/v1/completions", {"model": MODEL, "prompt": "x"}),
        ("/api/generate", {"model": MODEL, "prompt": "x", "stream": False}),
    ],
)
async def test_a_client_gone_from_an_unstreamed_generation_stops_the_runner(
    path: str, body: dict[str, Any]
) -> None:
    # The runner is asked for a stream even so: only then does a closed connection stop it.
    runner = FakeRunner(tokens=[f"t{i} " for i in range(100)], token_delay_s=0.01)
    app, sched = await _raw(runner)
    async with app.router.lifespan_context(app):
        client = RawClient(app)
        task = asyncio.ensure_future(client.post(path, body))
        await _until(lambda: runner.tokens_sent >= 3)
        client.gone.set()
        await asyncio.wait_for(task, 2)
        assert sched.refcount == 0
        assert runner.requests[-1][1]["stream"] is True
        sent_at_disconnect = runner.tokens_sent
        await asyncio.sleep(0.1)
        assert runner.tokens_sent <= sent_at_disconnect + 1 < 100
        assert runner.closed_streams == 1
        assert not any(m["type"] == "http.response.start" for m in client.messages)


async def test_stream_cut_short_by_the_runner_is_an_error() -> None:
    # llama-cpp-python answers 200, then fails (prompt over the context) and closes the stream,
    # printing why only to its log; asked the same unstreamed, it answers 400 with the reason.
    refusal = (400, {"error": {"message": "Requested tokens (3003) exceed context window of 1024"}})
    async with serving(FakeRunner(cut_after=0, unstreamed_error=refusal)) as s:
        r = await s.client.post("/api/chat", json=OLLAMA_CHAT)
        assert_ollama_error(r, 400, "exceed context window of 1024")
        r = await s.client.post("/api/chat", json={**OLLAMA_CHAT, "stream": True})
        assert_ollama_error(r, 400, "exceed context window")  # nothing was streamed yet
        # Asked again unstreamed, for one token (the fake files such a request as `counted`).
        asked_again = s.runner.counted[-1]
        assert (asked_again["stream"], asked_again["max_tokens"]) == (False, 1)
    # Cut before its first event with nothing to refuse: the runner broke (its log is not read).
    async with serving(FakeRunner(cut_after=0)) as s:
        r = await s.client.post("/api/chat", json=OLLAMA_CHAT)
        assert_ollama_error(r, 502, "ended its stream without finishing")
    runner = FakeRunner(cut_after=2, cut_line="RuntimeError: llama_decode returned -3")
    async with serving(runner) as s:
        r = await s.client.post("/api/chat", json={**OLLAMA_CHAT, "stream": True})
        lines = ndjson(r.text)
        assert "ended its stream without finishing" in lines[-1]["error"]
        r = await s.client.post("/v1/chat/completions", json={**OPENAI_CHAT, "stream": True})
        message = sse(r.text)[-1]["error"]["message"]
        assert "ended its stream without finishing" in message
        assert "llama_decode" not in message  # the runner log stays in the server log
        r = await s.client.post("/api/chat", json=OLLAMA_CHAT)  # cut mid-answer, unstreamed
        assert_ollama_error(r, 502, "ended its stream without finishing")
