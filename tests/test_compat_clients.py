"""The client libraries people use, against `residency serve` with the real runner and Gemma 3
270M: chat, stream, generate/completions, embeddings, list/show/ps, structured output, a tool-call
round trip, async and a batch of 3 concurrent — full, non-empty answers with usage.

Gemma 3's template has no tools: offering tools is refused (HTTP 400, as Ollama refuses it); the
round trip (a history holding a tool call and its result) is served. A library that is not
installed is skipped with the reason printed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field

from e2e_server import ServeProcess, serving
from scheduler_helpers import require_llama_cpp

require_llama_cpp()

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    # The libraries' own leaks and import-time warnings (their sockets, their pydantic models):
    # the server under test is another process, so none of these can be residency's.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

MODEL = "gemma3:270m"
FEW = 8  # tokens per answer: enough to be an answer, few enough for 2 cores
PROMPT = "Name a colour."


class City(BaseModel):
    # Bounded so that the runner's grammar must close the string: a 270M model at any
    # temperature can otherwise ramble ("Paris, France, 1999000…") past max_tokens.
    city: str = Field(max_length=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serving(tmp_path_factory.mktemp("compat"), "default_ctx = 2048\n") as srv:
        httpx.post(srv.url + "/api/generate", json={"model": MODEL}, timeout=120)  # warm
        yield srv
    # The libraries leave sockets to the garbage collector: collected here, not in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def need(module: str) -> Any:
    return pytest.importorskip(module, reason=f"{module} is not installed (the test extra has it)")


def tool_history_openai() -> list[dict[str, Any]]:
    return [
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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


# ---- ollama ----------------------------------------------------------------------------------


def test_ollama(server: ServeProcess) -> None:
    ollama = need("ollama")
    c = ollama.Client(host=server.url, timeout=120)
    opts = {"num_predict": FEW, "temperature": 0}
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": PROMPT}], options=opts)
    assert r.message.content
    assert r.eval_count > 0
    assert r.prompt_eval_count > 0
    parts = list(
        c.chat(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], options=opts, stream=True
        )
    )
    assert "".join(p.message.content for p in parts)
    assert parts[-1].done
    assert parts[-1].eval_count > 0
    g = c.generate(model=MODEL, prompt=PROMPT, options=opts)
    assert g.response
    assert g.prompt_eval_count > 0
    e = c.embed(model=MODEL, input=["a", "b"])
    assert len(e.embeddings) == 2
    assert len(e.embeddings[0]) > 0
    names = [m.model for m in c.list().models]
    assert MODEL in names
    assert all(":" in n for n in names)
    show = c.show(MODEL)
    assert "completion" in show.capabilities
    assert show.modelinfo
    assert MODEL in [m.model for m in c.ps().models]
    s = c.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "A city in France, as JSON."}],
        format=City.model_json_schema(),
        options={"num_predict": 30, "temperature": 0},
    )
    assert City.model_validate_json(s.message.content).city
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "weather"},
    ]
    assert c.chat(model=MODEL, messages=history, options=opts).message.content
    with pytest.raises(ollama.ResponseError) as refused:
        c.chat(model=MODEL, messages=history[:1], tools=[WEATHER_TOOL])
    assert refused.value.status_code == 400
    assert "does not support tools" in refused.value.error

    async def many() -> list[Any]:
        ac = ollama.AsyncClient(host=server.url, timeout=120)
        return await asyncio.gather(
            *(
                ac.chat(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Count to {i}."}],
                    options=opts,
                )
                for i in (3, 4, 5)
            )
        )

    for answer in asyncio.run(many()):
        assert answer.message.content
        assert answer.eval_count > 0


# ---- openai ----------------------------------------------------------------------------------


def test_openai(server: ServeProcess) -> None:
    openai = need("openai")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    msgs: Any = [{"role": "user", "content": PROMPT}]
    r = c.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=FEW, temperature=0
    )
    assert r.choices[0].message.content
    assert r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens > 0
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=FEW,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens > 0
    comp = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=FEW)
    assert comp.choices[0].text
    assert comp.usage.total_tokens > 0
    emb = c.embeddings.create(model=MODEL, input=["a", "b"])
    assert len(emb.data) == 2
    assert len(emb.data[0].embedding) > 0
    assert MODEL in [m.id for m in c.models.list().data]
    parsed = c.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "A city in France, as JSON."}],
        response_format=City,
        max_tokens=30,
        temperature=0,
    )
    assert parsed.choices[0].message.parsed.city
    done = c.chat.completions.create(model=MODEL, messages=tool_history_openai(), max_tokens=FEW)
    assert done.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="does not support tools"):
        c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL])

    async def many() -> list[Any]:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(
            *(
                ac.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Count to {i}."}],
                    max_tokens=FEW,
                )
                for i in (3, 4, 5)
            )
        )

    for answer in asyncio.run(many()):
        assert answer.choices[0].message.content
        assert answer.usage.completion_tokens > 0


# ---- langchain -------------------------------------------------------------------------------


def _langchain_round_trip(llm: Any) -> None:
    messages = need("langchain_core.messages")
    history = [
        messages.HumanMessage("What is the weather in Paris?"),
        messages.AIMessage(
            "", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "call_1"}]
        ),
        messages.ToolMessage("sunny, 21 C", tool_call_id="call_1"),
    ]
    assert llm.invoke(history).content


def _langchain_common(llm: Any) -> None:
    answer = llm.invoke(PROMPT)
    assert answer.content
    assert answer.usage_metadata["input_tokens"] > 0
    assert answer.usage_metadata["output_tokens"] > 0
    assert "".join(str(chunk.content) for chunk in llm.stream(PROMPT))
    assert all(a.content for a in llm.batch([f"Count to {i}." for i in (3, 4, 5)]))
    assert asyncio.run(llm.ainvoke(PROMPT)).content
    _langchain_round_trip(llm)


def test_langchain_ollama(server: ServeProcess) -> None:
    lo = need("langchain_ollama")
    ollama = need("ollama")
    llm = lo.ChatOllama(model=MODEL, base_url=server.url, num_predict=FEW, temperature=0)
    _langchain_common(llm)
    structured = lo.ChatOllama(model=MODEL, base_url=server.url, num_predict=30, temperature=0)
    city = structured.with_structured_output(City, method="json_schema").invoke(
        "A city in France, as JSON."
    )
    assert city.city
    assert lo.OllamaLLM(model=MODEL, base_url=server.url, num_predict=FEW).invoke(PROMPT)
    vector = lo.OllamaEmbeddings(model=MODEL, base_url=server.url).embed_query("hello")
    assert len(vector) > 0
    with pytest.raises(ollama.ResponseError, match="does not support tools"):
        llm.bind_tools([WEATHER_TOOL]).invoke(PROMPT)


def test_langchain_openai(server: ServeProcess) -> None:
    lc = need("langchain_openai")
    openai = need("openai")
    common = {"model": MODEL, "base_url": server.url + "/v1", "api_key": "unused", "max_retries": 0}
    # max_tokens is sent as max_completion_tokens; stream_usage asks for the usage chunk.
    llm = lc.ChatOpenAI(**common, max_tokens=FEW, temperature=0, stream_usage=True)
    _langchain_common(llm)
    structured = lc.ChatOpenAI(**common, max_tokens=30, temperature=0)
    assert structured.with_structured_output(City).invoke("A city in France, as JSON.").city
    # Token-id input (the default with tiktoken) needs an OpenAI tokenizer: residency refuses
    # token ids with a 400, so texts are sent.
    emb = lc.OpenAIEmbeddings(**common, check_embedding_ctx_length=False)
    assert len(emb.embed_query("hello")) > 0
    with pytest.raises(openai.BadRequestError, match="does not support tools"):
        llm.bind_tools([WEATHER_TOOL]).invoke(PROMPT)


# ---- litellm ---------------------------------------------------------------------------------


def test_litellm(server: ServeProcess) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch
    litellm = need("litellm")
    msgs = [{"role": "user", "content": PROMPT}]
    for model, base in (
        (f"ollama_chat/{MODEL}", server.url),
        (f"openai/{MODEL}", server.url + "/v1"),
    ):
        kw = {"model": model, "api_base": base, "api_key": "unused", "max_tokens": FEW}
        r = litellm.completion(messages=msgs, **kw)
        assert r.choices[0].message.content
        assert r.usage.completion_tokens > 0
        assert r.usage.prompt_tokens > 0
        text = "".join(
            ch.choices[0].delta.content or ""
            for ch in litellm.completion(messages=msgs, stream=True, **kw)
        )
        assert text

        async def many(kw: dict[str, Any] = kw) -> list[Any]:
            return await asyncio.gather(
                *(
                    litellm.acompletion(
                        messages=[{"role": "user", "content": f"Count to {i}."}], **kw
                    )
                    for i in (3, 4, 5)
                )
            )

        assert all(a.choices[0].message.content for a in asyncio.run(many()))
        done = litellm.completion(messages=tool_history_openai(), **kw)
        assert done.choices[0].message.content
    kw = {"model": f"openai/{MODEL}", "api_base": server.url + "/v1", "api_key": "unused"}
    s = litellm.completion(
        messages=[{"role": "user", "content": "A city in France, as JSON."}],
        response_format=City,
        max_tokens=30,
        temperature=0,
        **kw,
    )
    assert City.model_validate_json(s.choices[0].message.content).city
    e = litellm.embedding(input=["hello"], **kw)
    assert len(e.data[0]["embedding"]) > 0


# ---- llama-index -----------------------------------------------------------------------------


def test_llama_index_ollama_with_default_settings(server: ServeProcess) -> None:
    lio = need("llama_index.llms.ollama")
    base = need("llama_index.core.llms")
    # Default settings: the client asks /api/show for the context and sends it as num_ctx.
    llm = lio.Ollama(model=MODEL, base_url=server.url, request_timeout=120)
    llm.additional_kwargs = {"num_predict": FEW}
    user = [base.ChatMessage(role="user", content=PROMPT)]
    answer = llm.chat(user)
    assert answer.message.content
    assert answer.raw["eval_count"] > 0
    assert answer.raw["prompt_eval_count"] > 0
    assert llm.complete(PROMPT).text
    assert "".join(r.delta or "" for r in llm.stream_chat(user))

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(
                llm.achat([base.ChatMessage(role="user", content=f"Count to {i}.")])
                for i in (3, 4, 5)
            )
        )

    assert all(a.message.content for a in asyncio.run(many()))
    structured = lio.Ollama(model=MODEL, base_url=server.url, request_timeout=120, json_mode=True)
    structured.additional_kwargs = {"num_predict": 30}
    city = structured.as_structured_llm(City).complete("A city in France, as JSON.")
    assert json.loads(city.text)["city"]


# ---- concurrency -----------------------------------------------------------------------------


def test_eight_concurrent_streams_all_complete_and_distinct(server: ServeProcess) -> None:
    """Requests for one model never interrupt each other: on a runner with slots they run side
    by side, on one without (llama-cpp-python) they wait their turn; every stream ends whole."""

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, dict[str, Any]]:
        body = {
            "model": MODEL,
            "prompt": f"Write the number {i} in words, then a fruit.",
            "options": {"num_predict": FEW, "temperature": 0, "seed": i},
        }
        text, last = "", {}
        async with client.stream("POST", "/api/generate", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    last = json.loads(line)
                    assert "error" not in last, last
                    text += last.get("response", "")
        return text, last

    async def all_of_them() -> list[tuple[str, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(all_of_them())
    for text, last in results:
        assert text.strip()
        assert last["done"] is True
        assert last["eval_count"] > 0
        assert last["prompt_eval_count"] > 0
    assert len({text for text, _ in results}) == 8, [t for t, _ in results]
