"""The runner HTTP client against real loopback servers: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

from residency.runners.http import RunnerClient, TransportError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A raw TCP server; yields its port and the request heads it received."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve(_Recorder(reader, heads), writer)  # type: ignore[arg-type]

    srv = await asyncio.start_server(recording, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        yield port, heads


class _Recorder:
    def __init__(self, reader: asyncio.StreamReader, heads: list[bytes]) -> None:
        self._reader = reader
        self._heads = heads

    async def readuntil(self, sep: bytes) -> bytes:
        data = await self._reader.readuntil(sep)
        if sep == b"\r\n\r\n":
            self._heads.append(data)
        return data

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.read(n)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


def echo_response(body: bytes, *, close: bool = False) -> bytes:
    extra = b"connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + extra
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        _, body = await read_request(reader)
        writer.write(echo_response(body))
        await writer.drain()


async def post_returns_status_headers_body_and_reuses_the_connection() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await echo_forever(reader, writer)

    async with server(handler) as (port, heads):
        client = RunnerClient("127.0.0.1", port)
        try:
            for i in range(5):
                r = await client.post(
                    "/v1/x", f'{{"i":{i}}}'.encode(), headers={"content-type": "application/json"}
                )
                assert (r.status, r.content) == (200, f'{{"i":{i}}}'.encode())
                assert r.headers["content-type"] == "application/json"
        finally:
            await client.aclose()
    assert connections == 1
    first = heads[0].decode()
    assert first.startswith("POST /v1/x HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{port}\r\n" in first
    assert "content-length: 7\r\n" in first


async def error_statuses_are_returned_not_raised() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 7\r\n\r\nloading")

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        r = await client.get("/health")
        await client.aclose()
    assert (r.status, r.content) == (503, b"loading")


async def chunked_stream_arrives_in_pieces_and_lines_split_on_any_ending() -> None:
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\r\n\r\nda", b"ta: 2\n\n", b"data: 3\r"):
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await gate.wait()
            gate.clear()
        writer.write(b"0\r\n\r\n")

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        resp = await client.stream("POST", "/s", body=b"{}")
        assert resp.status == 200
        lines = []
        async for line in resp.aiter_lines():
            lines.append(line)
            gate.set()  # the server sends the next piece only once we read this one
        await client.aclose()
    assert [ln for ln in lines if ln] == ["data: 1", "data: 2", "data: 3"]


async def closing_a_stream_early_closes_its_connection() -> None:
    saw_close = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        assert await reader.read() == b""  # EOF: the client hung up
        saw_close.set()

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        async with await client.stream("POST", "/s", body=b"{}") as resp:
            async for chunk in resp.aiter_bytes():
                assert chunk == b"first"
                break
        await asyncio.wait_for(saw_close.wait(), 5)
        await client.aclose()


async def a_stale_kept_alive_connection_is_retried_once_on_a_new_one() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        _, body = await read_request(reader)
        served += 1
        writer.write(echo_response(body))
        await writer.drain()
        # Then wait for the next request and drop it unanswered, as a server whose keep-alive
        # timer fired just as the request arrived.
        await reader.read(1)

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        assert (await client.post("/a", b"1")).content == b"1"
        assert (await client.post("/b", b"2")).content == b"2"
        await client.aclose()
    assert served == 2


async def connection_closed_mid_answer_raises() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        with pytest.raises(TransportError, match="connection lost before the answer"):
            await client.post("/x", b"{}")
        await client.aclose()


async def a_fresh_connection_dropped_without_answer_is_not_retried() -> None:
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        await read_request(reader)  # and close: a runner that crashed on this request

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        with pytest.raises(TransportError):
            await client.post("/x", b"{}")
        await client.aclose()
    assert calls == 1


async def body_until_close_when_the_answer_has_no_length() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        r = await client.get("/x")
        await client.aclose()
    assert r.content == b"all of it"


async def refused_connection_and_timeouts_raise_transport_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        client = RunnerClient("127.0.0.1", port)
        with pytest.raises(TransportError, match="cannot connect"):
            await client.get("/health")
        await client.aclose()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with server(silent) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        with pytest.raises(TransportError, match=r"within 0\.2 s"):
            await client.get("/health", timeout_s=0.2)
        await client.aclose()


async def garbage_answer_raises() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        with pytest.raises(TransportError, match="not valid HTTP"):
            await client.get("/x")
        await client.aclose()


async def a_large_stream_applies_backpressure_and_arrives_whole() -> None:
    size = 8 << 20

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode())
        block = bytes(range(256)) * 256
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        resp = await client.stream("GET", "/big")
        total = 0
        async for chunk in resp.aiter_bytes():
            total += len(chunk)
            await asyncio.sleep(0)  # a slow consumer
        await client.aclose()
    assert total == size


async def concurrent_requests_use_separate_connections() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(echo_response(body))
            await writer.drain()

    async with server(handler) as (port, _):
        client = RunnerClient("127.0.0.1", port)
        results = await asyncio.gather(*(client.post("/x", str(i).encode()) for i in range(8)))
        await client.aclose()
    assert [r.content for r in results] == [str(i).encode() for i in range(8)]


CASES = [
    post_returns_status_headers_body_and_reuses_the_connection,
    error_statuses_are_returned_not_raised,
    chunked_stream_arrives_in_pieces_and_lines_split_on_any_ending,
    closing_a_stream_early_closes_its_connection,
    a_stale_kept_alive_connection_is_retried_once_on_a_new_one,
    connection_closed_mid_answer_raises,
    a_fresh_connection_dropped_without_answer_is_not_retried,
    body_until_close_when_the_answer_has_no_length,
    refused_connection_and_timeouts_raise_transport_errors,
    garbage_answer_raises,
    a_large_stream_applies_backpressure_and_arrives_whole,
    concurrent_requests_use_separate_connections,
]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_client(case: Callable[[], Awaitable[None]], loop: str) -> None:
    """Every case on both loops: `residency serve` runs on uvloop, an embedder may not."""
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(asyncio.wait_for(case(), 30))
