"""Talking to a runner through its lease, and handing streams back to the client.

Every request holds its lease for exactly as long as it uses the runner: a plain request inside
``async with``; a stream from the moment its first byte is ready until the last byte is sent, the
client goes away, or the server stops — whichever comes first (``LeasedStream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic_core import from_json, to_json
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from residency.api._types import LeaseLike
from residency.api.errors import ApiError, ClientDisconnected
from residency.api.metrics import RequestRecord
from residency.errors import RunnerError
from residency.runners.http import StreamResponse, TransportError

__all__ = [
    "ClientDisconnected",
    "JSONBytes",
    "LeasedStream",
    "RunnerStream",
    "json_response",
    "open_stream",
    "post_json",
    "read_body",
    "runner_failure",
    "sse_events",
    "until_disconnected",
]

T = TypeVar("T")

_JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
_SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class JSONBytes(Response):
    """An encoded JSON body, sent as two ASGI messages; with a record, it finishes the record once
    the answer is out (its log line costs ~0.2 ms on a slow core, which the client need not wait
    for).

    Starlette's Response would do the same through a BackgroundTask, its header rendering and a
    generic __call__: ~40 µs more per request on a cache-cold core, with nothing to show for it.
    """

    media_type = "application/json"

    def __init__(
        self,
        body: bytes,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        *,
        record: RequestRecord | None = None,
    ) -> None:
        self.body = body
        self.status_code = status
        self.background = None
        self.raw_headers = [
            (b"content-length", b"%d" % len(body)),
            (b"content-type", b"application/json"),
        ]
        if headers:
            self.raw_headers += [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            ]
        self._record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send({"type": "http.response.body", "body": self.body})
        except BaseException:
            if self._record is not None:
                self._record.finish("disconnected")
            raise
        if self._record is not None:
            self._record.finish(self.status_code)


def json_response(
    data: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    *,
    record: RequestRecord | None = None,
) -> Response:
    """`data` as JSON (bytes pass through: already encoded); see JSONBytes for `record`."""
    # pydantic-core's serializer: one Rust call, no jsonable_encoder pass.
    body = data if isinstance(data, bytes) else to_json(data)
    return JSONBytes(body, status, headers, record=record)


async def read_body(request: Request) -> bytes:
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "missing request body")
    return body


def runner_failure(lease: LeaseLike, err: BaseException) -> RunnerError:
    """A transport failure talking to the runner: it crashed, was stopped, or stopped answering."""
    what = type(err).__name__
    detail = str(err) or what
    return RunnerError(
        f"runner for model {lease.entry.name!r} failed during the request ({detail})",
        lease.output_tail(),
    )


def _runner_message(status: int, content: bytes) -> str:
    """The runner's own error message from whichever shape it used."""
    try:
        data = from_json(content)
    except ValueError:
        return content.decode(errors="replace").strip()[:2000] or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        detail = data.get("detail")
        if isinstance(detail, list):  # FastAPI validation errors (llama-cpp-python)
            return "; ".join(
                f"{'.'.join(str(x) for x in d.get('loc', ()) if x != 'body')}: {d.get('msg')}"
                for d in detail
                if isinstance(d, dict)
            )
        if detail:
            return str(detail)
    return content.decode(errors="replace").strip()[:2000]


def _runner_error(lease: LeaseLike, status: int, content: bytes) -> Exception:
    message = _runner_message(status, content)
    if status < 500:
        # The runner found the request itself wrong (context exceeded, bad field): a client error.
        return ApiError(400, message, code="invalid_request")
    return RunnerError(
        f"runner for model {lease.entry.name!r} failed (HTTP {status}): {message}",
        lease.output_tail(),
    )


Body = Mapping[str, Any] | bytes
"""A runner request's JSON body: a mapping, or bytes already encoded (a client's, passed on)."""


def _encoded(body: Body) -> bytes:
    return body if isinstance(body, bytes) else to_json(body)


async def post_json(lease: LeaseLike, path: str, body: Body) -> bytes:
    """POSTs `body` to the runner; returns its JSON answer's bytes or raises in our shape."""
    try:
        resp = await lease.client.post(path, _encoded(body), headers=_JSON_HEADERS)
    except TransportError as err:
        raise runner_failure(lease, err) from err
    if resp.status >= 400:
        raise _runner_error(lease, resp.status, resp.content)
    return resp.content


async def open_stream(lease: LeaseLike, path: str, body: Body) -> StreamResponse:
    """Starts a streamed request; returns once the runner answered with a success status.

    The caller owns the response and must ``aclose()`` it (closing it mid-stream tells the runner
    to stop generating).
    """
    try:
        resp = await lease.client.stream("POST", path, body=_encoded(body), headers=_SSE_HEADERS)
    except TransportError as err:
        raise runner_failure(lease, err) from err
    if resp.status >= 400:
        try:
            content = await resp.aread()
        except TransportError:
            content = b""
        finally:
            await resp.aclose()
        raise _runner_error(lease, resp.status, content)
    return resp


class _Done:
    """The stream's explicit end (``data: [DONE]``)."""


DONE = _Done()


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


async def _cut_short(lease: LeaseLike) -> Exception:
    """The error for a stream the runner ended without ``[DONE]``: it failed after answering 200
    (llama-cpp-python does so when the prompt exceeds the context). Its traceback, in its output,
    says why; a ValueError there is the runner rejecting the input, as its non-streamed answer
    would (400)."""
    line = None
    for _ in range(20):  # the traceback reaches the log a moment after the socket closes
        for text in reversed(lease.output_tail().splitlines()):
            m = _EXCEPTION_LINE.match(text.strip())
            if m:
                line = m
                break
        if line is not None:
            break
        await asyncio.sleep(0.025)
    if line is not None and line.group(1) == "ValueError":
        return ApiError(400, line.group(2), code="invalid_request")
    detail = f": {line.group(1)}: {line.group(2)}" if line is not None else ""
    return RunnerError(
        f"runner for model {lease.entry.name!r} ended its stream without finishing{detail}",
        lease.output_tail(),
    )


Event = tuple[dict[str, Any], int]


async def sse_events(lease: LeaseLike, resp: StreamResponse) -> AsyncIterator[Event]:
    """The JSON payloads of a runner's server-sent events with their arrival times (perf ns),
    until ``[DONE]``. A stream that ends without ``[DONE]`` raises: the runner failed part way.
    """
    try:
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments (": ping"), event:/id: fields
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            if not payload:
                continue
            try:
                event = from_json(payload)
            except ValueError as err:
                raise RunnerError(
                    f"runner for model {lease.entry.name!r} sent an event that is not JSON: "
                    f"{payload[:200]!r}"
                ) from err
            if isinstance(event, dict):
                if "error" in event and "choices" not in event:
                    raise _runner_error(lease, 500, payload.encode())
                yield event, time.perf_counter_ns()
    except TransportError as err:
        raise runner_failure(lease, err) from err
    raise await _cut_short(lease)


class RunnerStream:
    """A runner's event stream, opened and read up to its first event.

    Waiting for the first event before answering means a runner that fails before producing
    anything (an over-long prompt, a crash during prompt processing) still gets a real HTTP error
    status; Ollama likewise sends its headers with the first token.
    """

    def __init__(self, response: StreamResponse, events: AsyncIterator[Event]) -> None:
        self.response = response
        self._events = events
        self._first: Event | None = None

    @classmethod
    async def open(cls, lease: LeaseLike, path: str, body: Body) -> RunnerStream:
        response = await open_stream(lease, path, body)
        stream = cls(response, sse_events(lease, response))
        try:
            stream._first = await stream._events.__anext__()
        except StopAsyncIteration:
            pass
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for item in self._events:
            yield item

    async def aclose(self) -> None:
        await self.response.aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


#: Seconds a request's work runs before anyone watches for its client going away. Most answers
#: come sooner, and then no watcher task is ever made (a task per request cost ~4 trips through
#: the event loop); a client gone earlier is noticed this much later, its work cancelled then.
WATCH_DISCONNECT_AFTER_S = 0.05


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client disconnects first (then raises ClientDisconnected).

    Cancelling the work exits its ``scheduler.session`` and so releases the lease or the queue slot.
    The work runs in the request's own task, which the disconnect watcher cancels.
    """
    task = asyncio.current_task()
    assert task is not None
    finished = False
    gone = False
    watcher: asyncio.Future[None] | None = None

    def on_disconnect(w: asyncio.Future[None]) -> None:
        nonlocal gone
        # Scheduled callbacks can outlive remove_done_callback: `finished` says it is too late.
        if not finished and not w.cancelled() and w.exception() is None:
            gone = True
            task.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        watcher.add_done_callback(on_disconnect)

    timer = asyncio.get_running_loop().call_later(WATCH_DISCONNECT_AFTER_S, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+: this cancel is handled
            if uncancel is not None:
                uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        finished = True
        timer.cancel()
        if watcher is not None:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()


Cleanup = Callable[[BaseException | None], Awaitable[None]]


class LeasedStream(StreamingResponse):
    """A streaming response that owns the lease behind it.

    It sends `content` while watching for the client to go away, and runs `cleanup` exactly once
    whatever happens — the end of the stream, a disconnect, an error, server shutdown — with the
    error that ended it (None on a clean end). Cleanup is shielded from cancellation so the lease
    is always released.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        cleanup: Cleanup,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._content = content
        self._cleanup = cleanup
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: BaseException | None = None
        streamer = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((streamer, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not streamer.done():
                self.disconnected = True
            elif not streamer.cancelled() and streamer.exception() is not None:
                error = streamer.exception()
                self.disconnected = isinstance(error, OSError)  # the socket went away mid-send
        except BaseException as err:  # cancelled: the server is stopping
            error = err
            raise
        finally:
            for task in (streamer, watcher):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(streamer, watcher, return_exceptions=True)
            # Shielded: a cancelled request must still close the upstream and release its lease.
            await asyncio.shield(self._finish(ClientDisconnected() if self.disconnected else error))
        if error is not None and not self.disconnected:
            raise error

    async def _finish(self, error: BaseException | None) -> None:
        aclose = getattr(self._content, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        await self._cleanup(error)


def now_ns() -> int:
    return time.perf_counter_ns()
