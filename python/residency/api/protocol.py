"""uvicorn's httptools protocol, sending each response's head and first body bytes in one write.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, then its body in a second write. On loopback each ``send(2)`` runs the
receiver's TCP processing and wakes it: on the 2-core CI machine one costs 50-150 µs of the
server's CPU, and the client may wake twice. Holding the head until the body's first bytes (or
the end of the event loop's current step, whichever comes first) makes it one write, one segment
and one wake-up. Nothing waits longer than the step that wrote it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingTransport", "HttpProtocol", "protocol_with"]


class CoalescingTransport:
    """A transport that holds a lone response head until the next write, or the loop's next step.

    Everything but writing and closing is the wrapped transport's own.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            data = self._held + data
            self._held = None
        elif _is_head(data):
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _is_head(data: bytes | bytearray | memoryview) -> bool:
    """A status line and headers with nothing after them (how uvicorn writes a response start)."""
    return bytes(data[:5]) == b"HTTP/" and bytes(data[-4:]) == b"\r\n\r\n"


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a CoalescingTransport (``uvicorn.Config(http=...)``),
    closing connections whose request headers take longer than :attr:`header_timeout_s`.

    uvicorn has no such timeout: a client that connects and sends nothing, or half a request
    line, holds its connection (and its file descriptor) forever. The body's own deadline is the
    app's (``limits.read_body``).
    """

    #: Seconds from a connection (or the first byte of a request on it) to its headers' end.
    header_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        wrapped: Any = CoalescingTransport(transport, self.loop)
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(wrapped)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_with(header_timeout_s: float) -> type[HttpProtocol]:
    """HttpProtocol with the settings' header timeout (uvicorn instantiates the class itself)."""
    return type("HttpProtocol", (HttpProtocol,), {"header_timeout_s": header_timeout_s})
