"""Requests at a runner at once (runners/protocol.py; the server allows its parallel slots and as
many more ready to start): requests beyond the limit wait in residency, in arrival order, as at
Ollama's per-runner semaphore, instead of piling up as connections on the runner's small listen
backlog. One request's calls share its place, so its follow-up call (counting its prompt after its
stream) never waits behind others. Against a runner on a real socket that holds each stream open
until the test lets it finish, and counts the connections it serves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from residency.config import load_settings
from residency.runners.http import RunnerClient
from residency.runners.protocol import RunnerApi, RunnerRejected
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, fake_model

pytestmark = pytest.mark.timeout(20)

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Runner:
    """Streams one event, then waits for `finish` before [DONE]; a refusal for prompt "bad"."""

    finish: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    most_active: int = 0
    #: The order requests reached the runner (their prompt text).
    order: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            while True:  # keep-alive: several requests per connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                prompt = body.split(b'"content":"')[1].split(b'"')[0].decode()
                self.order.append(prompt)
                if prompt == "bad":
                    err = b'{"error": "refused"}'
                    writer.write(
                        b"HTTP/1.1 400 X\r\ncontent-length: %d\r\n\r\n%s" % (len(err), err)
                    )
                elif b'"stream":false' in body:
                    ok = b'{"usage": {"prompt_tokens": 3}}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(ok), ok))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n" + _chunk(EVENT))  # fmt: skip
                    await writer.drain()
                    await self.finish.wait()
                    writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
        finally:
            self.active -= 1
            writer.close()


@asynccontextmanager
async def runner(in_flight: int) -> AsyncIterator[tuple[RunnerApi, Runner]]:
    fake = Runner()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    client = RunnerClient("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        yield RunnerApi(client, name="m", in_flight=in_flight), fake
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


def asking(prompt: str) -> dict[str, object]:
    return {**BODY, "messages": [{"role": "user", "content": prompt}]}


async def read_to_end(api: RunnerApi, prompt: str) -> int:
    stream = await api.stream("/v1/chat/completions", asking(prompt))
    try:
        return len([event async for event in stream])
    finally:
        await stream.aclose()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_requests_beyond_the_limit_wait_their_turn_in_arrival_order() -> None:
    async with runner(in_flight=2) as (api, fake):
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(read_to_end(api, f"r{i}")))
            await asyncio.sleep(0.01)  # arrival order is creation order
        await settle()
        assert fake.order == ["r0", "r1"]  # two at once: two requests reached the runner
        fake.finish.set()
        assert await asyncio.gather(*tasks) == [1] * 6
        assert fake.order == [f"r{i}" for i in range(6)]
        assert fake.most_active <= 2


async def test_a_stream_gives_its_slot_back_at_its_end_before_it_is_closed() -> None:
    async with runner(in_flight=1) as (api, fake):
        fake.finish.set()
        first = await api.stream("/v1/chat/completions", asking("a"))
        assert len([event async for event in first]) == 1
        # Read to [DONE] but not yet closed: the runner is done with it, the next may go.
        assert await asyncio.wait_for(read_to_end(api, "b"), 5) == 1
        await first.aclose()


async def test_a_requests_follow_up_call_shares_its_slot_and_never_waits_behind_others() -> None:
    async with runner(in_flight=1) as (base, fake):
        fake.finish.set()
        mine = base.for_request()
        stream = await mine.stream("/v1/chat/completions", asking("mine"))
        unstreamed = asking("other") | {"stream": False}
        other = asyncio.create_task(base.for_request().complete("/v1/chat/completions", unstreamed))
        assert [e async for e in stream]
        await stream.aclose()
        await settle()
        assert not other.done()  # the slot is still this request's: its lease is not released
        # Its follow-up (the prompt count) goes at once, though another request waits.
        count = await asyncio.wait_for(
            mine.complete("/v1/chat/completions", asking("count") | {"stream": False}), 5
        )
        assert b"prompt_tokens" in count
        mine.give_back_place()
        assert b"prompt_tokens" in await asyncio.wait_for(other, 5)
        assert fake.order == ["mine", "count", "other"]


async def test_a_refused_request_and_a_cancelled_waiter_leave_no_slot_taken() -> None:
    async with runner(in_flight=1) as (api, fake):
        with pytest.raises(RunnerRejected):
            await api.stream("/v1/chat/completions", asking("bad"))
        holder = asyncio.create_task(read_to_end(api, "holder"))
        await settle()
        waiter = asyncio.create_task(read_to_end(api, "gives up"))
        await settle()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        fake.finish.set()
        assert await holder == 1
        assert await asyncio.wait_for(read_to_end(api, "next"), 5) == 1
        assert fake.order == ["bad", "holder", "next"]


async def test_no_limit_given_means_none() -> None:
    async with runner(in_flight=0) as (api, fake):
        tasks = [asyncio.create_task(read_to_end(api, f"r{i}")) for i in range(4)]
        await settle()
        assert sorted(fake.order) == ["r0", "r1", "r2", "r3"]
        fake.finish.set()
        await asyncio.gather(*tasks)
        assert fake.most_active == 4


async def test_sessions_give_their_place_back_and_a_released_lease_holds_none(
    tmp_path: Path,
) -> None:
    # A real scheduler and fake runner (parallel 1: two places). Sessions one after another, and
    # calls on a lease after its session ended (Scheduler.load's), never leave a place taken.
    settings = load_settings(
        models=[fake_model("a", tmp_path)], memory_limit=250 * MIB, probe="host",
        stop_timeout_s=2.0,
    )  # fmt: skip
    s = Scheduler(settings)
    await s.start()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    try:
        for _ in range(4):
            async with s.session("a") as lease:
                answer = await asyncio.wait_for(
                    lease.api.generate("/v1/chat/completions", body), 10
                )
                assert answer.answer()["choices"][0]["message"]["content"].strip() == "reply from a"
        released = await s.load("a")
        for _ in range(4):
            await asyncio.wait_for(released.api.generate("/v1/chat/completions", body), 10)
        free = released.runner.api._places
        assert free is not None
        assert free._value == 2  # both places free: none leaked
    finally:
        await s.stop()
