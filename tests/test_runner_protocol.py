"""The runner protocol (runners/protocol.py) against runners that answer byte for byte as scripted:
a refusal is RunnerRejected (400 with the runner's message), a runner that breaks off is
RunnerFailed (502) — decided from the HTTP answer, with a log that says the opposite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest

from residency.api.errors import api_error
from residency.runners.http import RunnerClient
from residency.runners.protocol import RunnerApi, RunnerFailed, RunnerRejected

pytestmark = pytest.mark.timeout(20)

#: What a runner's log might say; the protocol must decide without it.
MISLEADING_LOG = "ValueError: Requested tokens (3003) exceed context window of 1024"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _sse_head() -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


@asynccontextmanager
async def scripted(answers: Sequence[bytes]) -> AsyncIterator[tuple[RunnerApi, list[bytes]]]:
    """A runner that answers its n-th request with answers[n] verbatim, then closes the socket."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        received.append(await reader.readexactly(length))
        writer.write(answers[min(len(received), len(answers)) - 1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RunnerClient("127.0.0.1", port)
    tail: Callable[[], str] = lambda: MISLEADING_LOG  # noqa: E731
    try:
        yield RunnerApi(client, name="m", output_tail=tail), received
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_a_refusal_is_rejected_with_the_runners_message() -> None:
    answer = _json(400, b'{"error": {"message": "the prompt has 9000 tokens; 4096 fit"}}')
    async with scripted([answer]) as (api, _):
        with pytest.raises(RunnerRejected) as info:
            await api.complete("/v1/chat/completions", {**BODY, "stream": False})
        assert info.value.message == "the prompt has 9000 tokens; 4096 fit"
        with pytest.raises(RunnerRejected):
            await api.stream("/v1/chat/completions", BODY)
    err = api_error(info.value)
    assert (err.status, err.message) == (400, "the prompt has 9000 tokens; 4096 fit")


async def test_a_connection_closed_mid_answer_is_a_failure() -> None:
    event = _chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n')
    async with scripted([_sse_head() + event]) as (api, _):  # no last chunk, no [DONE]
        stream = await api.stream("/v1/chat/completions", BODY)
        got: list[object] = []

        async def read_all() -> None:
            async for ev, _ in stream:
                got.append(ev)

        with pytest.raises(RunnerFailed) as info:
            await read_all()
        await stream.aclose()
        assert len(got) == 1
    assert api_error(info.value).status == 502
    assert "failed during the request" in str(info.value)


async def test_an_unstreamed_answer_cut_short_is_a_failure() -> None:
    cut = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
    async with scripted([cut]) as (api, _):
        with pytest.raises(RunnerFailed):
            await api.complete("/v1/completions", {"model": "m", "prompt": "x"})


async def test_a_stream_cut_before_its_first_event_asks_the_runner_why() -> None:
    refusal = _json(400, b'{"error": "Requested tokens (3003) exceed context window of 1024"}')
    async with scripted([_sse_head(), refusal]) as (api, received):
        with pytest.raises(RunnerRejected, match="exceed context window"):
            await api.stream("/v1/chat/completions", BODY)
        assert b'"stream":false' in received[1]
        assert b'"max_tokens":1' in received[1]
    # The same cut, and a runner that then answers fine: it broke, whatever its log says.
    fine = _json(200, b'{"choices": [{"index": 0, "message": {"content": "x"}}]}')
    async with scripted([_sse_head(), fine]) as (api, _):
        with pytest.raises(RunnerFailed, match="ended its stream without finishing"):
            await api.stream("/v1/chat/completions", BODY)
    # The runner gone altogether: a failure.
    async with scripted([_sse_head(), b""]) as (api, _):
        with pytest.raises(RunnerFailed):
            await api.stream("/v1/chat/completions", BODY)


async def test_an_error_event_is_a_failure_and_bad_json_too() -> None:
    error = _chunk(b'data: {"error": {"message": "out of memory"}}\n\n') + b"0\r\n\r\n"
    async with scripted([_sse_head() + error]) as (api, _):
        with pytest.raises(RunnerFailed, match="out of memory"):
            await api.stream("/v1/chat/completions", BODY)
    junk = _chunk(b"data: {not json\n\n") + b"0\r\n\r\n"
    async with scripted([_sse_head() + junk]) as (api, _):
        with pytest.raises(RunnerFailed, match="not JSON"):
            await api.stream("/v1/chat/completions", BODY)


async def test_embeddings_come_in_input_order_and_pooled() -> None:
    body = (
        b'{"data": [{"index": 1, "embedding": [[1.0, 3.0], [3.0, 5.0]]},'
        b' {"index": 0, "embedding": [0.5, 0.5]}], "usage": {"prompt_tokens": 4}}'
    )
    async with scripted([_json(200, body)]) as (api, _):
        result = await api.embed({"model": "m", "input": ["a", "b"]})
    assert result.vectors == [[0.5, 0.5], [2.0, 4.0]]
    assert result.prompt_tokens == 4
