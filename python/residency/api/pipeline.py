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
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from residency.api._types import LeaseLike
from residency.api.errors import ApiError, api_error
from residency.api.metrics import RequestRecord
from residency.api.proxy import LeasedStream, json_response, now_ns, read_body, until_disconnected
from residency.api.state import ApiState, DirectEndpoint, api_state, check_keep_alive, direct
from residency.runners.protocol import Body, Embeddings, Event, EventStream

__all__ = ["Call", "Upstream", "endpoint", "shaped_embeddings"]

T = TypeVar("T")
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
        return await read_body(self.request)

    def admit(
        self, model: str, keep_alive: KeepAlive, options: Options = None, *, stream: bool = False
    ) -> int | None:
        """Notes (and records) the model asked for, with its keep-alive and load options;
        rejects a bad keep_alive before anything is queued. Returns keep_alive in ns."""
        self.model, self.keep_alive, self.options = model, keep_alive, options
        self.rec.model = model
        self.rec.stream = stream
        return check_keep_alive(keep_alive)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[LeaseLike]:
        """The admitted model, held (and recorded) for the block."""
        async with self.state.scheduler.session(
            self.model, keep_alive=self.keep_alive, options=self.options
        ) as lease:
            self.rec.took(lease)
            yield lease

    async def until_disconnected(self, work: Awaitable[T]) -> T:
        """`work`, cancelled (its lease released) if the client goes away first."""
        return await until_disconnected(self.request, work)

    async def complete(self, path: str, body: Callable[[LeaseLike], Body]) -> bytes:
        """One unstreamed runner call inside a lease; the runner's JSON answer."""

        async def work() -> bytes:
            async with self.lease() as lease:
                return await lease.api.complete(path, body(lease))

        return await self.until_disconnected(work())

    async def open_stream(self, path: str, body: Callable[[LeaseLike], Body]) -> Upstream:
        """A lease and the runner's stream, opened up to its first event. The caller closes it
        (a :meth:`respond_stream` does); not wrapped in :meth:`until_disconnected`."""
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
        except BaseException:
            await stack.aclose()
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

        return await self.until_disconnected(work())

    def respond(self, data: Any) -> Response:
        """A JSON answer; the record finishes once it is sent."""
        return json_response(data, record=self.rec)

    def respond_stream(
        self,
        upstream: Upstream,
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
