"""OpenAI's API over fakes: passthrough, the model name asked for, residency's extensions."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from api_fakes import RUNNER_MODEL, serving, sse

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3:270m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def test_chat_passes_through_with_the_asked_name() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/v1/chat/completions",
            json={**CHAT, "temperature": 0, "top_k": 3, "vendor_field": {"x": 1}},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == MODEL  # not the runner's internal name
        assert body["choices"][0]["message"]["content"] == "Hello world"
        assert body["usage"]["completion_tokens"] == 3
        path, sent = s.runner.requests[-1]
        assert path == "/v1/chat/completions"
        # Unknown fields reach the runner untouched; only what the client set is sent, asked as
        # a stream (so the runner stops if the client leaves) and assembled.
        assert sent == {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0,
            "top_k": 3,
            "vendor_field": {"x": 1},
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert s.sched.sessions[-1]["released"] is True


async def test_a_name_the_runner_does_not_know_is_rewritten_both_ways() -> None:
    async with serving() as s:
        r = await s.client.post("/v1/chat/completions", json={**CHAT, "model": MODEL + ":latest"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == MODEL + ":latest"
        assert s.runner.requests[-1][1]["model"] == MODEL  # the runner's own name


async def test_keep_alive_and_num_ctx_are_residency_extensions() -> None:
    async with serving() as s:
        await s.client.post("/v1/chat/completions", json={**CHAT, "keep_alive": -1, "num_ctx": 512})
        _, sent = s.runner.requests[-1]
        assert "keep_alive" not in sent
        assert "num_ctx" not in sent
        assert s.sched.sessions[-1]["keep_alive"] == -1
        assert s.sched.sessions[-1]["options"] == {"num_ctx": 512}


async def test_chat_stream_is_sse_with_done() -> None:
    async with serving() as s:
        r = await s.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["model"] == MODEL for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == "Hello world"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert RUNNER_MODEL not in r.text
        assert s.sched.refcount == 0


async def test_completions_plain_and_streamed() -> None:
    async with serving() as s:
        body = (
            await s.client.post("/v1/completions", json={"model": MODEL, "prompt": "Once"})
        ).json()
        assert body["choices"][0]["text"] == "Hello world"
        assert body["model"] == MODEL
        assert s.runner.requests[-1][0] == "/v1/completions"

        r = await s.client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Once", "stream": True}
        )
        events = sse(r.text)
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello world"


async def test_embeddings_float_and_base64() -> None:
    async with serving() as s:
        body = (
            await s.client.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
        ).json()
        assert body["model"] == MODEL
        assert [d["embedding"] for d in body["data"]] == [[3.0, 4.0, 0.0], [3.0, 4.0, 1.0]]
        assert body["usage"]["prompt_tokens"] == 7

        b64 = (
            await s.client.post(
                "/v1/embeddings",
                json={"model": MODEL, "input": "a", "encoding_format": "base64"},
            )
        ).json()
        raw = base64.b64decode(b64["data"][0]["embedding"])
        assert np.frombuffer(raw, dtype="<f4").tolist() == [3.0, 4.0, 0.0]
        assert "encoding_format" not in s.runner.requests[-1][1]

        cut = (
            await s.client.post(
                "/v1/embeddings", json={"model": MODEL, "input": "a", "dimensions": 2}
            )
        ).json()
        assert cut["data"][0]["embedding"] == pytest.approx([0.6, 0.8])


async def test_models_list_and_lookup() -> None:
    async with serving(names=("gemma3:270m", "org/other")) as s:
        body = (await s.client.get("/v1/models")).json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["gemma3:270m", "org/other:latest"]
        assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
        one = (await s.client.get("/v1/models/org/other")).json()
        assert one["id"] == "org/other"
        missing = await s.client.get("/v1/models/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


async def test_empty_messages_are_rejected() -> None:
    async with serving() as s:
        r = await s.client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert "messages" in err["message"]
        assert s.sched.sessions == []
