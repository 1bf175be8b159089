"""Loading progress for the clients that ask for it, streamed before the first token.

A client sends ``X-Residency-Loading-Progress: 1`` on a streamed request; while its model is
queued or loading, the stream starts at once and carries a progress chunk every half second, then
one saying the model is ready, then the answer as usual. What each API's clients tolerate:

- **Ollama** (NDJSON): lines shaped like the stream's own (``"message": {"content": ""}`` or
  ``"response": ""``, ``"done": false``) with a ``"loading"`` object (``state``, ``elapsed_s``):
  clients that concatenate content see nothing, those that look for ``loading`` can show it.
- **OpenAI chat** (SSE): ``reasoning_content`` deltas ("Loading gemma3:270m… 1.5 s"), as
  llama-swap's ``sendLoadingState`` does, so chat UIs show the wait as thinking; with the value
  ``comment``, SSE comment lines instead (``: loading …``), which every SSE parser skips.
  ``/v1/completions`` has no reasoning field: comments always.

Without the header nothing changes: the status waits for the model, as before. With it the status
(200) is sent before the model is ready, so a load that fails becomes the stream's error chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from pydantic_core import to_json
from starlette.requests import Request

from residency.api.errors import ApiError
from residency.api.pipeline import Upstream
from residency.api.state import ApiState

__all__ = ["HEADER", "LoadingProgress", "Pending", "openai_chunk", "progress_mode", "streamed"]

HEADER = "x-residency-loading-progress"
Mode = Literal["lines", "reasoning", "comment"]

#: A model granted within this long gets no progress chunk at all (it was loaded already).
_FIRST_S = 0.05
_INTERVAL_S = 0.5


def progress_mode(request: Request, *, openai: bool) -> Mode | None:
    """What the request asked for: None (no header, or 0/false/no), else how to show it."""
    value = request.headers.get(HEADER, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return None
    if value not in ("1", "true", "yes", "on", "reasoning", "comment"):
        raise ApiError(400, f"{HEADER}: expected 1, 0, reasoning or comment, not {value[:32]!r}")
    if not openai:
        return "lines"
    return "comment" if value == "comment" else "reasoning"


@dataclass(frozen=True)
class LoadingProgress:
    model: str
    #: "queued" (waiting for memory or other loads), "loading", "unloading" (reloads after), or
    #: "ready" (the last chunk).
    state: str
    elapsed_s: float

    def text(self) -> str:
        if self.state == "ready":
            return f"{self.model} loaded in {self.elapsed_s:.1f} s\n"
        return f"Loading {self.model} ({self.state}, {self.elapsed_s:.1f} s)…\n"


class Pending:
    """An upstream still being opened (its model queued or loading); closing it closes the
    upstream, or cancels the opening (which releases the lease)."""

    def __init__(self, opening: Awaitable[Upstream]) -> None:
        self.task: asyncio.Task[Upstream] = asyncio.ensure_future(opening)
        self.started = time.monotonic()

    async def aclose(self) -> None:
        if self.task.done():
            if not self.task.cancelled() and self.task.exception() is None:
                await self.task.result().aclose()
            return
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def streamed(
    state: ApiState,
    model: str,
    pending: Pending,
    lines: Callable[[Upstream], AsyncIterator[bytes]],
    chunk: Callable[[LoadingProgress], bytes],
) -> AsyncIterator[bytes]:
    """Progress chunks while `pending` opens, then the stream `lines` makes of the upstream."""

    async def run() -> AsyncIterator[bytes]:
        t0 = pending.started
        task = pending.task
        await asyncio.wait({task}, timeout=_FIRST_S)
        shown = False
        while not task.done():
            yield chunk(LoadingProgress(model, _state_of(state, model), time.monotonic() - t0))
            shown = True
            await asyncio.wait({task}, timeout=_INTERVAL_S)
        upstream = task.result()  # a failed load raises here: the stream's error chunk
        if shown:
            yield chunk(LoadingProgress(model, "ready", time.monotonic() - t0))
        async for piece in lines(upstream):
            yield piece

    return run()


def _state_of(state: ApiState, model: str) -> str:
    try:
        name = state.scheduler.resolve(model).name
    except Exception:  # resolved before queueing; a model removed meanwhile is the load's error
        return "queued"
    for row in state.scheduler.resident():
        if row.name == name:
            return row.state if row.state != "ready" else "loading"
    return "queued"


def openai_chunk(mode: Mode, asked: str, chat: bool) -> Callable[[LoadingProgress], bytes]:
    """OpenAI's progress chunk: a reasoning_content delta, or an SSE comment."""
    created = int(time.time())
    first = [True]

    def chunk(p: LoadingProgress) -> bytes:
        if mode == "comment" or not chat:
            return b": " + p.text().strip().encode() + b"\n\n"
        delta: dict[str, str] = {"reasoning_content": p.text()}
        if first[0]:
            delta["role"] = "assistant"
            first[0] = False
        event = {
            "id": "chatcmpl-loading",
            "object": "chat.completion.chunk",
            "created": created,
            "model": asked,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        return b"data: " + to_json(event) + b"\n\n"

    return chunk
