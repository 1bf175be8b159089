"""The fault handling's parts on their own: the crash-loop circuit on an injected clock, and the
upstream watch against a real socket that answers late, slowly, or never."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from residency.config import Settings
from residency.runners.http import RunnerClient, TransportError, UpstreamTimeout
from residency.runners.upstream import UpstreamTimeouts, UpstreamWatch, tree_progress
from residency.scheduler.circuit import Circuit, CircuitOpenError

S = 1_000_000_000

pytestmark = pytest.mark.timeout(30)


def circuit(opened: list[str] | None = None) -> Circuit:
    settings = Settings(
        failure_backoff_s=1, circuit_failures=4, circuit_cooldown_s=30, failure_backoff_max_s=100
    )
    return Circuit(settings, on_open=None if opened is None else opened.append)


def test_a_lone_failure_reloads_at_once_then_backoff_doubles() -> None:
    c = circuit()
    c.failed("m", "exited (signal SIGKILL)\nsecond line", 0)
    assert c.wait_ns("m", 0) == 0  # a crash is not a loop
    assert c.state("m", 0) == "closed"
    c.failed("m", "exited again", 10 * S)
    assert c.wait_ns("m", 10 * S) == 1 * S
    assert c.state("m", 10 * S) == "backoff"
    c.failed("m", "exited again", 20 * S)
    assert c.wait_ns("m", 20 * S) == 2 * S
    assert c.wait_ns("m", 22 * S) == 0
    assert c.rows(20 * S) == [
        {
            "name": "m",
            "state": "backoff",
            "failures": 3,
            "last_error": "exited again",
            "retry_in_s": 2.0,
        }
    ]


def test_the_circuit_opens_with_the_reason_then_lets_one_trial_through() -> None:
    opened: list[str] = []
    c = circuit(opened)
    for i in range(4):
        c.failed("m", f"failure {i}", i * S)
    assert opened == ["m"]
    with pytest.raises(CircuitOpenError, match=r"failed 4 times in a row \(last: failure 3\)") as e:
        c.wait_ns("m", 3 * S)
    assert e.value.retry_after_s == 30
    assert e.value.code == "model_failing"
    assert c.state("m", 32 * S) == "open"
    assert c.wait_ns("m", 33 * S) == 0  # cool-down over: half-open, the next load is the trial
    assert c.state("m", 33 * S) == "half_open"
    c.failed("m", "trial failed", 34 * S)  # the trial failed: open again, for twice as long
    with pytest.raises(CircuitOpenError) as e:
        c.wait_ns("m", 34 * S)
    assert e.value.retry_after_s == 60
    assert opened == ["m", "m"]
    assert c.wait_ns("other", 34 * S) == 0  # per model


def test_success_closes_it_and_backoff_is_capped() -> None:
    c = circuit()
    for i in range(12):
        c.failed("m", "x", i * S)
    with pytest.raises(CircuitOpenError) as e:
        c.wait_ns("m", 11 * S)
    assert e.value.retry_after_s == 100  # capped at failure_backoff_max_s
    c.succeeded("m")
    assert not c.failing
    assert c.wait_ns("m", 11 * S) == 0
    assert c.rows(11 * S) == []


# ---- the upstream watch --------------------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handle: Handler) -> AsyncIterator[int]:
    """A loopback server running `handle` per connection; every connection closed after."""
    tasks: list[tuple[asyncio.Task[Any], asyncio.StreamWriter]] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append((task, writer))
        with contextlib.suppress(
            asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError
        ):
            await handle(reader, writer)

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task, writer in tasks:
            task.cancel()
            writer.close()
        await asyncio.gather(*(t for t, _ in tasks), return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def silent_server(answer_after_s: float | None = None) -> AsyncIterator[int]:
    """A server that reads a request and answers (a stream of 2 chunks) after a delay, or never."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer_after_s is None:
            await asyncio.sleep(60)
        await asyncio.sleep(answer_after_s or 0)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
        await writer.drain()
        await asyncio.sleep(60)  # then silence between chunks

    async with serving(handle) as port:
        yield port


def watched(port: int, timeouts: UpstreamTimeouts, busy: bool) -> tuple[RunnerClient, list[str]]:
    client = RunnerClient("127.0.0.1", port)
    ticks = itertools.count()
    fired: list[str] = []
    # A runner that works (its marker changes on every look) or does nothing.
    watch = UpstreamWatch(
        timeouts, (lambda: (next(ticks),)) if busy else (lambda: (0,)), "m", fired.append
    )
    client.on_busy = watch.busy
    return client, fired


async def test_a_silent_idle_runner_stalls_within_the_bound() -> None:
    async with silent_server() as port:
        client, fired = watched(port, UpstreamTimeouts(stall_s=0.3, chunk_s=0), busy=False)
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"did no work for 0\.3 s before the first byte"):
            await client.post("/v1/chat/completions", b"{}")
        assert 0.3 <= time.monotonic() - start < 2
        assert len(fired) == 1
        await client.aclose()


async def test_a_busy_runner_is_not_cut_short_before_its_first_byte() -> None:
    # A long prefill: nothing sent for 1 s, but the runner works all along.
    async with silent_server(answer_after_s=1.0) as port:
        client, fired = watched(port, UpstreamTimeouts(stall_s=0.3, chunk_s=0), busy=True)
        stream = await client.stream("POST", "/v1/chat/completions", body=b"{}")
        chunks = stream.aiter_bytes()
        assert await chunks.__anext__() == b"ab"
        assert fired == []
        await stream.aclose()
        await client.aclose()


async def test_the_chunk_limit_holds_even_for_a_busy_runner() -> None:
    async with silent_server(answer_after_s=0.0) as port:
        client, fired = watched(port, UpstreamTimeouts(stall_s=0, chunk_s=0.4), busy=True)
        stream = await client.stream("POST", "/v1/chat/completions", body=b"{}")
        chunks = stream.aiter_bytes()
        assert await chunks.__anext__() == b"ab"
        with pytest.raises(TransportError, match=r"sent nothing for 0\.4 s between two chunks"):
            await chunks.__anext__()
        assert fired
        await client.aclose()


async def test_a_stalled_request_is_never_resent() -> None:
    # A timed-out request on a reused connection must not be retried as a stale keep-alive.
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:
            await reader.readuntil(b"\r\n\r\n")
            requests += 1
            if requests == 1:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
            else:
                await asyncio.sleep(60)

    async with serving(handle) as port:
        client, _ = watched(port, UpstreamTimeouts(stall_s=0.2, chunk_s=0), busy=False)
        assert (await client.get("/health")).content == b"ok"
        with pytest.raises(UpstreamTimeout):
            await client.post("/v1/completions", b"{}")  # on the kept-alive connection
        assert requests == 2
        await client.aclose()


def test_progress_covers_the_process_tree() -> None:
    import os

    mine = tree_progress(os.getpid())
    assert len(mine) == 4
    assert mine[0] > 0
    sum(range(3_000_000))  # CPU work changes it
    assert tree_progress(os.getpid()) != mine
    assert tree_progress(None) == ()
