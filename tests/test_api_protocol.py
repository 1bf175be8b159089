"""`residency serve`'s HTTP protocol: uvicorn's, with each response's head and body in one write.

Driven through uvicorn's real httptools protocol with a transport that records every write, so
what is checked is what would reach the socket, call by call.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from residency.api.protocol import CoalescingTransport, HttpProtocol

pytestmark = pytest.mark.timeout(30)

REQUEST = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 11434), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )


async def _serve_one(app: Any, request: bytes = REQUEST) -> list[bytes]:
    """Feeds `request` to a real HttpProtocol serving `app`; returns the transport's writes."""
    config = uvicorn.Config(app, lifespan="off", log_level="warning", http=HttpProtocol)
    state = ServerState()
    protocol = HttpProtocol(config, state, {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await asyncio.wait_for(asyncio.gather(*state.tasks), 5)
    await asyncio.sleep(0)  # one more step: anything still held is flushed now
    protocol.connection_lost(None)
    return transport.writes


async def test_a_whole_response_leaves_in_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        body = b'{"ok":true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    writes = await _serve_one(app)
    assert len(writes) == 1, writes
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 11" in head
    assert body == b'{"ok":true}'


async def test_a_stream_sends_its_head_with_the_first_chunk_and_then_each_chunk() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})

    writes = await _serve_one(app)
    assert len(writes) == 3, writes
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
    assert writes[1] == b"9\r\ndata: 2\n\n\r\n"
    assert writes[2] == b"0\r\n\r\n"


async def test_a_head_whose_body_is_late_is_not_held_back() -> None:
    head_seen: list[int] = []
    transport_writes: list[list[bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await asyncio.sleep(0.05)  # the body takes a while: the head must not wait for it
        head_seen.append(len(transport_writes[0]))
        await send({"type": "http.response.body", "body": b"{}"})

    config = uvicorn.Config(app, lifespan="off", log_level="warning", http=HttpProtocol)
    state = ServerState()
    protocol = HttpProtocol(config, state, {})
    transport = RecordingTransport()
    transport_writes.append(transport.writes)
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    await asyncio.wait_for(asyncio.gather(*state.tasks), 5)
    protocol.connection_lost(None)
    assert head_seen == [1]  # written on its own before the body came
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1] == b"{}"


async def test_an_unparseable_request_still_gets_its_400() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    writes = await _serve_one(app, b"NOT HTTP AT ALL\r\n\r\n")
    assert b"".join(writes).startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    inner = RecordingTransport()
    wrapped = CoalescingTransport(inner, loop)
    wrapped.write(head)
    assert inner.writes == []
    assert wrapped.get_write_buffer_size() == len(head)
    wrapped.close()
    assert inner.writes == [head]
    assert inner.closed

    inner = RecordingTransport()
    wrapped = CoalescingTransport(inner, loop)
    wrapped.write(head)
    wrapped.abort()
    await asyncio.sleep(0)  # the scheduled flush finds nothing to send
    assert inner.writes == []
    assert inner.aborted


async def test_writes_that_are_not_a_lone_head_pass_straight_through() -> None:
    inner = RecordingTransport()
    wrapped = CoalescingTransport(inner, asyncio.get_running_loop())
    whole = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nbad"
    wrapped.write(whole)
    wrapped.write(b"5\r\nchunk\r\n")
    assert inner.writes == [whole, b"5\r\nchunk\r\n"]
    assert wrapped.get_extra_info("sockname") == ("127.0.0.1", 11434)  # the rest is delegated
