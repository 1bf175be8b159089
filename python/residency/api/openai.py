"""OpenAI's API (``/v1/*``): the runner already speaks it, so requests pass through.

The facade's work here is scheduling (the lease), the model name (responses carry the name the
client asked for), residency's two extensions (``keep_alive`` and ``num_ctx`` body fields, which
OpenAI lacks), ``encoding_format: "base64"`` for embeddings, and errors in OpenAI's shape.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic_core import from_json, to_json
from starlette.responses import Response

from residency.api.errors import api_error, error_body
from residency.api.metrics import RequestRecord
from residency.api.proxy import (
    Body,
    LeasedStream,
    RunnerStream,
    json_response,
    post_json,
    read_body,
    until_disconnected,
)
from residency.api.schemas import (
    OpenAIChatRequest,
    OpenAICompletionRequest,
    OpenAIEmbeddingRequest,
    _OpenAIBase,
)
from residency.api.state import (
    ApiState,
    State,
    api_state,
    body_schema,
    check_keep_alive,
    direct,
)
from residency.api.translate import pooled

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["openai"])

SSE = "text/event-stream"
#: Body fields residency acts on itself; the runner never sees them.
_EXTENSIONS = frozenset({"keep_alive", "num_ctx"})
_EXTENSIONS_B64 = _EXTENSIONS | {"encoding_format"}
_DONE = b"data: [DONE]\n\n"


@router.post("/chat/completions", openapi_extra=body_schema(OpenAIChatRequest))
@direct
async def chat_completions(request: Request) -> Response:
    state = api_state(request)
    rec = state.record("openai", "/v1/chat/completions")
    try:
        raw = await read_body(request)
        req = OpenAIChatRequest.model_validate_json(raw)
        path = "/v1/chat/completions"
        return await _forward(request, state, rec, req, path=path, raw=raw, stream=req.stream)
    except BaseException as err:
        rec.fail(err)
        raise


@router.post("/completions", openapi_extra=body_schema(OpenAICompletionRequest))
@direct
async def completions(request: Request) -> Response:
    state = api_state(request)
    rec = state.record("openai", "/v1/completions")
    try:
        raw = await read_body(request)
        req = OpenAICompletionRequest.model_validate_json(raw)
        path = "/v1/completions"
        return await _forward(request, state, rec, req, path=path, raw=raw, stream=req.stream)
    except BaseException as err:
        rec.fail(err)
        raise


@router.post("/embeddings", openapi_extra=body_schema(OpenAIEmbeddingRequest))
@direct
async def embeddings(request: Request) -> Response:
    state = api_state(request)
    rec = state.record("openai", "/v1/embeddings")
    try:
        raw = await read_body(request)
        req = OpenAIEmbeddingRequest.model_validate_json(raw)
        # The runner returns floats; base64 is encoded here (little-endian float32, as OpenAI).
        content = await until_disconnected(
            request, _whole(state, rec, req, "/v1/embeddings", raw, ours=_EXTENSIONS_B64)
        )
        data = from_json(content)
        data["model"] = req.model
        dims = req.dimensions
        for item in data.get("data") or ():
            vector = item.get("embedding")
            if not isinstance(vector, list):
                continue
            vector = item["embedding"] = pooled(vector)
            if dims and len(vector) > dims:
                v = np.asarray(vector[:dims], dtype=np.float64)
                norm = float(np.linalg.norm(v))
                vector = (v / norm if norm else v).tolist()
                item["embedding"] = vector
            if req.encoding_format == "base64":
                raw = np.asarray(vector, dtype="<f4").tobytes()
                item["embedding"] = base64.b64encode(raw).decode("ascii")
        return json_response(data, record=rec)
    except BaseException as err:
        rec.fail(err)
        raise


@router.get("/models")
async def list_models(state: State) -> Response:
    return json_response(
        {"object": "list", "data": [_model_card(e) for e in state.scheduler.models()]}
    )


@router.get("/models/{model:path}")
async def get_model(model: str, state: State) -> Response:
    return json_response(_model_card(state.scheduler.resolve(model), model))


def _model_card(entry: Any, name: str | None = None) -> dict[str, Any]:
    return {
        "id": name or entry.name,
        "object": "model",
        "created": int(entry.modified_at.timestamp()),
        "owned_by": "residency",
    }


async def _whole(
    state: ApiState,
    rec: RequestRecord,
    req: _OpenAIBase,
    path: str,
    raw: bytes,
    *,
    ours: frozenset[str] = _EXTENSIONS,
) -> bytes:
    """One non-streamed runner call inside a lease."""
    async with state.scheduler.session(
        req.model, keep_alive=req.keep_alive, options=_load_options(req)
    ) as lease:
        rec.took(lease)
        return await post_json(lease, path, _runner_body(req, raw, lease.entry.name, ours))


def _runner_body(req: _OpenAIBase, raw: bytes, name: str, ours: frozenset[str]) -> Body:
    """What the runner gets: the client's own bytes when they need no change (the usual case: no
    re-encoding), else its fields without the ones residency handles, under the runner's name."""
    if req.model == name and ours.isdisjoint(req.model_fields_set):
        return raw
    body = req.model_dump(exclude_unset=True, exclude=set(ours))
    body["model"] = name
    return body


def _load_options(req: _OpenAIBase) -> dict[str, Any] | None:
    return {"num_ctx": req.num_ctx} if req.num_ctx else None


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
    request: Request,
    state: ApiState,
    rec: RequestRecord,
    req: _OpenAIBase,
    *,
    path: str,
    raw: bytes,
    stream: bool,
) -> Response:
    rec.model = req.model
    rec.stream = stream
    check_keep_alive(req.keep_alive)
    asked = req.model
    if not stream:
        content = await until_disconnected(request, _whole(state, rec, req, path, raw))
        return json_response(_rename(content, asked), record=rec)

    async def open_upstream() -> tuple[AsyncExitStack, RunnerStream]:
        stack = AsyncExitStack()
        try:
            lease = await stack.enter_async_context(
                state.scheduler.session(
                    asked, keep_alive=req.keep_alive, options=_load_options(req)
                )
            )
            rec.took(lease)
            body = _runner_body(req, raw, lease.entry.name, _EXTENSIONS)
            upstream = await RunnerStream.open(lease, path, body)
            stack.push_async_callback(upstream.aclose)
            return stack, upstream
        except BaseException:
            await stack.aclose()
            raise

    stack, upstream = await until_disconnected(request, open_upstream())

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event, _ in upstream:
                if event.get("model") != asked:
                    event["model"] = asked
                yield b"data: " + to_json(event) + b"\n\n"
            yield _DONE
        except Exception as err:
            # OpenAI's clients raise on a data event that carries "error".
            e = api_error(err)
            rec.error = e.message
            yield b"data: " + to_json(error_body(e, openai=True)) + b"\n\n"

    async def cleanup(error: BaseException | None) -> None:
        try:
            await stack.aclose()
        finally:
            rec.end_stream(error)

    return LeasedStream(
        events(), cleanup=cleanup, media_type=SSE, headers={"Cache-Control": "no-cache"}
    )
