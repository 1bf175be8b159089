"""The one request pipeline both APIs share: record, lease, call the runner, translate, finish.

An endpoint written with :func:`endpoint` receives a :class:`Call` and only translates: its
request into the runner's, the runner's answer or events into its API's shape. Everything else —
the request's record (log line and metrics), holding the lease for exactly as long as the runner
is used, cancelling the work when the client goes away, turning errors into statuses and into a
stream's last line — is written here once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from residency.api._types import LeaseLike
from residency.api.errors import ApiError, api_error
from residency.api.limits import (
    check_keep_alive,
    check_model_name,
    check_work,
    parse_body,
    read_body,
)
from residency.api.metrics import RequestRecord
from residency.api.proxy import LeasedStream, json_response, now_ns, until_disconnected
from residency.api.security import SCOPE_KEY, ApiKey, keep_alive_client
from residency.api.state import ApiState, DirectEndpoint, api_state, direct
from residency.runners.protocol import (
    Assembly,
    Body,
    Embeddings,
    Event,
    EventStream,
    RunnerUnreachable,
)

__all__ = ["Call", "Upstream", "endpoint", "shaped_embeddings"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
KeepAlive = str | float | None
Options = Mapping[str, Any] | None


class Upstream:
    """A runner's event stream inside its lease; closing it closes both."""

    __slots__ = ("_stack", "events", "lease", "t_sent")

    def __init__(
        self, stack: AsyncExitStack, lease: LeaseLike, events: EventStream, t_sent: int
    ) -> None:
        self._stack = stack
        self.lease = lease
        self.events = events
        #: When the request went to the runner (perf ns): where Ollama's timings start.
        self.t_sent = t_sent

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events.__aiter__()

    async def aclose(self) -> None:
        await self._stack.aclose()


class Closable(Protocol):
    """What a stream closes at its end: an Upstream, or one still opening (api.progress)."""

    async def aclose(self) -> None: ...


class Call:
    """One request on its way through the pipeline."""

    __slots__ = ("keep_alive", "model", "options", "rec", "request", "state")

    def __init__(self, request: Request, state: ApiState, rec: RequestRecord) -> None:
        self.request = request
        self.state = state
        self.rec = rec
        #: What the request asks the scheduler for (set by :meth:`admit`).
        self.model = ""
        self.keep_alive: KeepAlive = None
        self.options: Options = None

    async def body(self) -> bytes:
        """The request's body, bounded in size and in time (see limits.read_body)."""
        return await read_body(self.request, self.state.settings)

    async def parse(self, model: type[M], body: bytes | None = None) -> M:
        """The body (read if not given) validated as `model`, off the loop when large."""
        raw = body if body is not None else await self.body()
        return parse_body(model, raw, self.state.settings)

    def admit(
        self,
        model: str,
        keep_alive: KeepAlive,
        options: Options = None,
        *,
        stream: bool = False,
        work: Mapping[str, Any] | None = None,
    ) -> int | None:
        """Notes (and records) the model asked for, with its keep-alive and load options, after
        checking everything that can be checked before queueing: the name, the caller's key,
        keep_alive, and the request's size (`work`: limits.check_work's keywords). Returns
        keep_alive in ns."""
        check_model_name(model)
        self.rec.model = model
        self.rec.stream = stream
        key: ApiKey | None = self.request.scope.get(SCOPE_KEY)
        if key is not None:
            self.rec.key = key.name
        limits = dict(work or {})
        limits.setdefault("options", options)
        context_length = None
        if (key is not None and key.models is not None) or _wants_ctx(limits):
            entry = self.state.scheduler.resolve(model)
            if key is not None and not key.allows(entry.name):
                raise ApiError(403, f"key {key.name!r} may not use model {entry.name!r}")
            context_length = entry.details.get("context_length")
        check_work(self.state.settings, context_length=context_length, **limits)
        keep_alive, ns = check_keep_alive(keep_alive)
        self.model, self.keep_alive, self.options = model, keep_alive, options
        return ns

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[LeaseLike]:
        """The admitted model, held (and recorded) for the block."""
        client = keep_alive_client(self.request.scope)  # whose keep_alive, under which rule
        async with self.state.scheduler.session(
            self.model, keep_alive=self.keep_alive, options=self.options, client=client
        ) as lease:
            self.rec.took(lease)
            yield lease

    async def until_disconnected(self, work: Awaitable[T]) -> T:
        """`work`, cancelled (its lease released) if the client goes away first."""
        return await until_disconnected(self.request, work)

    async def generate(
        self,
        path: str,
        body: Callable[[LeaseLike], Mapping[str, Any]],
        finish: Callable[[LeaseLike, Assembly], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """One generation answered whole, inside a lease: the runner streams it (so it stops
        when the client goes away: see runners.assemble) and the answer is assembled here.
        `finish` runs inside the lease (e.g. to count usage the runner did not report)."""

        async def work() -> dict[str, Any]:
            async with self.lease() as lease:
                assembly = await lease.api.generate(path, body(lease))
                if assembly.first_at is not None:
                    self.rec.first_event(assembly.first_at)
                if finish is not None:
                    await finish(lease, assembly)
                return assembly.answer()

        return await self.until_disconnected(_once_more_if_unreachable(work))

    async def open_stream(self, path: str, body: Callable[[LeaseLike], Body]) -> Upstream:
        """A lease and the runner's stream, opened up to its first event. The caller closes it
        (a :meth:`respond_stream` does); not wrapped in :meth:`until_disconnected`."""
        return await _once_more_if_unreachable(lambda: self._open_stream(path, body))

    async def _open_stream(self, path: str, body: Callable[[LeaseLike], Body]) -> Upstream:
        stack = AsyncExitStack()
        try:
            lease = await stack.enter_async_context(self.lease())
            sent = body(lease)
            t_sent = now_ns()
            events = await lease.api.stream(path, sent)
            stack.push_async_callback(events.aclose)
            if events.first_at is not None:
                self.rec.first_event(events.first_at)
            return Upstream(stack, lease, events, t_sent)
        except BaseException as err:
            # The lease sees the error (a runner that dropped the request unanswered is failed).
            await stack.__aexit__(type(err), err, err.__traceback__)
            raise

    async def load(self) -> int:
        """Only loads the model (a lease, released at once); its load_duration ns."""

        async def work() -> int:
            async with self.lease() as lease:
                return lease.load_duration_ns

        return await self.until_disconnected(work())

    async def embed(self, body: Callable[[LeaseLike], Body]) -> tuple[Embeddings, int]:
        """(the runner's embeddings, load_duration ns)."""

        async def work() -> tuple[Embeddings, int]:
            async with self.lease() as lease:
                return await lease.api.embed(body(lease)), lease.load_duration_ns

        return await self.until_disconnected(_once_more_if_unreachable(work))

    def respond(self, data: Any) -> Response:
        """A JSON answer; the record finishes once it is sent."""
        return json_response(data, record=self.rec)

    def respond_stream(
        self,
        upstream: Upstream | Closable,
        chunks: AsyncIterator[bytes],
        *,
        error_chunk: Callable[[ApiError], bytes],
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Streams `chunks` (the translation of `upstream`) holding the lease until the end.

        The status is sent with the first chunk; an error after that becomes the stream's last
        chunk (`error_chunk`), as both APIs' clients expect.
        """
        rec = self.rec

        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as err:
                e = api_error(err)
                rec.error = e.message
                yield error_chunk(e)

        async def cleanup(error: BaseException | None) -> None:
            try:
                await upstream.aclose()
            finally:
                rec.end_stream(error)

        return LeasedStream(guarded(), cleanup=cleanup, media_type=media_type, headers=headers)


async def _once_more_if_unreachable(work: Callable[[], Awaitable[T]]) -> T:
    """`work`, and once more if its runner's port refused it: the runner died before it saw the
    request (the scheduler has failed it), so a fresh one serves it instead of a 502."""
    try:
        return await work()
    except RunnerUnreachable:
        return await work()


def _wants_ctx(limits: Mapping[str, Any]) -> bool:
    """Whether the request sets num_ctx (checked against the model's context length)."""
    return "num_ctx" in (limits.get("options") or {}) or "num_ctx" in (limits.get("body") or {})


Handler = Callable[[Call], Awaitable[Response]]


def endpoint(api: str, path: str) -> Callable[[Handler], DirectEndpoint]:
    """Makes `handler` a route endpoint whose request is recorded, and whose failure before an
    answer is recorded with its status. The endpoint is a direct one (see ``state.direct``)."""

    def wrap(handler: Handler) -> DirectEndpoint:
        async def run(request: Request) -> Response:
            state = api_state(request)
            rec = state.record(api, path)
            try:
                return await handler(Call(request, state, rec))
            except BaseException as err:
                rec.fail(err)
                raise

        # Not functools.wraps: FastAPI reads the signature, which must stay (request: Request).
        run.__name__ = handler.__name__
        run.__qualname__ = handler.__qualname__
        run.__doc__ = handler.__doc__
        return direct(run)

    return wrap


def shaped_embeddings(
    vectors: Sequence[list[float]], dimensions: int | None, *, normalise: bool
) -> list[list[float]]:
    """Vectors cut to `dimensions` (when longer), and L2-normalised: all of them if `normalise`
    (Ollama's /api/embed), else only those that were cut (OpenAI's ``dimensions``)."""
    out: list[list[float]] = []
    for vector in vectors:
        cut = bool(dimensions) and len(vector) > (dimensions or 0)
        if not (normalise or cut):
            out.append(vector)
            continue
        v = np.asarray(vector[:dimensions] if cut else vector, dtype=np.float64)
        norm = float(np.linalg.norm(v))
        out.append((v / norm if norm else v).tolist())
    return out
