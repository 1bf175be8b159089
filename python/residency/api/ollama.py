"""Ollama's API (``/api/*``) over the scheduler, translated to the runner's OpenAI API.

Shapes follow Ollama's docs/api.md: NDJSON streams by default, ``"stream": false`` for one body,
an empty prompt or message list loads the model (``done_reason: "load"``) and with ``keep_alive: 0``
unloads it (``"unload"``), every duration in nanoseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic_core import to_json
from starlette.responses import PlainTextResponse, Response

from residency import __version__
from residency.api._types import EntryLike, LeaseLike, ResidentLike
from residency.api.capabilities import refuse_missing, traits
from residency.api.dialect import prompt_tokens
from residency.api.errors import ApiError
from residency.api.metrics import RequestRecord
from residency.api.pipeline import Call, Upstream, endpoint, shaped_embeddings
from residency.api.proxy import json_response, now_ns, read_body
from residency.api.schemas import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ShowRequest,
)
from residency.api.state import State, api_state, body_schema
from residency.api.translate import (
    Generation,
    chat_body,
    generate_body,
    rfc3339_now,
    split_options,
)
from residency.registry import model_info
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
    req = GenerateRequest.model_validate_json(await call.body())
    if not req.prompt and not req.images and not req.suffix:
        return await _load_or_unload(call, req, chat=False)
    await _check_capabilities(call, req, {"vision": bool(req.images)})
    path, body = generate_body(req, req.model)
    return await _generation(call, req, path=path, body=body, chat=False)


@router.post("/api/chat", openapi_extra=body_schema(ChatRequest))
@endpoint("ollama", "/api/chat")
async def chat(call: Call) -> Response:
    """The next assistant message of a conversation."""
    req = ChatRequest.model_validate_json(await call.body())
    if not req.messages:
        return await _load_or_unload(call, req, chat=True)
    images = any(m.images for m in req.messages)
    await _check_capabilities(call, req, {"tools": bool(req.tools), "vision": images})
    body = chat_body(req, req.model)
    return await _generation(call, req, path="/v1/chat/completions", body=body, chat=True)


async def _check_capabilities(
    call: Call, req: GenerateRequest | ChatRequest, wanted: dict[str, bool]
) -> None:
    """Refuses, before any load, what the model cannot do (as Ollama does)."""
    model = await asyncio.to_thread(traits, call.state.scheduler.resolve(req.model))
    # think: false (or "low"…) on a model without thinking is harmless; only asking for it is not.
    wanted["thinking"] = req.think not in (None, False)
    refuse_missing(req.model, model, wanted)


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
    call.admit(req.model, req.keep_alive, split_options(req.options)[1], stream=stream)
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

    upstream = await call.until_disconnected(opening())

    async def lines() -> AsyncIterator[bytes]:
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

    # Headers are gone once streaming: an error becomes the stream's last line, as Ollama does it.
    return call.respond_stream(
        upstream,
        lines(),
        error_chunk=lambda e: to_json({"error": e.message}) + _NL,
        media_type=NDJSON,
    )


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
    return out


# ---- embeddings ------------------------------------------------------------------------------


@router.post("/api/embed", openapi_extra=body_schema(EmbedRequest))
@endpoint("ollama", "/api/embed")
async def embed(call: Call) -> Response:
    """Embeddings for one text or many, L2-normalised as Ollama returns them."""
    req = EmbedRequest.model_validate_json(await call.body())
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
    req = EmbeddingsRequest.model_validate_json(await call.body())
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


# ---- models ----------------------------------------------------------------------------------


def ollama_details(entry: EntryLike) -> dict[str, Any]:
    """Ollama's ``details`` object (only its keys: clients validate it)."""
    d = entry.details
    family = d.get("family", "")
    return {
        "parent_model": "",
        "format": d.get("format", "gguf"),
        "family": family,
        "families": d.get("families") or ([family] if family else None),
        "parameter_size": d.get("parameter_size", ""),
        "quantization_level": d.get("quantization_level", ""),
    }


def _expires_at(r: ResidentLike) -> str:
    if r.expires_at is not None:
        return r.expires_at.isoformat().replace("+00:00", "Z")
    # Kept forever (or pinned): Ollama shows time.Now() + MaxInt64, about 292 years ahead.
    from datetime import datetime, timedelta, timezone

    far = datetime.now(timezone.utc) + timedelta(microseconds=_FOREVER_NS // 1000)
    return far.isoformat().replace("+00:00", "Z")


@router.get("/api/ps")
async def ps(state: State) -> Response:
    """Resident models, with residency's own accounting beside Ollama's fields."""
    models = []
    for r in state.scheduler.resident():
        models.append(
            {
                "name": r.name,
                "model": r.name,
                "size": r.bytes,
                "digest": r.entry.digest,
                "details": ollama_details(r.entry),
                "expires_at": _expires_at(r),
                "size_vram": r.size_vram,
                "context_length": r.context_length,
                # residency's additions: where it lives, what was promised, what was measured.
                "device": r.device,
                "state": r.state,
                "reserved_bytes": r.bytes,
                "estimated_bytes": r.estimated_bytes,
                "measured_bytes": r.measured_bytes,
                "refcount": r.refcount,
            }
        )
    return json_response({"models": models})


@router.get("/api/tags")
async def tags(state: State) -> Response:
    """Every model clients may ask for."""
    return json_response(
        {
            "models": [
                {
                    "name": e.name,
                    "model": e.name,
                    "modified_at": e.modified_at.isoformat().replace("+00:00", "Z"),
                    "size": e.size_bytes,
                    "digest": e.digest,
                    "details": ollama_details(e),
                }
                for e in state.scheduler.models()
            ]
        }
    )


@router.post("/api/show", openapi_extra=body_schema(ShowRequest))
async def show(request: Request) -> Response:
    """A model's details, GGUF metadata (``model_info``), template and parameters."""
    state = api_state(request)
    req = ShowRequest.model_validate_json(await read_body(request))
    entry = state.scheduler.resolve(req.model_name)
    info: dict[str, Any] = {}
    template = ""
    if entry.details.get("format") == "gguf":
        try:
            info, template = await asyncio.to_thread(model_info, entry.path, verbose=req.verbose)
        except (OSError, ValueError) as err:  # the file changed or broke since start-up
            raise ApiError(500, f"cannot read {entry.path}: {err}") from err
    options = dict(entry.options)
    params = []
    for key, name in (("ctx", "num_ctx"), ("gpu_layers", "num_gpu"), ("parallel", "num_parallel")):
        value = options.get(key)
        if value is not None and value != "auto":
            params.append(f"{name:<30} {value}")
    modelfile = f'# Modelfile generated by "residency"\nFROM {entry.path}\n'
    if template:
        modelfile += f'TEMPLATE """{template}"""\n'
    modelfile += "".join(f"PARAMETER {p.split()[0]} {p.split()[1]}\n" for p in params)
    capabilities = list(traits(entry).capabilities)
    return json_response(
        {
            "modelfile": modelfile,
            "parameters": "\n".join(params),
            "template": template,
            "details": ollama_details(entry),
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": entry.modified_at.isoformat().replace("+00:00", "Z"),
        }
    )


# ---- management residency leaves to the files (and to Ollama) ---------------------------------

_NOT_HERE = {
    "pull": "residency does not download models: run `ollama pull NAME` (residency serves "
    "Ollama's model store) or put a GGUF file in models_dir",
    "push": "residency does not push models: run `ollama push NAME`",
    "create": "residency does not create models: put a GGUF file in models_dir (per-model "
    "options go in residency.toml) or run `ollama create`",
    "copy": "residency does not copy models: copy the GGUF file in models_dir or run `ollama cp`",
    "delete": "residency does not delete models: remove the GGUF file from models_dir or run "
    "`ollama rm NAME`",
    "blobs": "residency does not store blobs: put a GGUF file in models_dir",
}


def _not_served(what: str) -> Callable[[], Awaitable[Response]]:
    async def refuse() -> Response:
        raise ApiError(501, _NOT_HERE[what], code="not_implemented")

    refuse.__name__ = f"{what}_not_served"
    return refuse


for _verb, _method in (
    ("pull", "POST"),
    ("push", "POST"),
    ("create", "POST"),
    ("copy", "POST"),
    ("delete", "DELETE"),
):
    router.add_api_route(f"/api/{_verb}", _not_served(_verb), methods=[_method])
router.add_api_route(
    "/api/blobs/{digest}", _not_served("blobs"), methods=["HEAD", "POST"], include_in_schema=False
)


@router.get("/api/version")
async def version() -> Response:
    return json_response({"version": __version__})


@router.get("/", response_class=PlainTextResponse)
async def root() -> Response:
    # Clients probe this text to find a server; residency answers as Ollama does.
    return PlainTextResponse("Ollama is running")


@router.head("/", include_in_schema=False)
async def root_head() -> Response:
    return Response(media_type="text/plain")
