"""Bounded inputs: bodies read with a size cap and a deadline, parsed off the event loop when
large, and the fields that size a request's work (messages, prompt, n, num_predict, num_ctx,
keep_alive, model names) checked before anything is queued or evicted for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import from_json
from starlette.requests import ClientDisconnect, Request

from residency.api.errors import ApiError, ClientDisconnected, short
from residency.config import Settings
from residency.keepalive import KEEP_FOREVER, parse_keep_alive

__all__ = [
    "MAX_NAME_CHARS",
    "check_keep_alive",
    "check_model_name",
    "check_work",
    "parse_body",
    "read_body",
    "short",
]

M = TypeVar("M", bound=BaseModel)

#: Longest model name accepted; longer ones are refused, and names in messages are cut to it.
MAX_NAME_CHARS = 256
#: Bodies above this are parsed in two steps (see parse_body).
PARSE_IN_STEPS_BYTES = 256 * 1024
#: The longest keep-alive the core represents; longer means forever (Ollama: MaxInt64 ns).
_CENTURY_NS = 100 * 365 * 24 * 3600 * 1_000_000_000


async def read_body(request: Request, settings: Settings) -> bytes:
    """The body, refused with 413 as soon as it passes ``max_body_bytes`` (never buffered past
    it) and with 408 when it takes longer than ``body_timeout_s`` to arrive."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    try:
        body = await asyncio.wait_for(_read_capped(request, limit), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"request body not received within {settings.body_timeout_s:g} s"
        ) from None
    except ClientDisconnect:
        raise ClientDisconnected() from None
    if not body.strip():
        raise ApiError(400, "missing request body")
    return body


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise _too_large(limit)
    return bytes(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")


def parse_body(model: type[M], body: bytes, settings: Settings) -> M:
    """`body` validated as `model`, never spending long on the event loop.

    Validating JSON straight into the models costs ~6 µs per chat message (building each
    message's model): a 35 MB body of tiny messages held the loop, and so every client, for 8 s.
    A worker thread does not help: validation holds the GIL. So a large body is first parsed to
    plain values (pydantic-core's parser, ~10 ms per MB), its message count checked, and only
    then validated, from values whose size is now bounded.
    """
    if len(body) <= PARSE_IN_STEPS_BYTES:
        return model.model_validate_json(body)
    try:
        data = from_json(body)
    except ValueError as err:
        raise ApiError(400, f"invalid JSON in request body: {short(str(err), 200)}") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list):
        check_work(settings, messages=len(messages))
    return model.model_validate(data)


def check_model_name(name: str) -> None:
    if len(name) > MAX_NAME_CHARS:
        raise ApiError(400, f"model name {short(name)!r} is longer than {MAX_NAME_CHARS} chars")
    if "\x00" in name:
        raise ApiError(400, f"model name {short(name)!r} contains a NUL character")


def check_keep_alive(value: str | float | None) -> tuple[str | float | None, int | None]:
    """(what to give the scheduler, ns): 400 for an unparseable keep_alive; a duration beyond
    what the core represents becomes forever (-1), never an overflow."""
    if value is None:
        return None, None
    try:
        ns = parse_keep_alive(value)
    except Exception as err:  # InvalidArgumentError; message already says what is wrong
        raise ApiError(
            400, f"keep_alive: {short(str(err), 200)}", code="invalid_keep_alive"
        ) from None
    if ns > _CENTURY_NS:
        return KEEP_FOREVER, KEEP_FOREVER
    return value, ns


def _positive_int(name: str, value: Any, limit: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ApiError(400, f"{name} must be an integer, not {short(repr(value))}")
    if name == "num_predict" and value < 0:  # Ollama: -1 = until the context is full
        return
    if not 0 < value <= limit:
        raise ApiError(400, f"{name} must be between 1 and {limit}, not {int(value)}")


def check_work(
    settings: Settings,
    *,
    options: Mapping[str, Any] | None = None,
    body: Mapping[str, Any] | None = None,
    messages: int = 0,
    prompt_chars: int = 0,
    context_length: int | None = None,
) -> None:
    """400 for a request asking for more than may be served: every check is arithmetic, done
    before the request is queued (so nothing is evicted for a request that is refused)."""
    if messages > settings.max_messages:
        raise ApiError(400, f"{messages} messages; at most {settings.max_messages} are accepted")
    if prompt_chars > settings.max_prompt_chars:
        raise ApiError(
            400, f"prompt of {prompt_chars} characters; at most {settings.max_prompt_chars}"
        )
    opts = options or {}
    fields = body or {}
    for name in ("num_predict", "max_tokens", "max_completion_tokens"):
        _positive_int(name, opts.get(name, fields.get(name)), settings.max_num_predict)
    _positive_int("n", fields.get("n"), settings.max_n)
    num_ctx = opts.get("num_ctx", fields.get("num_ctx"))
    # Beyond the model's training context a num_ctx is clamped to it, as Ollama does (sizing);
    # only absurd values, beyond what any model here could be asked for, are refused.
    ctx_limit = max(context_length or 0, settings.max_num_ctx)
    _positive_int("num_ctx", num_ctx, ctx_limit)
