"""Ollama's API (``/api/*``) over the scheduler, translated to the runner's OpenAI API.

Shapes follow Ollama's docs/api.md: NDJSON streams by default, ``"stream": false`` for one body,
an empty prompt or message list loads the model (``done_reason: "load"``) and with ``keep_alive: 0``
unloads it (``"unload"``), every duration in nanoseconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from pydantic_core import to_json
from starlette.responses import Response

from residency.api._types import EntryLike, LeaseLike
from residency.api.capabilities import ModelTraits, model_traits, refuse_missing
from residency.api.dialect import prompt_tokens, runner_messages
from residency.api.errors import ApiError
from residency.api.limits import check_model_name
from residency.api.metrics import RequestRecord
from residency.api.ollama_models import router as models_router
from residency.api.pipeline import Call, Upstream, endpoint, shaped_embeddings
from residency.api.progress import LoadingProgress, Pending, progress_mode, streamed
from residency.api.proxy import now_ns
from residency.api.schemas import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
)
from residency.api.security import SCOPE_KEY, ApiKey
from residency.api.state import body_schema
from residency.api.translate import (
    Generation,
    chat_body,
    generate_body,
    rfc3339_now,
    split_options,
    with_store_defaults,
)
from residency.runners.protocol import Body

__all__ = ["router"]

router = APIRouter(tags=["ollama"])

NDJSON = "application/x-ndjson"
_NL = b"\n"
# Go's time.Now().Add(math.MaxInt64): what Ollama reports for a model kept forever.
_FOREVER_NS = 2**63 - 1


# ---- generation ------------------------------------------------------------------------------


@router.post("/api/generate", openapi_extra=body_schema(GenerateRequest))
@endpoint("ollama", "/api/generate")
async def generate(call: Call) -> Response:
    """Completes a prompt (templated as a chat turn unless ``raw``)."""
    req = await call.parse(GenerateRequest)
    if not req.prompt and not req.images and not req.suffix:
        return await _load_or_unload(call, req, chat=False)
    entry, _ = await _check_capabilities(call, req, {"vision": bool(req.images)})
    path, body = generate_body(req, req.model)
    with_store_defaults(body, entry)
    return await _generation(call, req, path=path, body=body, chat=False)


@router.post("/api/chat", openapi_extra=body_schema(ChatRequest))
@endpoint("ollama", "/api/chat")
async def chat(call: Call) -> Response:
    """The next assistant message of a conversation."""
    req = await call.parse(ChatRequest)
    if not req.messages:
        return await _load_or_unload(call, req, chat=True)
    images = any(m.images for m in req.messages)
    entry, model = await _check_capabilities(
        call, req, {"tools": bool(req.tools), "vision": images}
    )
    body = chat_body(req, req.model)
    # Tool calls and results in a history, as turns a template without tools accepts.
    body["messages"] = runner_messages(body["messages"], template_tools=model.can("tools"))
    with_store_defaults(body, entry)
    return await _generation(call, req, path="/v1/chat/completions", body=body, chat=True)


async def _check_capabilities(
    call: Call, req: GenerateRequest | ChatRequest, wanted: dict[str, bool]
) -> tuple[EntryLike, ModelTraits]:
    """Refuses, before any load, what the model cannot do (as Ollama does); the model's entry
    and what it can do."""
    # The checks admit() makes before anything else, made here before the model is read.
    check_model_name(req.model)
    call.rec.model = req.model
    entry = call.state.scheduler.resolve(req.model)
    key: ApiKey | None = call.request.scope.get(SCOPE_KEY)
    if key is not None and not key.allows(entry.name):
        raise ApiError(403, f"key {key.name!r} may not use model {entry.name!r}")
    model = await model_traits(entry)
    # think: false (or "low"…) on a model without thinking is harmless; only asking for it is not.
    wanted["thinking"] = req.think not in (None, False)
    refuse_missing(req.model, model, wanted)
    return entry, model


async def _load_or_unload(
    call: Call, req: GenerateRequest | ChatRequest, *, chat: bool
) -> Response:
    keep_alive_ns = call.admit(req.model, req.keep_alive, split_options(req.options)[1])
    sched = call.state.scheduler
    if keep_alive_ns == 0:
        await sched.unload(sched.resolve(req.model).name)
        reason = "unload"
    else:
        await call.load()
        reason = "load"
    out: dict[str, Any] = {"model": req.model, "created_at": rfc3339_now()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out["done"] = True
    out["done_reason"] = reason
    return call.respond(out)


async def _generation(
    call: Call,
    req: GenerateRequest | ChatRequest,
    *,
    path: str,
    body: dict[str, Any],
    chat: bool,
) -> Response:
    stream = req.stream is not False
    call.admit(
        req.model,
        req.keep_alive,
        split_options(req.options)[1],
        stream=stream,
        work=_work(req),
    )
    asked = req.model
    rec = call.rec

    def opening() -> Awaitable[Upstream]:
        return call.open_stream(path, _named(body))

    if not stream:

        async def whole() -> dict[str, Any]:
            upstream = await opening()
            try:
                gen = Generation(upstream.t_sent)
                async for event, at in upstream:
                    gen.feed(event, at)
                await _count_prompt(gen, upstream.lease, body)
            finally:
                await upstream.aclose()
            return _final(asked, gen, rec, upstream.lease, chat=chat, whole=True)

        return call.respond(await call.until_disconnected(whole()))

    async def lines(upstream: Upstream) -> AsyncIterator[bytes]:
        gen = Generation(upstream.t_sent)
        async for event, at in upstream:
            text, think = gen.feed(event, at)
            if not (text or think):
                continue
            piece: dict[str, Any] = {"model": asked, "created_at": rfc3339_now()}
            if chat:
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if think:
                    msg["thinking"] = think
                piece["message"] = msg
            else:
                piece["response"] = text
                if think:
                    piece["thinking"] = think
            piece["done"] = False
            yield to_json(piece) + _NL
        if chat and gen.tool_calls():
            calls = {
                "model": asked,
                "created_at": rfc3339_now(),
                "message": {"role": "assistant", "content": "", "tool_calls": gen.tool_calls()},
                "done": False,
            }
            yield to_json(calls) + _NL
        await _count_prompt(gen, upstream.lease, body)
        yield to_json(_final(asked, gen, rec, upstream.lease, chat=chat, whole=False)) + _NL

    def error_line(e: ApiError) -> bytes:
        return to_json({"error": e.message}) + _NL

    if progress_mode(call.request, openai=False) is not None:  # opted in: lines while it loads
        pending = Pending(opening())
        chunks = streamed(call.state, asked, pending, lines, _progress_line(asked, chat=chat))
        return call.respond_stream(pending, chunks, error_chunk=error_line, media_type=NDJSON)
    upstream = await call.until_disconnected(opening())
    # Headers are gone once streaming: an error becomes the stream's last line, as Ollama does it.
    return call.respond_stream(upstream, lines(upstream), error_chunk=error_line, media_type=NDJSON)


def _progress_line(asked: str, *, chat: bool) -> Callable[[LoadingProgress], bytes]:
    """A loading-progress line shaped like the stream's own, content empty (api.progress)."""

    def line(p: LoadingProgress) -> bytes:
        piece: dict[str, Any] = {"model": asked, "created_at": rfc3339_now()}
        if chat:
            piece["message"] = {"role": "assistant", "content": ""}
        else:
            piece["response"] = ""
        piece["done"] = False
        piece["loading"] = {"state": p.state, "elapsed_s": round(p.elapsed_s, 2)}
        return to_json(piece) + _NL

    return line


def _work(req: GenerateRequest | ChatRequest) -> dict[str, Any]:
    """What limits.check_work needs to know of a generation request."""
    options = req.options or {}
    if isinstance(req, ChatRequest):
        messages = req.messages or []
        chars = sum(len(m.content or "") for m in messages)
        return {"options": options, "messages": len(messages), "prompt_chars": chars}
    chars = len(req.prompt or "") + len(req.system or "") + len(req.suffix or "")
    return {"options": options, "prompt_chars": chars}


async def _count_prompt(gen: Generation, lease: LeaseLike, body: dict[str, Any]) -> None:
    """prompt_eval_count from the runner's tokenizer when its stream did not report one."""
    if gen.prompt_count() is None:
        count = await prompt_tokens(lease, body)
        if count is not None:
            gen.usage = {**(gen.usage or {}), "prompt_tokens": count}


def _final(
    asked: str,
    gen: Generation,
    rec: RequestRecord,
    lease: LeaseLike,
    *,
    chat: bool,
    whole: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {"model": asked, "created_at": rfc3339_now()}
    text = "".join(gen.parts) if whole else ""
    if chat:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if whole and gen.thinking:
            msg["thinking"] = "".join(gen.thinking)
        if whole and gen.tool_calls():
            msg["tool_calls"] = gen.tool_calls()
        out["message"] = msg
    else:
        out["response"] = text
        if whole and gen.thinking:
            out["thinking"] = "".join(gen.thinking)
    out["done"] = True
    out["done_reason"] = gen.done_reason
    out.update(gen.stats(t_start=rec.t_start, load_duration_ns=lease.load_duration_ns))
    lease.decoded(out["eval_count"], out["eval_duration"])  # the slowdown detector's sample
    return out


# ---- embeddings ------------------------------------------------------------------------------


@router.post("/api/embed", openapi_extra=body_schema(EmbedRequest))
@endpoint("ollama", "/api/embed")
async def embed(call: Call) -> Response:
    """Embeddings for one text or many, L2-normalised as Ollama returns them."""
    req = await call.parse(EmbedRequest)
    call.admit(req.model, req.keep_alive, split_options(req.options)[1])
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    inputs = [text for text in inputs if text]
    out: dict[str, Any] = {"model": req.model, "embeddings": []}
    if not inputs:  # only load the model
        load_ns = await call.load()
    else:
        result, load_ns = await call.embed(_named({"model": req.model, "input": inputs}))
        out["embeddings"] = shaped_embeddings(result.vectors, req.dimensions, normalise=True)
    out["total_duration"] = now_ns() - call.rec.t_start
    out["load_duration"] = load_ns
    if inputs and result.prompt_tokens is not None:
        out["prompt_eval_count"] = result.prompt_tokens
    return call.respond(out)


@router.post("/api/embeddings", openapi_extra=body_schema(EmbeddingsRequest))
@endpoint("ollama", "/api/embeddings")
async def embeddings(call: Call) -> Response:
    """The legacy single-text endpoint: ``{"embedding": [...]}``, not normalised."""
    req = await call.parse(EmbeddingsRequest)
    call.admit(req.model, req.keep_alive, split_options(req.options)[1])
    if not req.prompt:  # only load the model
        await call.load()
        return call.respond({"embedding": []})
    result, _ = await call.embed(_named({"model": req.model, "input": [req.prompt]}))
    return call.respond({"embedding": result.vectors[0] if result.vectors else []})


def _named(body: dict[str, Any]) -> Callable[[LeaseLike], Body]:
    """`body` under the name the runner knows the leased model by."""

    def named(lease: LeaseLike) -> Body:
        body["model"] = lease.entry.name
        return body

    return named


# The model listing and metadata endpoints live beside, on their own router.
router.include_router(models_router)
