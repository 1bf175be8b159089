"""OpenAI's API (``/v1/*``): the runner already speaks it, so requests pass through.

The facade's work here is scheduling (the lease), the model name (responses carry the name the
client asked for), residency's two extensions (``keep_alive`` and ``num_ctx`` body fields, which
OpenAI lacks), ``encoding_format: "base64"`` for embeddings, and errors in OpenAI's shape.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic_core import from_json, to_json
from starlette.responses import Response

from residency.api._types import LeaseLike
from residency.api.errors import ApiError, error_body
from residency.api.limits import check_model_name
from residency.api.pipeline import Call, endpoint, shaped_embeddings
from residency.api.proxy import json_response
from residency.api.schemas import (
    OpenAIChatRequest,
    OpenAICompletionRequest,
    OpenAIEmbeddingRequest,
    _OpenAIBase,
)
from residency.api.security import key_allows
from residency.api.state import State, body_schema
from residency.runners.protocol import Body

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["openai"])

SSE = "text/event-stream"
#: Body fields residency acts on itself; the runner never sees them.
_EXTENSIONS = frozenset({"keep_alive", "num_ctx"})
_EXTENSIONS_B64 = _EXTENSIONS | {"encoding_format"}
_DONE = b"data: [DONE]\n\n"


@router.post("/chat/completions", openapi_extra=body_schema(OpenAIChatRequest))
@endpoint("openai", "/v1/chat/completions")
async def chat_completions(call: Call) -> Response:
    raw = await call.body()
    req = await call.parse(OpenAIChatRequest, raw)
    return await _forward(call, req, path="/v1/chat/completions", raw=raw, stream=req.stream)


@router.post("/completions", openapi_extra=body_schema(OpenAICompletionRequest))
@endpoint("openai", "/v1/completions")
async def completions(call: Call) -> Response:
    raw = await call.body()
    req = await call.parse(OpenAICompletionRequest, raw)
    return await _forward(call, req, path="/v1/completions", raw=raw, stream=req.stream)


@router.post("/embeddings", openapi_extra=body_schema(OpenAIEmbeddingRequest))
@endpoint("openai", "/v1/embeddings")
async def embeddings(call: Call) -> Response:
    raw = await call.body()
    req = await call.parse(OpenAIEmbeddingRequest, raw)
    call.admit(req.model, req.keep_alive, _load_options(req))
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
    return call.respond(data)


@router.get("/models")
async def list_models(request: Request, state: State) -> Response:
    cards = [_model_card(e) for e in state.scheduler.models() if key_allows(request.scope, e.name)]
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
        "id": name or entry.name,
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


def _rename(content: bytes, asked: str) -> bytes:
    """The runner's answer with the model name the client asked for."""
    # The usual case, without a parse: the first "model" key (the top-level one in the runners'
    # compact JSON, written before any nested object) already names it.
    at = content.find(b'"model":')
    if at >= 0 and content.startswith(to_json(asked), at + 8):
        return content
    data = from_json(content)
    if isinstance(data, dict) and data.get("model") != asked:
        data["model"] = asked
        return to_json(data)
    return content


async def _forward(
    call: Call, req: _OpenAIBase, *, path: str, raw: bytes, stream: bool
) -> Response:
    call.admit(req.model, req.keep_alive, _load_options(req), stream=stream, work=_work(req))
    asked = req.model
    body = _runner_body(req, raw, _EXTENSIONS)
    if not stream:
        content = await call.complete(path, body)
        return call.respond(_rename(content, asked))

    upstream = await call.until_disconnected(call.open_stream(path, body))

    async def events() -> AsyncIterator[bytes]:
        async for event, _ in upstream:
            if event.get("model") != asked:
                event["model"] = asked
            yield b"data: " + to_json(event) + b"\n\n"
        yield _DONE

    # OpenAI's clients raise on a data event that carries "error".
    return call.respond_stream(
        upstream,
        events(),
        error_chunk=lambda e: b"data: " + to_json(error_body(e, openai=True)) + b"\n\n",
        media_type=SSE,
        headers={"Cache-Control": "no-cache"},
    )
