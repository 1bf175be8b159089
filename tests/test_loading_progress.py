"""Loading progress for the clients that ask for it (issue 18, item 6): with
``X-Residency-Loading-Progress`` a streamed request gets progress chunks while its model loads —
Ollama lines with empty content and a ``loading`` object, OpenAI ``reasoning_content`` deltas or
SSE comments — and the official clients still read the answer; without it nothing changes.
The fake scheduler stands in for a slow load; the last test loads the real Gemma 3 270M in the
real llama-server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from api_fakes import ndjson, serving, sse
from residency.api import create_app
from residency.config import ModelConfig, load_settings
from residency.embedded import default_model_path
from residency.scheduler import Scheduler

pytestmark = pytest.mark.timeout(120)

MODEL = "gemma3:270m"
CHAT = [{"role": "user", "content": "hi"}]
ON = {"X-Residency-Loading-Progress": "1"}


def loading_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if "loading" in line]


async def test_ollama_lines_while_loading_then_the_answer() -> None:
    async with serving() as s:
        s.sched.acquire_delay_s = 0.8  # a load
        body = {"model": MODEL, "messages": CHAT}
        lines = ndjson((await s.client.post("/api/chat", json=body, headers=ON)).text)
        progress = loading_lines(lines)
        assert len(progress) >= 2  # at least one while waiting, and "ready"
        assert progress[0]["loading"]["state"] == "queued"
        assert progress[-1]["loading"]["state"] == "ready"
        assert progress[-1]["loading"]["elapsed_s"] >= 0.8
        for line in progress:  # shaped like the stream's own lines, with nothing to show
            assert line["message"] == {"role": "assistant", "content": ""}
            assert line["done"] is False
        first_text = next(
            i for i, line in enumerate(lines) if line.get("message", {}).get("content")
        )
        assert first_text > lines.index(progress[-1])
        assert "".join(line["message"]["content"] for line in lines) == "Hello world"
        assert lines[-1]["done"] is True

        # Ollama's client reads on past them (it drops the field it does not know).
        s.sched.loaded.clear()
        client = ollama.AsyncClient(
            host="http://localhost", transport=httpx.ASGITransport(app=s.app), headers=ON
        )
        parts = [p async for p in await client.chat(model=MODEL, messages=CHAT, stream=True)]
        assert "".join(p.message.content or "" for p in parts) == "Hello world"

        # Warm, or not asked for: not one line more.
        s.sched.acquire_delay_s = 0.0
        warm = ndjson((await s.client.post("/api/chat", json=body, headers=ON)).text)
        assert loading_lines(warm) == []
        s.sched.acquire_delay_s = 0.3
        plain = ndjson(
            (await s.client.post("/api/generate", json={"model": MODEL, "prompt": "x"})).text
        )
        assert loading_lines(plain) == []


async def test_openai_reasoning_deltas_or_comments_and_the_client_reads_on() -> None:
    async with serving() as s:
        s.sched.acquire_delay_s = 0.6
        body = {"model": MODEL, "messages": CHAT, "stream": True}
        r = await s.client.post("/v1/chat/completions", json=body, headers=ON)
        events = sse(r.text)
        thinking = [e for e in events if isinstance(e, dict) and e["id"] == "chatcmpl-loading"]
        assert len(thinking) >= 2
        assert thinking[0]["choices"][0]["delta"]["role"] == "assistant"
        assert thinking[0]["choices"][0]["delta"]["reasoning_content"].startswith(
            f"Loading {MODEL} (queued, "
        )
        assert "loaded in" in thinking[-1]["choices"][0]["delta"]["reasoning_content"]
        assert events[-1] == "[DONE]"

        r = await s.client.post(
            "/v1/chat/completions", json=body, headers={"X-Residency-Loading-Progress": "comment"}
        )
        comments = [b for b in r.text.split("\n\n") if b.startswith(": ")]
        assert comments[0].startswith(f": Loading {MODEL}")
        assert not any(e["id"] == "chatcmpl-loading" for e in sse(r.text) if isinstance(e, dict))

        r = await s.client.post(  # /v1/completions has no reasoning field: comments
            "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}, headers=ON
        )
        assert r.text.startswith(f": Loading {MODEL}")

        # The official client, asking for progress, reads the same answer as without it.
        client = openai.AsyncOpenAI(
            base_url="http://localhost/v1",
            api_key="unused",
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app)),
            default_headers=ON,
        )
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)  # type: ignore[arg-type]
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello world"

        r = await s.client.post(
            "/v1/chat/completions", json=body, headers={"X-Residency-Loading-Progress": "maybe"}
        )
        assert r.status_code == 400
        assert "x-residency-loading-progress" in r.json()["error"]["message"]


@pytest.mark.e2e
async def test_a_real_llama_server_load_streams_progress(tmp_path: Path) -> None:
    from llama_server_fixtures import require_llama_server

    require_llama_server()
    model = ModelConfig(name="gemma", path=default_model_path(), runner="llama-server", ctx=512)
    settings: Any = load_settings(models=[model], kv_persist=False, discover=False)
    s = Scheduler(settings)
    app = create_app(settings, scheduler=s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            body = {
                "model": "gemma",
                "messages": CHAT,
                "options": {"temperature": 0, "num_predict": 8},
            }
            r = await c.post("/api/chat", json=body, headers=ON, timeout=300)
    lines = ndjson(r.text)
    loading = loading_lines(lines)
    assert loading, "no progress line before the first token of a cold load"
    assert loading[0]["loading"]["state"] in ("queued", "loading")
    assert loading[-1]["loading"]["state"] == "ready"
    assert all(line["message"]["content"] == "" for line in loading)
    assert lines[-1]["done"] is True
    assert any(line["message"]["content"] for line in lines)  # then the answer
