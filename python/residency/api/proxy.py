"""Answers to the client: JSON bodies, streams that hold a lease, and noticing a client gone.

Every request holds its lease for exactly as long as it uses the runner: a plain request inside
``async with``; a stream from the moment its first byte is ready until the last byte is sent, the
client goes away, or the server stops — whichever comes first (``LeasedStream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic_core import to_json
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from residency.api.errors import ClientDisconnected
from residency.api.metrics import RequestRecord

__all__ = [
    "ClientDisconnected",
    "JSONBytes",
    "LeasedStream",
    "json_response",
    "now_ns",
    "until_disconnected",
]

T = TypeVar("T")


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
                self._record.finish(499)
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
