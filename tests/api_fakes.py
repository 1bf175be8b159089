"""Test doubles for the HTTP facade: a scheduler that satisfies the contract, and a runner that
speaks the OpenAI API, served by uvicorn on a loopback port inside the test's event loop (no
process; the facade reaches it with its real runner client over a real socket).

Only the facade's unit tests use these; the end-to-end tests run the real scheduler and runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from residency.api import create_app
from residency.config import Settings
from residency.errors import ModelNotFoundError
from residency.metrics import ResidencyMetrics
from residency.runners.http import RunnerClient
from residency.runners.protocol import RunnerApi

RUNNER_MODEL = "runner-internal-name"


@dataclass
class FakeEntry:
    name: str
    path: Path = Path("/models/fake.gguf")
    size_bytes: int = 1234
    modified_at: datetime = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    digest: str = "ab" * 32
    runner: str = "fake"
    details: Mapping[str, Any] = field(
        default_factory=lambda: {
            "format": "unknown",
            "family": "gemma3",
            "families": ["gemma3"],
            "parameter_size": "270M",
            "quantization_level": "Q4_K_M",
            "context_length": 32768,  # registry extras that must not leak into Ollama's shape
        }
    )
    options: Mapping[str, Any] = field(default_factory=lambda: {"ctx": 2048, "gpu_layers": "auto"})


@dataclass
class FakeLease:
    model: str
    entry: FakeEntry
    client: RunnerClient
    cold: bool
    load_duration_ns: int
    queue_duration_ns: int

    runner: FakeRunner | None = None
    #: (tokens, ns) of each finished generation, as the slowdown detector would get them.
    decodes: list[tuple[int, int]] = field(default_factory=list)

    def decoded(self, tokens: int, ns: int) -> None:
        self.decodes.append((tokens, ns))

    @property
    def api(self) -> RunnerApi:
        return RunnerApi(self.client, name=self.entry.name, output_tail=self.output_tail)

    def output_tail(self) -> str:
        return "\n".join(self.runner.output if self.runner else ["fake runner: last words"])


@dataclass
class FakeResident:
    name: str
    entry: FakeEntry
    device: str = "cuda:0"
    state: str = "ready"
    bytes: int = 500_000_000
    estimated_bytes: int = 450_000_000
    measured_bytes: int | None = 480_000_000
    size_vram: int = 500_000_000
    expires_at: datetime | None = None
    context_length: int = 2048
    refcount: int = 0
    warm_bytes: int | None = 200_000_000
    size: int = 500_000_000
    placement: Any = None
    decode_speed: Any = None
    keep_alive_ns: int | None = 300_000_000_000
    keep_alive_origin: Any = None


@dataclass
class FakeWarmFile:
    name: str
    warm_bytes: int
    kept: bool = True


@dataclass
class FakeHostTier:
    budget_bytes: int = 16_000_000_000
    kept_bytes: int = 0
    files: list[FakeWarmFile] = field(default_factory=list)


@dataclass
class FakeDeviceUsage:
    id: str = "cuda:0"
    total_bytes: int = 8_000_000_000
    budget_bytes: int = 7_500_000_000
    reserved_bytes: int = 500_000_000


@dataclass
class FakeRunner:
    """Answers /v1/chat/completions, /v1/completions and /v1/embeddings like llama-cpp-python."""

    tokens: Sequence[str] = ("Hel", "lo", " world")
    #: Thinking streamed before the tokens (chat only), as llama-server's reasoning_content.
    reasoning: Sequence[str] = ()
    finish_reason: str = "stop"
    token_delay_s: float = 0.0
    #: Extra fields on the last stream event (usage, timings) as llama-server sends them.
    final_extra: Mapping[str, Any] = field(default_factory=dict)
    #: (status, body) to answer every request with, instead of a completion.
    error: tuple[int, Any] | None = None
    #: Refuse connections (nothing listens on the runner's port).
    unreachable: bool = False
    #: Embeddings per token (llama-cpp-python with a model that has no pooling layer).
    per_token_embeddings: bool = False
    #: End the stream (without [DONE]) after this many tokens, printing this traceback line.
    cut_after: int | None = None
    cut_line: str = "ValueError: Requested tokens (3003) exceed context window of 1024"
    #: (status, body) to answer unstreamed completions with: llama-cpp-python refuses an over-long
    #: prompt so when unstreamed, but answers a stream 200 and cuts it short (see `cut_after`).
    unstreamed_error: tuple[int, Any] | None = None
    #: Break the stream with an error event after this many tokens.
    fail_after: int | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Texts counted on the tokenizer endpoint, and chats asked unstreamed for one token (how
    #: residency counts a rendered prompt): not in `requests`.
    counted: list[Any] = field(default_factory=list)
    output: list[str] = field(default_factory=lambda: ["fake runner: last words"])
    closed_streams: int = 0
    tokens_sent: int = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        path = request.url.path
        if path == "/extras/tokenize/count":  # llama-cpp-python's tokenizer: one token a word
            self.counted.append(body["input"])
            return httpx.Response(200, json={"count": len(body["input"].split())})
        if (
            path == "/v1/chat/completions"
            and body.get("max_tokens") == 1
            and not body.get("stream")
        ):
            # residency asking how many tokens a chat's rendered prompt has (dialect.prompt_tokens)
            self.counted.append(body)
        else:
            self.requests.append((request.url.path, body))
        if self.error is not None:
            status, payload = self.error
            return httpx.Response(status, json=payload)
        if path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [
                {"object": "embedding", "index": i, "embedding": [3.0, 4.0, 0.0 + i]}
                for i in range(len(inputs))
            ]
            if self.per_token_embeddings:  # two tokens each, whose mean is the vector above
                for d in data:
                    v = d["embedding"]
                    d["embedding"] = [[x - 1 for x in v], [x + 1 for x in v]]
            return httpx.Response(
                200,
                json={
                    "object": "list",
                    "model": RUNNER_MODEL,
                    "data": data,
                    "usage": {"prompt_tokens": 7, "total_tokens": 7},
                },
            )
        chat = path == "/v1/chat/completions"
        if body.get("stream"):
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=self._stream(chat),
            )
        if self.unstreamed_error is not None:
            status, payload = self.unstreamed_error
            return httpx.Response(status, json=payload)
        text = "".join(self.tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return httpx.Response(
            200,
            json={
                "id": "cmpl-1",
                "object": "chat.completion" if chat else "text_completion",
                "created": 1,
                "model": RUNNER_MODEL,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": len(self.tokens),
                    "total_tokens": 5 + len(self.tokens),
                },
            },
        )

    async def _stream(self, chat: bool) -> AsyncIterator[bytes]:
        try:
            for thought in self.reasoning if chat else ():
                chunk = _chunk(chat, "", None)
                chunk["choices"][0]["delta"] = {"reasoning_content": thought}
                yield _sse(chunk)
            for i, token in enumerate(self.tokens):
                if self.cut_after is not None and i == self.cut_after:
                    self.output.append(self.cut_line)
                    return
                if self.fail_after is not None and i == self.fail_after:
                    yield _sse({"error": {"message": "runner exploded", "type": "server_error"}})
                    return
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                self.tokens_sent += 1
                yield _sse(_chunk(chat, token, None))
            yield _sse({**_chunk(chat, "", self.finish_reason), **self.final_extra})
            # sse-starlette (llama-cpp-python) separates events with CRLF
            yield b"data: [DONE]\r\n\r\n"
        finally:
            self.closed_streams += 1

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """:meth:`handle` as an ASGI app. A client that goes away mid-stream stops the stream,
        as sse-starlette (llama-cpp-python's) does."""
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = httpx.Request(
            scope["method"],
            "http://runner" + scope["path"],
            content=body,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
        )
        response = await self.handle(request)
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        ]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )

        async def pump() -> None:
            stream = response.stream
            assert isinstance(stream, httpx.AsyncByteStream)
            try:
                async for chunk in stream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await stream.aclose()

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)


@contextlib.asynccontextmanager
async def served_runner(runner: FakeRunner) -> AsyncIterator[RunnerClient]:
    """`runner` on a loopback port (uvicorn, as llama-cpp-python), and a client for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if runner.unreachable:
        sock.close()  # the port stays unbound: connections are refused
        client = RunnerClient("127.0.0.1", port)
        yield client
        await client.aclose()
        return
    config = uvicorn.Config(
        runner.asgi, lifespan="off", log_level="warning", loop="none", interface="asgi3"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.001)
    client = RunnerClient("127.0.0.1", port)
    try:
        yield client
    finally:
        await client.aclose()
        server.should_exit = True
        await task
        sock.close()


def _chunk(chat: bool, token: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": token} if token else {}
    else:
        choice["text"] = token
    return {
        "id": "cmpl-1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 1,
        "model": RUNNER_MODEL,
        "choices": [choice],
    }


def _sse(event: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\r\n\r\n"


class FakeScheduler:
    """The scheduler contract with no processes: one fake runner serves every model."""

    def __init__(self, runner: FakeRunner, names: Sequence[str] = ("gemma3:270m",)) -> None:
        self.runner = runner
        self.entries = {n: FakeEntry(n) for n in names}
        self._served = served_runner(runner)
        self.client: RunnerClient | None = None
        self.loaded: set[str] = set()
        self.sessions: list[dict[str, Any]] = []
        self.unloaded: list[str] = []
        self.refcount = 0
        self.fail_with: BaseException | None = None
        #: Seconds session() waits before handing out the lease (a queue or a load).
        self.acquire_delay_s = 0.0
        self.started = False
        self.stopped = False
        self.expires_at: datetime | None = datetime.now(timezone.utc) + timedelta(minutes=5)
        #: The host page cache's tier (None: left to the kernel, as with host_cache_bytes 0).
        self.tier: FakeHostTier | None = None
        self.metrics = ResidencyMetrics()
        self.metrics.source = self

    async def start(self) -> None:
        self.client = await self._served.__aenter__()
        self.started = True

    async def stop(self) -> None:
        self.stopped = True
        await self._served.__aexit__(None, None, None)

    def resolve(self, name: str) -> FakeEntry:
        entry = self.entries.get(name.removesuffix(":latest"))
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} not found")
        return entry

    def models(self) -> list[FakeEntry]:
        return list(self.entries.values())

    def resident(self) -> list[FakeResident]:
        return [
            FakeResident(
                name=n,
                entry=self.entries[n],
                refcount=self.refcount,
                expires_at=self.expires_at,
            )
            for n in sorted(self.loaded)
        ]

    def device_usage(self) -> list[tuple[FakeDeviceUsage, int | None]]:
        return [(FakeDeviceUsage(), 7_000_000_000)]

    def failing(self) -> list[dict[str, Any]]:
        return []

    def host_tier(self) -> FakeHostTier | None:
        return self.tier

    async def unload(self, model: str) -> None:
        name = self.resolve(model).name
        self.unloaded.append(name)
        self.loaded.discard(name)

    @asynccontextmanager
    async def session(
        self,
        model: str,
        *,
        keep_alive: str | float | None = None,
        options: Mapping[str, Any] | None = None,
        client: Any = None,
    ) -> AsyncIterator[FakeLease]:
        entry = self.resolve(model)
        record: dict[str, Any] = {
            "model": model,
            "keep_alive": keep_alive,
            "options": dict(options or {}),
            "released": False,
        }
        self.sessions.append(record)
        if self.acquire_delay_s:
            await asyncio.sleep(self.acquire_delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        cold = entry.name not in self.loaded
        self.loaded.add(entry.name)
        self.refcount += 1
        assert self.client is not None, "start() the scheduler first"
        try:
            lease = FakeLease(
                model=model,
                entry=entry,
                client=self.client,
                cold=cold,
                load_duration_ns=1_500_000_000 if cold else 0,
                queue_duration_ns=1000,
                runner=self.runner,
            )
            record["lease"] = lease
            yield lease
        finally:
            self.refcount -= 1
            record["released"] = True


@dataclass
class Served:
    client: httpx.AsyncClient
    sched: FakeScheduler
    runner: FakeRunner
    app: Any


@asynccontextmanager
async def serving(
    runner: FakeRunner | None = None,
    names: Sequence[str] = ("gemma3:270m",),
    settings: Settings | None = None,
) -> AsyncIterator[Served]:
    """The app over a FakeScheduler, lifespan run, and an httpx client bound to it in-process."""
    runner = runner or FakeRunner()
    sched = FakeScheduler(runner, names)
    app = create_app(settings or Settings(), scheduler=sched)
    async with app.router.lifespan_context(app):
        assert sched.started
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield Served(client, sched, runner, app)
    assert sched.stopped


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sse(text: str) -> list[Any]:
    """The data payloads of an SSE body; "[DONE]" stays a string."""
    out: list[Any] = []
    for raw in text.split("\n\n"):
        block = raw.strip()
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
