"""Ollama's API over a fake scheduler and a fake runner: shapes, translation, timing.

The same endpoints run against the real scheduler, runner and model in test_e2e_clients.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from api_fakes import RUNNER_MODEL, FakeEntry, FakeRunner, ndjson, serving

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3:270m"


async def test_generate_non_streaming_translates_and_measures() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/api/generate",
            json={
                "model": MODEL,
                "prompt": "Why is the sky blue?",
                "stream": False,
                "keep_alive": "10m",
                "options": {
                    "temperature": 0.2,
                    "num_predict": 64,
                    "top_k": 20,
                    "seed": 7,
                    "stop": "\n\n",
                    "num_ctx": 1024,
                    "made_up_option": 1,
                },
            },
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["model"] == MODEL
        assert body["response"] == "Hello world"
        assert body["done"] is True
        assert body["done_reason"] == "stop"
        assert body["load_duration"] == 1_500_000_000  # the lease's, as measured by the scheduler
        assert body["eval_count"] == 3  # the token chunks the runner streamed (it sent no usage)
        # No usage from the runner: its tokenizer counted the prompt's text (5 words, 5 tokens).
        assert body["prompt_eval_count"] == 5
        for key in ("total_duration", "prompt_eval_duration", "eval_duration"):
            assert isinstance(body[key], int)
            assert body[key] >= 0
        assert body["total_duration"] >= body["prompt_eval_duration"] + body["eval_duration"]
        datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))

        # The runner saw an OpenAI chat request with Ollama's options renamed...
        path, sent = s.runner.requests[-1]
        assert path == "/v1/chat/completions"
        assert sent["model"] == MODEL
        assert sent["stream"] is True
        assert sent["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
        assert sent["temperature"] == 0.2
        assert sent["max_tokens"] == 64
        assert sent["top_k"] == 20
        assert sent["seed"] == 7
        assert sent["stop"] == ["\n\n"]
        assert "num_ctx" not in sent
        assert "made_up_option" not in sent
        # ...and the scheduler got the load option and the keep-alive.
        assert s.sched.sessions[-1]["options"] == {"num_ctx": 1024}
        assert s.sched.sessions[-1]["keep_alive"] == "10m"
        assert s.sched.sessions[-1]["released"] is True


async def test_warm_request_has_zero_load_duration() -> None:
    async with serving() as s:
        req = {"model": MODEL, "prompt": "hi", "stream": False}
        cold = (await s.client.post("/api/generate", json=req)).json()
        warm = (await s.client.post("/api/generate", json=req)).json()
        assert cold["load_duration"] == 1_500_000_000
        assert warm["load_duration"] == 0


async def test_generate_streams_ndjson() -> None:
    async with serving() as s:
        r = await s.client.post("/api/generate", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(r.text)
        assert [line["response"] for line in lines[:-1]] == ["Hel", "lo", " world"]
        assert all(line["done"] is False for line in lines[:-1])
        assert all(line["model"] == MODEL for line in lines)
        last = lines[-1]
        assert last["done"] is True
        assert last["response"] == ""
        assert last["done_reason"] == "stop"
        assert last["eval_count"] == 3
        assert s.sched.refcount == 0


async def test_generate_system_raw_and_suffix() -> None:
    async with serving() as s:
        await s.client.post(
            "/api/generate",
            json={"model": MODEL, "prompt": "hi", "system": "be brief", "stream": False},
        )
        path, sent = s.runner.requests[-1]
        assert path == "/v1/chat/completions"
        assert sent["messages"][0] == {"role": "system", "content": "be brief"}

        await s.client.post(
            "/api/generate",
            json={"model": MODEL, "prompt": "<start>raw", "raw": True, "stream": False},
        )
        path, sent = s.runner.requests[-1]
        assert path == "/v1/completions"
        assert sent["prompt"] == "<start>raw"
        assert "messages" not in sent

        await s.client.post(
            "/api/generate",
            json={"model": MODEL, "prompt": "def f(", "suffix": "return x", "stream": False},
        )
        path, sent = s.runner.requests[-1]
        assert path == "/v1/completions"
        assert sent["suffix"] == "return x"


async def test_runner_usage_and_timings_are_preferred() -> None:
    runner = FakeRunner(
        final_extra={
            "usage": {"prompt_tokens": 11, "completion_tokens": 3},
            "timings": {"prompt_n": 11, "prompt_ms": 12.5, "predicted_n": 3, "predicted_ms": 30.0},
        }
    )
    async with serving(runner) as s:
        body = (
            await s.client.post(
                "/api/generate", json={"model": MODEL, "prompt": "x", "stream": False}
            )
        ).json()
        assert body["prompt_eval_count"] == 11
        assert body["prompt_eval_duration"] == 12_500_000
        assert body["eval_count"] == 3
        assert body["eval_duration"] == 30_000_000


async def test_length_limit_is_reported() -> None:
    async with serving(FakeRunner(finish_reason="length")) as s:
        body = (
            await s.client.post(
                "/api/generate", json={"model": MODEL, "prompt": "x", "stream": False}
            )
        ).json()
        assert body["done_reason"] == "length"


async def test_chat_non_streaming_and_message_translation() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/api/chat",
            json={
                "model": MODEL,
                "stream": False,
                "format": "json",
                "messages": [
                    {"role": "user", "content": "look", "images": ["aGVsbG8="]},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"function": {"name": "weather", "arguments": {"city": "Paris"}}}
                        ],
                    },
                    {"role": "tool", "content": "sunny", "tool_name": "weather"},
                ],
                "tools": [{"type": "function", "function": {"name": "weather"}}],
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["message"] == {"role": "assistant", "content": "Hello world"}
        assert body["done"] is True
        _, sent = s.runner.requests[-1]
        user, assistant, tool = sent["messages"]
        assert user["content"] == [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,aGVsbG8="}},
        ]
        call = assistant["tool_calls"][0]
        assert call["type"] == "function"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert tool == {"role": "tool", "content": "sunny", "name": "weather"}
        assert sent["tools"] == [{"type": "function", "function": {"name": "weather"}}]
        assert sent["response_format"] == {"type": "json_object"}


async def test_chat_format_schema() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    async with serving() as s:
        await s.client.post(
            "/api/chat",
            json={
                "model": MODEL,
                "stream": False,
                "format": schema,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert s.runner.requests[-1][1]["response_format"] == {
            "type": "json_object",
            "schema": schema,
        }


async def test_chat_streams_messages() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        lines = ndjson(r.text)
        assert [line["message"]["content"] for line in lines] == ["Hel", "lo", " world", ""]
        assert all(line["message"]["role"] == "assistant" for line in lines)
        assert lines[-1]["done"] is True
        assert lines[-1]["done_reason"] == "stop"
        assert lines[-1]["load_duration"] == 1_500_000_000


@pytest.mark.parametrize(
    ("endpoint", "empty"),
    [("/api/generate", {"prompt": ""}), ("/api/chat", {"messages": []}), ("/api/generate", {})],
)
async def test_empty_request_loads(endpoint: str, empty: dict[str, object]) -> None:
    async with serving() as s:
        r = await s.client.post(endpoint, json={"model": MODEL, "keep_alive": -1, **empty})
        assert r.status_code == 200
        body = r.json()  # one JSON object, not a stream
        assert body["done"] is True
        assert body["done_reason"] == "load"
        assert body["model"] == MODEL
        if endpoint == "/api/chat":
            assert body["message"] == {"role": "assistant", "content": ""}
        else:
            assert body["response"] == ""
        assert s.sched.loaded == {MODEL}
        assert s.sched.sessions[-1]["keep_alive"] == -1
        assert s.runner.requests == []  # nothing was generated


@pytest.mark.parametrize("zero", [0, "0", "0s", 0.0])
async def test_empty_request_with_keep_alive_zero_unloads(zero: object) -> None:
    async with serving() as s:
        s.sched.loaded.add(MODEL)
        r = await s.client.post(
            "/api/chat", json={"model": MODEL + ":latest", "messages": [], "keep_alive": zero}
        )
        assert r.status_code == 200
        body = r.json()
        assert body["done_reason"] == "unload"
        assert body["model"] == MODEL + ":latest"
        assert s.sched.unloaded == [MODEL]
        assert s.sched.sessions == []  # unloading does not load first


async def test_keep_alive_zero_with_prompt_is_a_normal_request() -> None:
    async with serving() as s:
        r = await s.client.post(
            "/api/generate", json={"model": MODEL, "prompt": "x", "keep_alive": 0, "stream": False}
        )
        assert r.json()["response"] == "Hello world"
        assert s.sched.sessions[-1]["keep_alive"] == 0


async def test_embed_normalises_like_ollama() -> None:
    async with serving() as s:
        r = await s.client.post("/api/embed", json={"model": MODEL, "input": ["a", "b"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == MODEL
        first, second = body["embeddings"]
        assert first == pytest.approx([0.6, 0.8, 0.0])
        assert second == pytest.approx((np.array([3, 4, 1]) / np.sqrt(26)).tolist())
        assert body["prompt_eval_count"] == 7
        assert body["load_duration"] == 1_500_000_000
        assert body["total_duration"] > 0
        path, sent = s.runner.requests[-1]
        assert path == "/v1/embeddings"
        assert sent["input"] == ["a", "b"]

        one = (await s.client.post("/api/embed", json={"model": MODEL, "input": "a"})).json()
        assert len(one["embeddings"]) == 1

        cut = (
            await s.client.post("/api/embed", json={"model": MODEL, "input": "a", "dimensions": 1})
        ).json()
        assert cut["embeddings"] == [[1.0]]  # truncated, then normalised


async def test_embed_empty_input_only_loads() -> None:
    async with serving() as s:
        body = (await s.client.post("/api/embed", json={"model": MODEL, "input": []})).json()
        assert body["embeddings"] == []
        assert s.sched.loaded == {MODEL}
        assert s.runner.requests == []


async def test_legacy_embeddings_are_raw() -> None:
    async with serving() as s:
        body = (await s.client.post("/api/embeddings", json={"model": MODEL, "prompt": "a"})).json()
        assert body == {"embedding": [3.0, 4.0, 0.0]}
        empty = (await s.client.post("/api/embeddings", json={"model": MODEL, "prompt": ""})).json()
        assert empty == {"embedding": []}


async def test_ps_shows_ollama_fields_and_residency_accounting() -> None:
    async with serving() as s:
        await s.client.post("/api/generate", json={"model": MODEL})  # load
        body = (await s.client.get("/api/ps")).json()
        (m,) = body["models"]
        assert m["name"] == m["model"] == MODEL
        assert m["size"] == 500_000_000
        assert m["size_vram"] == 500_000_000
        assert m["warm_bytes"] == 200_000_000
        assert m["context_length"] == 2048
        assert m["digest"] == ""  # /models/fake.gguf does not exist: nothing to hash
        assert m["details"] == {
            "parent_model": "",
            "format": "unknown",
            "family": "gemma3",
            "families": ["gemma3"],
            "parameter_size": "270M",
            "quantization_level": "Q4_K_M",
        }
        expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
        left = (expires - datetime.now(timezone.utc)).total_seconds()
        assert 200 < left <= 300
        assert m["device"] == "cuda:0"
        assert m["measured_bytes"] == 480_000_000
        assert m["estimated_bytes"] == 450_000_000
        assert m["refcount"] == 0

        s.sched.expires_at = None  # kept forever: Ollama's far-future date
        (m,) = (await s.client.get("/api/ps")).json()["models"]
        expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
        assert expires.year > datetime.now(timezone.utc).year + 200


async def test_tags_lists_configured_models() -> None:
    async with serving(names=("gemma3:270m", "other")) as s:
        body = (await s.client.get("/api/tags")).json()
        assert [m["name"] for m in body["models"]] == ["gemma3:270m", "other:latest"]
        m = body["models"][0]
        assert m["model"] == "gemma3:270m"
        assert m["size"] == 1234
        assert m["modified_at"] == "2025-01-02T03:04:05Z"
        assert set(m["details"]) == {
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }


def _write_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %} tools")
    writer.add_token_list(["<s>", "</s>", "a"])
    writer.add_tensor("w", np.zeros((4, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


async def test_show_reads_the_gguf_header(tmp_path: Path) -> None:
    model_file = tmp_path / "tiny.gguf"
    _write_gguf(model_file)
    async with serving() as s:
        s.sched.entries[MODEL] = FakeEntry(
            MODEL,
            path=model_file,
            details={"format": "gguf", "family": "llama", "parameter_size": "12"},
        )
        body = (await s.client.post("/api/show", json={"model": MODEL})).json()
        info = body["model_info"]
        assert info["general.architecture"] == "llama"
        assert info["llama.context_length"] == 2048
        assert info["general.parameter_count"] == 12
        assert info["tokenizer.ggml.tokens"] is None  # arrays only when verbose, as Ollama
        assert "tools" in body["template"]
        assert body["capabilities"] == ["completion", "tools"]
        assert body["details"]["family"] == "llama"
        assert "FROM " + str(model_file) in body["modelfile"]
        assert "num_ctx" in body["parameters"]

        verbose = (await s.client.post("/api/show", json={"name": MODEL, "verbose": True})).json()
        assert verbose["model_info"]["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a"]


async def test_version_and_root() -> None:
    async with serving() as s:
        assert (await s.client.get("/api/version")).json()["version"]
        root = await s.client.get("/")
        assert root.text == "Ollama is running"
        head = await s.client.head("/")
        assert head.status_code == 200


async def test_body_is_json_whatever_the_content_type() -> None:
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; Ollama accepts it, so do we.
    async with serving() as s:
        r = await s.client.post(
            "/api/generate",
            content=json.dumps({"model": MODEL, "prompt": "hi", "stream": False}),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["response"] == "Hello world"


async def test_model_name_is_the_one_asked_for() -> None:
    async with serving() as s:
        body = (
            await s.client.post(
                "/api/generate", json={"model": MODEL + ":latest", "prompt": "x", "stream": False}
            )
        ).json()
        assert body["model"] == MODEL + ":latest"
        assert RUNNER_MODEL not in json.dumps(body)


async def test_per_token_embeddings_are_mean_pooled() -> None:
    async with serving(FakeRunner(per_token_embeddings=True)) as s:
        body = (await s.client.post("/api/embed", json={"model": MODEL, "input": "a"})).json()
        assert body["embeddings"] == [pytest.approx([0.6, 0.8, 0.0])]
        legacy = (
            await s.client.post("/api/embeddings", json={"model": MODEL, "prompt": "a"})
        ).json()
        assert legacy["embedding"] == [3.0, 4.0, 0.0]
        oa = (await s.client.post("/v1/embeddings", json={"model": MODEL, "input": "a"})).json()
        assert oa["data"][0]["embedding"] == [3.0, 4.0, 0.0]
