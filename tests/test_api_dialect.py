"""OpenAI's newer dialect translated for the runner (fakes): what each field becomes, and the
precise 400s for what cannot be served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api_fakes import FakeEntry, FakeRunner, ndjson, serving, sse
from residency.api.translate import thinking_fields

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3:270m"
USER = {"role": "user", "content": "hi"}


def _gguf(path: Path, template: str, *, vision: bool = False) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(2048)
    writer.add_chat_template(template)
    if vision:
        writer.add_uint32("gemma3.vision.block_count", 2)
    writer.add_token_list(["<s>", "</s>", "a"])
    writer.add_tensor("w", np.zeros((4, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _plain_model(s: object, tmp_path: Path, template: str = "{{ m.content }}", **kw: bool) -> None:
    s.sched.entries[MODEL] = FakeEntry(  # type: ignore[attr-defined]
        MODEL, path=_gguf(tmp_path / "m.gguf", template, **kw), details={"format": "gguf"}
    )


async def test_newer_fields_become_the_runners() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "developer", "content": "be brief"}, USER],
                "max_completion_tokens": 7,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                },
            },
        )
        assert r.status_code == 200, r.text
        _, sent = s.runner.requests[-1]
        assert sent["max_tokens"] == 7
        assert "max_completion_tokens" not in sent
        assert sent["messages"][0] == {"role": "system", "content": "be brief"}
        assert sent["response_format"] == {"type": "json_object", "schema": {"type": "object"}}
        assert r.json()["usage"]["completion_tokens"] == 3


async def test_tool_round_trip_kept_for_a_template_with_tools() -> None:
    history = [
        USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    async with serving() as s:  # a model whose metadata is unknown: sent as OpenAI's shape
        r = await s.client.post("/v1/chat/completions", json={"model": MODEL, "messages": history})
        assert r.status_code == 200, r.text
        sent = s.runner.requests[-1][1]["messages"]
        assert sent[1]["content"] == ""
        assert sent[1]["tool_calls"][0]["id"] == "c1"
        assert sent[2]["role"] == "tool"


async def test_tool_round_trip_as_plain_turns_for_a_template_without_tools(
    tmp_path: Path,
) -> None:
    history = [
        USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "so?"},
    ]
    async with serving() as s:
        _plain_model(s, tmp_path)
        r = await s.client.post("/v1/chat/completions", json={"model": MODEL, "messages": history})
        assert r.status_code == 200, r.text
        sent = s.runner.requests[-1][1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert "w" in sent[1]["content"]
        assert "tool_calls" not in sent[1]
        assert "sunny" in sent[2]["content"]
        assert "so?" in sent[2]["content"]
        # tools offered to such a model are refused as Ollama refuses them
        tools = [{"type": "function", "function": {"name": "w", "parameters": {}}}]
        r = await s.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [USER], "tools": tools}
        )
        assert r.status_code == 400
        assert r.json()["error"]["message"] == f'"{MODEL}" does not support tools'


async def test_n_choices_are_served_one_by_one() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [USER], "n": 3}
        )
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert all(c["message"]["content"] == "Hello world" for c in body["choices"])
        # The fake streams no usage (as llama-cpp-python): the prompt is counted once for the
        # three choices, by the runner itself (see the next test); each choice streamed 3 tokens.
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
        assert all("n" not in sent for _, sent in s.runner.requests)
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [USER], "n": 2, "stream": True},
        )
        assert r.status_code == 400
        assert "stream" in r.json()["error"]["message"]


async def test_prompt_lists_and_token_ids() -> None:
    async with serving() as s:
        r = await s.client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert [sent["prompt"] for _, sent in s.runner.requests] == ["a", "b"]
        assert body["usage"]["prompt_tokens"] == 2  # "a" and "b", one token each
        before = len(s.runner.requests)
        for path, field, value in (
            ("/v1/completions", "prompt", [1, 2, 3]),
            ("/v1/embeddings", "input", [[1, 2]]),
        ):
            r = await s.client.post(path, json={"model": MODEL, field: value})
            assert r.status_code == 400, r.text
            assert "token ids is not supported" in r.json()["error"]["message"]
        assert len(s.runner.requests) == before


async def test_include_usage_chunk_counted_when_the_runner_sends_none() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [USER],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        events = sse(r.text)
        assert events[-1] == "[DONE]"
        last = events[-2]
        assert last["choices"] == []
        # The rendered chat's count, as the runner counts it: the same chat asked unstreamed for
        # one token (the fake's answer says 5), not its text's tokens (1 here).
        assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        (asked,) = s.runner.counted
        assert asked == {"messages": [USER], "model": MODEL, "stream": False, "max_tokens": 1}
        # without asking, no usage chunk
        r = await s.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [USER], "stream": True}
        )
        assert all("usage" not in e for e in sse(r.text)[:-1])


async def test_runner_usage_is_passed_on_when_it_counts() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    async with serving(FakeRunner(final_extra={"usage": usage})) as s:
        r = await s.client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [USER],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        chunks = [e for e in sse(r.text)[:-1] if e.get("usage")]
        assert [c["usage"] for c in chunks] == [usage]


async def test_bad_response_format_is_a_precise_400() -> None:
    async with serving() as s:
        for fmt in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "x"}}):
            r = await s.client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [USER], "response_format": fmt},
            )
            assert r.status_code == 400, r.text
        assert s.runner.requests == []


async def test_ollama_refuses_what_the_model_cannot_do(tmp_path: Path) -> None:
    async with serving() as s:
        _plain_model(s, tmp_path)
        for extra, what in (
            ({"tools": [{"type": "function", "function": {"name": "w"}}]}, "tools"),
            ({"think": True}, "thinking"),
        ):
            r = await s.client.post("/api/chat", json={"model": MODEL, "messages": [USER], **extra})
            assert r.status_code == 400
            assert r.json() == {"error": f'"{MODEL}" does not support {what}'}
        r = await s.client.post(
            "/api/chat",
            json={"model": MODEL, "messages": [{**USER, "images": ["aGVsbG8="]}]},
        )
        assert r.status_code == 400
        assert "image input" in r.json()["error"]
        assert s.runner.requests == []


async def test_ollama_passes_what_the_model_can_do(tmp_path: Path) -> None:
    async with serving() as s:
        _plain_model(s, tmp_path, "{{ tools }} <think>", vision=True)
        r = await s.client.post(
            "/api/chat",
            json={
                "model": MODEL,
                "stream": False,
                "think": True,
                "tools": [{"type": "function", "function": {"name": "w"}}],
                "messages": [{**USER, "images": ["aGVsbG8="]}],
            },
        )
        assert r.status_code == 200, r.text
        assert s.runner.requests[-1][1]["tools"][0]["function"]["name"] == "w"
        show = (await s.client.post("/api/show", json={"model": MODEL})).json()
        assert show["capabilities"] == ["completion", "tools", "thinking", "vision"]


@pytest.mark.parametrize(
    ("think", "fields"),
    [
        (None, {}),
        (False, {"chat_template_kwargs": {"enable_thinking": False}}),
        (True, {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_format": "deepseek"}),
        (
            "high",
            {
                "chat_template_kwargs": {"enable_thinking": True},
                "reasoning_effort": "high",
                "reasoning_format": "deepseek",
            },
        ),
    ],
)
def test_think_in_llama_servers_fields(think: bool | str | None, fields: dict[str, Any]) -> None:
    assert thinking_fields(think) == fields


async def test_think_reaches_the_runner_and_its_thinking_comes_back(tmp_path: Path) -> None:
    runner = FakeRunner(reasoning=["Let me ", "see."])
    async with serving(runner) as s:
        _plain_model(s, tmp_path, "{% if enable_thinking %}<think>{% endif %}")
        chat = {"model": MODEL, "messages": [USER], "think": True}
        r = await s.client.post("/api/chat", json={**chat, "stream": False})
        assert r.status_code == 200, r.text
        message = r.json()["message"]
        assert message == {"role": "assistant", "content": "Hello world", "thinking": "Let me see."}
        sent = s.runner.requests[-1][1]
        assert sent["chat_template_kwargs"] == {"enable_thinking": True}
        assert sent["reasoning_format"] == "deepseek"
        # Streamed: the thinking comes first, in its own field, as Ollama streams it.
        r = await s.client.post("/api/chat", json={**chat, "stream": True})
        pieces = [line["message"] for line in ndjson(r.text)[:-1]]
        assert [p.get("thinking") for p in pieces[:2]] == ["Let me ", "see."]
        assert "".join(p["content"] for p in pieces) == "Hello world"
        # /api/generate: the thinking beside the response.
        gen = {"model": MODEL, "prompt": "hi", "think": "low", "stream": False}
        r = await s.client.post("/api/generate", json=gen)
        assert r.json()["thinking"] == "Let me see."
        assert s.runner.requests[-1][1]["reasoning_effort"] == "low"
        r = await s.client.post("/api/generate", json={**gen, "think": "extreme"})
        assert r.status_code == 400
        assert "think must be" in r.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "hint"),
    [
        ("POST", "/api/pull", "ollama pull"),
        ("POST", "/api/push", "ollama push"),
        ("POST", "/api/create", "models_dir"),
        ("POST", "/api/copy", "ollama cp"),
        ("DELETE", "/api/delete", "ollama rm"),
        ("POST", "/api/blobs/sha256:00", "models_dir"),
    ],
)
async def test_management_endpoints_say_what_to_do_instead(
    method: str, path: str, hint: str
) -> None:
    async with serving() as s:
        r = await s.client.request(method, path, json={"model": MODEL})
        assert r.status_code == 501
        assert hint in r.json()["error"]


async def test_ollama_tool_history_as_plain_turns_for_a_template_without_tools(
    tmp_path: Path,
) -> None:
    history = [
        USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "w", "arguments": {"c": 1}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "w"},
    ]
    async with serving() as s:
        _plain_model(s, tmp_path)
        r = await s.client.post(
            "/api/chat", json={"model": MODEL, "stream": False, "messages": history}
        )
        assert r.status_code == 200, r.text
        sent = s.runner.requests[-1][1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert '{"c":1}' in sent[1]["content"]
        assert sent[2]["content"] == "Result of tool w: sunny"


def test_one_answer_keeps_the_runners_usage_details() -> None:
    # llama-server reports the prompt tokens its cache served (the KV-restore tests read them).
    from residency.api.dialect import merged_answers

    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    answer = {
        "choices": [{"index": 0}],
        "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 7}},
    }
    assert merged_answers([{**answer, "_prompt_key": ""}]) == answer
    two = merged_answers([{**answer, "_prompt_key": "a"}, {**answer, "_prompt_key": "b"}])
    assert two["usage"] == {"prompt_tokens": 18, "completion_tokens": 4, "total_tokens": 22}
    assert [c["index"] for c in two["choices"]] == [0, 1]
