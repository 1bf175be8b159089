"""OpenAI's API (``/v1/*``): the runner already speaks it, so requests pass through.

The facade's work here is scheduling (the lease), the model name (responses carry the name the
client asked for), residency's two extensions (``keep_alive`` and ``num_ctx`` body fields, which
OpenAI lacks), ``encoding_format: "base64"`` for embeddings, and errors in OpenAI's shape.
A generation whose client wants one body is still streamed from the runner and assembled, so the
runner stops when the client goes away (runners.assemble says why).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic_core import to_json
from starlette.responses import Response

from residency.api._types import LeaseLike
from residency.api.capabilities import model_traits, refuse_missing
from residency.api.dialect import (
    chat_fields,
    check_completion,
    check_embedding_input,
    choices_wanted,
    merged_answers,
    prompt_tokens,
)
from residency.api.errors import ApiError, error_body
from residency.api.limits import check_model_name
from residency.api.ollama_models import tagged
from residency.api.pipeline import Call, Upstream, endpoint, shaped_embeddings
from residency.api.progress import Pending, openai_chunk, progress_mode, streamed
from residency.api.proxy import json_response
from residency.api.schemas import (
    OpenAIChatRequest,
    OpenAICompletionRequest,
    OpenAIEmbeddingRequest,
    _OpenAIBase,
)
from residency.api.security import key_allows
from residency.api.state import State, body_schema
from residency.api.translate import Generation, with_store_defaults
from residency.runners.protocol import Assembly, Body

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["openai"])

SSE = "text/event-stream"
#: Body fields residency acts on itself; the runner never sees them.
_EXTENSIONS = frozenset({"keep_alive", "num_ctx"})
_EXTENSIONS_B64 = _EXTENSIONS | {"encoding_format"}
_DONE = b"data: [DONE]\n\n"
_NO_CACHE = {"Cache-Control": "no-cache"}


@router.post("/chat/completions", openapi_extra=body_schema(OpenAIChatRequest))
@endpoint("openai", "/v1/chat/completions")
async def chat_completions(call: Call) -> Response:
    req = await call.parse(OpenAIChatRequest, await call.body())
    call.admit(req.model, req.keep_alive, _load_options(req), stream=req.stream, work=_work(req))
    entry = call.state.scheduler.resolve(req.model)
    model = await model_traits(entry)
    fields = req.model_dump(exclude_unset=True, exclude=set(_EXTENSIONS))
    n = choices_wanted(fields, stream=req.stream)
    refuse_missing(req.model, model, {"tools": bool(fields.get("tools"))})
    fields = with_store_defaults(chat_fields(fields, template_tools=model.can("tools")), entry)
    return await _serve(call, req, "/v1/chat/completions", [fields] * n)


@router.post("/completions", openapi_extra=body_schema(OpenAICompletionRequest))
@endpoint("openai", "/v1/completions")
async def completions(call: Call) -> Response:
    req = await call.parse(OpenAICompletionRequest, await call.body())
    call.admit(req.model, req.keep_alive, _load_options(req), stream=req.stream, work=_work(req))
    fields = req.model_dump(exclude_unset=True, exclude=set(_EXTENSIONS))
    n = choices_wanted(fields, stream=req.stream)
    prompts = check_completion(req.prompt)
    if len(prompts) > 1 and req.stream:
        raise ApiError(
            400, "a list of prompts is served only without streaming", code="invalid_prompt"
        )
    limit = fields.pop("max_completion_tokens", None)
    if limit is not None and fields.get("max_tokens") is None:
        fields["max_tokens"] = limit
    with_store_defaults(fields, call.state.scheduler.resolve(req.model))
    bodies = [{**fields, "prompt": p} for p in prompts for _ in range(n)]
    return await _serve(call, req, "/v1/completions", bodies)


@router.post("/embeddings", openapi_extra=body_schema(OpenAIEmbeddingRequest))
@endpoint("openai", "/v1/embeddings")
async def embeddings(call: Call) -> Response:
    raw = await call.body()
    req = await call.parse(OpenAIEmbeddingRequest, raw)
    call.admit(req.model, req.keep_alive, _load_options(req))
    check_embedding_input(req.input)
    result, _ = await call.embed(_runner_body(req, raw, _EXTENSIONS_B64))
    data = result.data
    data["model"] = req.model
    rows = sorted(data.get("data") or (), key=lambda d: d.get("index", 0))
    vectors = shaped_embeddings(result.vectors, req.dimensions, normalise=False)
    for item, vector in zip(rows, vectors, strict=True):
        if req.encoding_format == "base64":
            # The runner returns floats; base64 is little-endian float32, as OpenAI sends it.
            packed = np.asarray(vector, dtype="<f4").tobytes()
            item["embedding"] = base64.b64encode(packed).decode("ascii")
        else:
            item["embedding"] = vector
    if "usage" not in data and result.prompt_tokens is not None:
        data["usage"] = {
            "prompt_tokens": result.prompt_tokens,
            "total_tokens": result.prompt_tokens,
        }
    return call.respond(data)


@router.get("/models")
async def list_models(request: Request, state: State) -> Response:
    # residency's addition: where each model is resident now (device; on Ray, device@replica/node).
    where: dict[str, list[str]] = {}
    for r in state.scheduler.resident():
        where.setdefault(r.name, []).append(r.device)
    cards = [
        {**_model_card(e), "resident_on": where.get(e.name, [])}
        for e in state.scheduler.models()
        if key_allows(request.scope, e.name)
    ]
    return json_response({"object": "list", "data": cards})


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request, state: State) -> Response:
    check_model_name(model)
    entry = state.scheduler.resolve(model)
    if not key_allows(request.scope, entry.name):
        raise ApiError(403, f"this API key may not use model {entry.name!r}")
    return json_response(_model_card(entry, model))


def _model_card(entry: Any, name: str | None = None) -> dict[str, Any]:
    return {
        "id": name or tagged(entry.name),
        "object": "model",
        "created": int(entry.modified_at.timestamp()),
        "owned_by": "residency",
    }


def _runner_body(req: _OpenAIBase, raw: bytes, ours: frozenset[str]) -> Callable[[LeaseLike], Body]:
    """What the runner gets: the client's own bytes when they need no change (the usual case: no
    re-encoding), else its fields without the ones residency handles, under the runner's name."""

    def body(lease: LeaseLike) -> Body:
        name = lease.entry.name
        if req.model == name and ours.isdisjoint(req.model_fields_set):
            return raw
        fields = req.model_dump(exclude_unset=True, exclude=set(ours))
        fields["model"] = name
        return fields

    return body


def _load_options(req: _OpenAIBase) -> dict[str, Any] | None:
    return {"num_ctx": req.num_ctx} if req.num_ctx else None


def _work(req: _OpenAIBase) -> dict[str, Any]:
    """What limits.check_work needs to know of a generation request."""
    fields = {k: getattr(req, k, None) for k in ("n", "max_tokens", "max_completion_tokens")}
    fields["num_ctx"] = req.num_ctx
    work: dict[str, Any] = {"body": {k: v for k, v in fields.items() if v is not None}}
    if isinstance(req, OpenAIChatRequest):
        work["messages"] = len(req.messages)
        work["prompt_chars"] = sum(
            len(m.content) if isinstance(m.content, str) else len(str(m.content or ""))
            for m in req.messages
        )
    elif isinstance(prompt := getattr(req, "prompt", None), str):
        work["prompt_chars"] = len(prompt)
    return work


def _named_body(fields: dict[str, Any]) -> Callable[[LeaseLike], dict[str, Any]]:
    def body(lease: LeaseLike) -> dict[str, Any]:
        return {**fields, "model": lease.entry.name}

    return body


async def _serve(call: Call, req: _OpenAIBase, path: str, bodies: list[dict[str, Any]]) -> Response:
    """One runner request per body (several: one per prompt and choice, served in turn)."""
    asked = req.model
    if not getattr(req, "stream", False):
        answers = []
        for fields in bodies:
            answer = await call.generate(path, _named_body(fields), _usage_counter(fields))
            answer["_prompt_key"] = str(fields.get("prompt", ""))
            answers.append(answer)
        data = merged_answers(answers)
        data["model"] = asked
        return call.respond(data)

    (fields,) = bodies
    wants_usage = bool((fields.get("stream_options") or {}).get("include_usage"))
    # Asked always: runners that can (llama-server) then count exactly; others are counted here.
    fields = {**fields, "stream_options": {"include_usage": True}}

    async def events(upstream: Upstream) -> AsyncIterator[bytes]:
        usage: dict[str, Any] | None = None
        pieces, last = 0, {}
        gen = Generation(upstream.t_sent)  # its decode speed, for the slowdown detector
        async for event, at in upstream:
            gen.feed(event, at)
            event["model"] = asked
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            if not wants_usage:
                event.pop("usage", None)
            if not event.get("choices") and "usage" not in event:
                continue  # a usage-only chunk the client did not ask for
            pieces += sum(1 for c in event.get("choices") or () if _has_text(c))
            last = event
            yield b"data: " + to_json(event) + b"\n\n"
        if wants_usage and usage is None:
            usage = await _counted_usage(upstream.lease, fields, pieces)
            tail = {k: last[k] for k in ("id", "object", "created") if k in last}
            yield b"data: " + to_json({**tail, "model": asked, "choices": [], "usage": usage})
            yield b"\n\n"
        stats = gen.stats(t_start=upstream.t_sent, load_duration_ns=0)
        upstream.lease.decoded(stats["eval_count"], stats["eval_duration"])
        yield _DONE

    def error_event(e: ApiError) -> bytes:  # OpenAI's clients raise on an event with "error"
        return b"data: " + to_json(error_body(e, openai=True)) + b"\n\n"

    mode = progress_mode(call.request, openai=True)
    opening = call.open_stream(path, _named_body(fields))
    if mode is not None:  # opted in: progress while the model loads (api.progress)
        pending = Pending(opening)
        chat = path.endswith("/chat/completions")
        chunks = streamed(call.state, asked, pending, events, openai_chunk(mode, asked, chat))
        return call.respond_stream(
            pending, chunks, error_chunk=error_event, media_type=SSE, headers=_NO_CACHE
        )
    upstream = await call.until_disconnected(opening)
    return call.respond_stream(
        upstream, events(upstream), error_chunk=error_event, media_type=SSE, headers=_NO_CACHE
    )


def _has_text(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if delta is None:
        return bool(choice.get("text"))
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def _usage_counter(fields: dict[str, Any]) -> Callable[[LeaseLike, Assembly], Awaitable[None]]:
    """Counts an assembled answer's usage where the runner reported none (llama-cpp-python)."""

    async def count(lease: LeaseLike, answer: Assembly) -> None:
        if answer.usage is None:
            answer.usage = await _counted_usage(lease, fields, answer.pieces)

    return count


async def _counted_usage(lease: LeaseLike, fields: dict[str, Any], pieces: int) -> dict[str, int]:
    """Usage for a runner that streams none (llama-cpp-python): one streamed piece per token."""
    prompt = await prompt_tokens(lease, fields) or 0
    return {"prompt_tokens": prompt, "completion_tokens": pieces, "total_tokens": prompt + pieces}
