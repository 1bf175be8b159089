"""Errors as each API shapes them, and the one mapping from exceptions to HTTP statuses.

Ollama answers ``{"error": "…"}``; OpenAI ``{"error": {"message", "type", "param", "code"}}``.
Which shape a request gets depends only on its path (``/v1/…`` is OpenAI), so one exception handler
serves both routers and no handler formats errors by hand.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from residency.errors import (
    InvalidArgumentError,
    ModelNotFoundError,
    ModelTooLargeError,
    ResidencyError,
    RunnerError,
    ServerBusyError,
    UnknownModelError,
)
from residency.runners.protocol import RunnerRejected, RunnerTimedOut

__all__ = [
    "ApiError",
    "ClientDisconnected",
    "api_error",
    "error_body",
    "error_for",
    "error_response",
    "install_exception_handlers",
    "is_openai_path",
    "short",
]

log = logging.getLogger("residency.api")

OPENAI_PREFIX = "/v1/"


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was complete."""


class ApiError(Exception):
    """An error with its HTTP status, ready to render in either API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    @property
    def openai_type(self) -> str:
        if self.status == 404:
            return "not_found_error"
        if self.status < 500:
            return "invalid_request_error"
        return "server_error"


def short(text: str, limit: int = 80) -> str:
    """`text` as it may appear in an answer or a log line: at most `limit` characters, printable."""
    cut = text if len(text) <= limit else text[:limit] + f"…({len(text)} chars)"
    return cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")


#: Longest error message sent or logged: a client's 100 KB name is never echoed back whole.
MAX_MESSAGE_CHARS = 1000


def describe_validation(errors: list[Any]) -> str:
    """One line naming every bad field: ``messages.0.role: Field required; stream: …``."""
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error") or e.get("msg", "")
            return f"invalid JSON in request body: {detail}"
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "request body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


def api_error(exc: BaseException) -> ApiError:
    """The status and message for any exception a request can raise (at most
    MAX_MESSAGE_CHARS of it)."""
    err = _api_error(exc)
    if len(err.message) > MAX_MESSAGE_CHARS:
        err.message = short(err.message, MAX_MESSAGE_CHARS)
    return err


def _api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return ApiError(499, "client disconnected", code="client_disconnected")
    if isinstance(exc, ClientDisconnected):
        # Nobody reads this answer; 499 (nginx's "client closed request") is for logs and metrics.
        return ApiError(499, "client disconnected", code="client_disconnected")
    if isinstance(exc, pydantic.ValidationError):
        return ApiError(400, describe_validation(exc.errors(include_url=False)))
    if isinstance(exc, RequestValidationError):
        return ApiError(400, describe_validation(list(exc.errors())))
    if isinstance(exc, ModelNotFoundError | UnknownModelError):
        return ApiError(404, str(exc), code="model_not_found")
    if isinstance(exc, ServerBusyError):
        retry = max(1, math.ceil(exc.retry_after_s))
        return ApiError(503, str(exc), code=exc.code, headers={"Retry-After": str(retry)})
    if isinstance(exc, InvalidArgumentError):
        return ApiError(400, str(exc), code="invalid_argument")
    if isinstance(exc, RunnerRejected):
        # The runner refused the request itself (context exceeded, bad field): the client's.
        return ApiError(400, _short(exc.message), code="invalid_request")
    if isinstance(exc, RunnerTimedOut):
        rid = _logged(exc, "runner timed out")
        return ApiError(
            504,
            f"{_short(exc.summary)} (request {rid}; the runner is being replaced)",
            code="runner_timeout",
            headers={REQUEST_ID_HEADER: rid},
        )
    if isinstance(exc, RunnerError):
        rid = _logged(exc, "runner error")
        return ApiError(
            502,
            f"{_short(exc.summary)} (request {rid}; the runner's output is in the server log)",
            code="runner_error",
            headers={REQUEST_ID_HEADER: rid},
        )
    if isinstance(exc, ModelTooLargeError):
        return ApiError(500, str(exc), code="model_too_large")
    if isinstance(exc, ResidencyError):
        return ApiError(500, str(exc), code=type(exc).__name__)
    if isinstance(exc, StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), headers=exc.headers)
    rid = _logged(exc, "unexpected error serving a request")
    return ApiError(
        500,
        f"internal error: {type(exc).__name__} (request {rid}; details in the server log)",
        code="internal_error",
        headers={REQUEST_ID_HEADER: rid},
    )


#: Clients quote it; the server log has the full story under the same id.
REQUEST_ID_HEADER = "X-Request-Id"
_MAX_REASON = 300


def _short(message: str) -> str:
    """One line of a server-side message, bounded: what a client may read."""
    line = message.strip().splitlines()[0] if message.strip() else "failed"
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 1] + "…"


def _logged(exc: BaseException, what: str) -> str:
    """Logs `exc` in full once (with its runner output) under a new request id; that id."""
    rid: str | None = getattr(exc, "residency_request_id", None)
    if rid is None:
        rid = uuid.uuid4().hex[:12]
        with contextlib.suppress(AttributeError):  # an exception type with __slots__
            exc.residency_request_id = rid  # type: ignore[attr-defined]
        log.error("%s [request %s]: %s", what, rid, exc, exc_info=exc)
    return rid


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def error_body(err: ApiError, *, openai: bool) -> dict[str, Any]:
    if openai:
        return {
            "error": {
                "message": err.message,
                "type": err.openai_type,
                "param": None,
                "code": err.code,
            }
        }
    return {"error": err.message}


def error_response(err: ApiError, *, openai: bool) -> Response:
    return Response(
        to_json(error_body(err, openai=openai)),
        status_code=err.status,
        headers=err.headers,
        media_type="application/json",
    )


async def error_for(request: Request, exc: Exception) -> Response:
    """The answer to a request that raised `exc`: every exception handler of the app."""
    return error_response(api_error(exc), openai=is_openai_path(request.scope["path"]))


def install_exception_handlers(app: FastAPI) -> None:
    """Every error, whatever raised it, leaves in the shape of the API that was called."""
    for exc_type in (
        ApiError,
        ClientDisconnected,
        ResidencyError,
        pydantic.ValidationError,
        RequestValidationError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(exc_type, error_for)
