"""The HTTP client residency talks to its runners with: HTTP/1.1 over loopback, kept alive.

Every request through the facade makes one runner call, so this hop's cost is added to every
request. General-purpose clients pay for what a loopback hop to a process we started never needs
(proxies, TLS, cookies, redirects, auth, URL merging, an async-library abstraction): httpx spent
1.5-1.8 ms of CPU per call on the 2-core CI machine, this client 0.07-0.3 ms (same server, same
payload). Parsing is httptools' (llhttp, the parser uvicorn uses), so no HTTP grammar is
hand-written here; this module only keeps connections and turns parser callbacks into awaitables.

A connection serves one request at a time and goes back to the idle pool once its response was
read to the end. A stream closed early closes its connection — that is how a runner learns its
client went away and stops generating.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import cast

import httptools

from residency.runners.transport_errors import TransportError, Unanswered, UpstreamTimeout

__all__ = [
    "Response",
    "RunnerClient",
    "StreamResponse",
    "TransportError",
    "Unanswered",
    "UpstreamTimeout",
]

#: Bytes a stream may buffer before the runner's socket stops being read (backpressure).
_HIGH_WATER = 1 << 20


@dataclass(frozen=True)
class Response:
    """A whole response. Header names are lower-case."""

    status: int
    headers: Mapping[str, str]
    content: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parser callbacks fill in the response of the request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: Taken from the idle pool: a failure before any answer may be a stale keep-alive.
        self.reused = False
        #: When the request in flight was sent and its last byte came (runners.upstream reads).
        self.sent_at = 0.0
        self.last_data_at = 0.0
        self._loop = asyncio.get_running_loop()
        # One parser for the connection's life: llhttp reads kept-alive answers back to back.
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self.error: TransportError | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_data_at = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            self.fail(TransportError(f"the runner's answer is not valid HTTP ({err})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete or self.error is not None:
            return
        if self.headers_done and self._ends_at_close():
            self.on_message_complete()  # a body delimited by the connection's end
            return
        what = f"{type(exc).__name__}: {exc}" if exc else "the runner closed the connection"
        error = TransportError if self.received_any else Unanswered
        self.fail(error(f"connection lost before the answer was complete ({what})"))

    # ---- httptools callbacks ----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Asked now: the parser forgets once the message is over.
        self.keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()

    # ---- used by the client -----------------------------------------------------------------
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.sent_at = time.monotonic()
        self.transport.write(data)

    def fail(self, error: TransportError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self.close()
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def paused(self) -> bool:  # reading waits for a lagging consumer: the runner is not silent
        return self._paused

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    async def wait(self) -> None:
        """Until something new arrived (headers, body, the end) or the connection failed."""
        if self.error is not None:
            raise self.error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _ends_at_close(self) -> bool:
        return "content-length" not in self.headers and "chunked" not in self.headers.get(
            "transfer-encoding", ""
        )


class StreamResponse:
    """A response whose body is read as it arrives. Use it as an async context manager, or call
    :meth:`aclose`; closing before the end closes the connection."""

    def __init__(self, client: RunnerClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers
        self._closed = False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                break
            await conn.wait()
        await self.aclose()

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines without their endings (\\n, \\r\\n or \\r), decoded as UTF-8."""
        pending = ""
        async for chunk in self.aiter_bytes():
            pending += chunk.decode("utf-8", "replace")
            *lines, pending = pending.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            for line in lines:
                yield line
        if pending:
            yield pending

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._release(self._conn)

    async def __aenter__(self) -> StreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class RunnerClient:
    """Requests to one runner at ``http://host:port``, over a small pool of kept-alive connections.

    Failures to reach the runner or to read its whole answer raise :class:`TransportError`;
    any HTTP status is returned as it is.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout_s: float = 10.0,
        max_idle: int = 16,
    ) -> None:
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False
        self._host_header = f"host: {host}:{port}\r\n".encode()
        #: Called with the busy connections whenever one is taken (runners.upstream's watch).
        self.on_busy: Callable[[set[_Connection]], None] | None = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Sends one request and reads the whole answer, within `timeout_s` if given."""
        if timeout_s is None:
            return await self._request(method, path, body, headers)
        try:
            return await asyncio.wait_for(self._request(method, path, body, headers), timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(
                f"{method} {path}: no complete answer within {timeout_s:g} s"
            ) from None

    async def get(self, path: str, *, timeout_s: float | None = None) -> Response:
        return await self.request("GET", path, timeout_s=timeout_s)

    async def post(
        self, path: str, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> Response:
        return await self.request("POST", path, body=body, headers=headers)

    async def stream(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> StreamResponse:
        """Sends one request and returns once the answer's headers arrived."""
        conn = await self._exchange(method, path, body, headers)
        return StreamResponse(self, conn)

    async def aclose(self) -> None:
        self._closed = True
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()

    # ---- internals --------------------------------------------------------------------------
    async def _request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> Response:
        conn = await self._exchange(method, path, body, headers)
        try:
            while not conn.complete:
                await conn.wait()
            return Response(conn.status, conn.headers, conn.take())
        finally:
            self._release(conn)

    async def _exchange(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> _Connection:
        """Sends the request and waits for the answer's headers. A kept-alive connection the
        runner closed meanwhile fails without a byte of answer: that one is retried, once, on a
        new connection (the runner never saw the request)."""
        message = self._encode(method, path, body, headers)
        while True:
            conn = await self._connection()
            conn.send(message)
            try:
                while not conn.headers_done:
                    await conn.wait()
                return conn
            except TransportError:
                self._release(conn)
                stale = conn.reused and not conn.received_any
                if stale and not isinstance(conn.error, UpstreamTimeout):
                    continue
                raise
            except BaseException:
                self._release(conn)
                raise

    def _encode(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> bytes:
        head = [f"{method} {path} HTTP/1.1\r\n".encode("ascii"), self._host_header]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            head.append(f"content-length: {len(body)}\r\n".encode("ascii"))
        head.append(b"\r\n")
        if body:
            head.append(body)
        return b"".join(head)  # one write: one segment for small requests

    async def _connection(self) -> _Connection:
        if self._closed:
            raise TransportError("the client is closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                conn.reused = True
                self._busy.add(conn)
                if self.on_busy is not None:
                    self.on_busy(self._busy)
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port),
                self._connect_timeout_s,
            )
        except asyncio.TimeoutError:
            raise TransportError(
                f"cannot connect to {self.base_url} within {self._connect_timeout_s:g} s"
            ) from None
        except OSError as err:
            reason = (
                os.strerror(err.errno).lower() if err.errno else str(err)
            )  # "connection refused"
            error = Unanswered if isinstance(err, ConnectionRefusedError) else TransportError
            raise error(f"cannot connect to {self.base_url}: {reason}") from None
        self._busy.add(conn)
        if self.on_busy is not None:
            self.on_busy(self._busy)
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to the pool when its answer was read to the end, closed otherwise."""
        self._busy.discard(conn)
        if conn.reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
