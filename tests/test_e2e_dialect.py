"""End to end: OpenAI's newer dialect and Ollama's capability checks against `residency serve`
with the real llama-cpp-python runner and the real Gemma 3 270M (whose template has no tools)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from e2e_server import ServeProcess, serving
from scheduler_helpers import require_llama_cpp

require_llama_cpp()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = "gemma3:270m"
USER = {"role": "user", "content": "Say hello."}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serving(tmp_path_factory.mktemp("dialect"), "default_ctx = 1024\n") as srv:
        yield srv


def _post(server: ServeProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def _sse(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_max_completion_tokens_and_developer_role(server: ServeProcess) -> None:
    r = _post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "developer", "content": "Answer briefly."}, USER],
            "max_completion_tokens": 5,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"]
    assert 0 < body["usage"]["completion_tokens"] <= 5
    assert body["usage"]["prompt_tokens"] > 0


def test_json_schema_is_followed(server: ServeProcess) -> None:
    schema = {
        "type": "object",
        # maxLength makes the grammar close the string within max_tokens, on any CPU's arithmetic.
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    r = _post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Name a city in France as JSON."}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": schema},
            },
            "max_tokens": 40,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    answer = json.loads(r.json()["choices"][0]["message"]["content"])
    assert isinstance(answer["city"], str)


def test_tool_round_trip_history_is_served(server: ServeProcess) -> None:
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = _post(
        server, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip()
    # Gemma's template has no tools: offering them is refused as Ollama refuses them.
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    r = _post(server, "/v1/chat/completions", {"messages": [USER], "tools": tools})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == f'"{MODEL}" does not support tools'
    r = _post(server, "/api/chat", {"messages": [USER], "tools": tools, "stream": False})
    assert r.status_code == 400
    assert r.json() == {"error": f'"{MODEL}" does not support tools'}


def test_n_and_prompt_lists_are_served(server: ServeProcess) -> None:
    r = _post(
        server,
        "/v1/completions",
        {"prompt": ["Once upon", "The sky is"], "n": 2, "max_tokens": 4, "temperature": 0.8},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] for c in body["choices"])
    assert 4 <= body["usage"]["completion_tokens"] <= 16
    r = _post(server, "/v1/embeddings", {"input": [[1, 2, 3]]})
    assert r.status_code == 400
    assert "token ids" in r.json()["error"]["message"]


def test_include_usage_chunk(server: ServeProcess) -> None:
    r = _post(
        server,
        "/v1/chat/completions",
        {
            "messages": [USER],
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200, r.text
    events = _sse(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2])
    assert text
    usage = events[-2]["usage"]
    assert 0 < usage["completion_tokens"] <= 6
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_ollama_counts(server: ServeProcess) -> None:
    r = _post(
        server,
        "/api/generate",
        {"prompt": "Say hello.", "stream": False, "options": {"num_predict": 6, "temperature": 0}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response"]
    assert 0 < body["eval_count"] <= 6
    assert body["prompt_eval_count"] > 0


def test_llamaindex_default_num_ctx_and_beyond_are_served(server: ServeProcess) -> None:
    # LlamaIndex's Ollama client sends num_ctx = the model's training context (32,768 here);
    # anything beyond it is clamped to it, as Ollama does.
    for num_ctx in (32768, 1_000_000):
        r = _post(
            server,
            "/api/chat",
            {
                "messages": [USER],
                "stream": False,
                "options": {"num_ctx": num_ctx, "num_predict": 4, "temperature": 0},
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["message"]["content"]
    ps = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
    assert [m["context_length"] for m in ps] == [32768]
    assert "n_ctx_train=32768" in server.log_path.read_text(errors="replace")
