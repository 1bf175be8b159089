"""The runner protocol: what residency asks a runner and how it reads the answer.

Every runner kind serves the OpenAI API on loopback. :class:`RunnerApi` is the one client of that
protocol: it completes, streams and embeds, and turns every failure into one of two errors,
decided from the runner's HTTP answer alone (never from its log output):

- :class:`RunnerRejected` — the runner refused the request (a 4xx: the prompt exceeds the context,
  a bad field). The client's mistake: HTTP 400 with the runner's own message.
- :class:`RunnerFailed` — the runner broke (a 5xx, a connection lost, a stream cut short, an
  answer that is not JSON). HTTP 502; the message carries the runner's last output lines for the
  person reading it. :class:`RunnerTimedOut` — it stopped answering (runners.upstream): HTTP 504.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json, to_json

from residency.errors import ResidencyError, RunnerError
from residency.runners.assemble import Assembly, generate_streamed
from residency.runners.http import (
    RunnerClient,
    StreamResponse,
    TransportError,
    Unanswered,
    UpstreamTimeout,
)
from residency.runners.places import Place

__all__ = [
    "Assembly",
    "Body",
    "Embeddings",
    "Event",
    "EventStream",
    "RunnerApi",
    "RunnerFailed",
    "RunnerRejected",
    "RunnerTimedOut",
    "RunnerUnreachable",
    "runner_message",
]

Body = Mapping[str, Any] | bytes
"""A runner request's JSON body: a mapping, or bytes already encoded (a client's, passed on)."""

Event = tuple[dict[str, Any], int]
"""One streamed event's JSON payload and its arrival time (perf_counter ns)."""

#: Called with (path, body) just before a request body is sent to the runner: the one place a
#: runner kind can prepare itself for a request (e.g. restore a saved KV slot). It may return a
#: body to send instead (e.g. pinned to the restored slot); None sends the body unchanged.
BeforeSend = Callable[[str, Body], Awaitable[Body | None]]

_JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
_SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class RunnerRejected(ResidencyError):
    """The runner refused the request as invalid (HTTP 400 with the runner's message)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RunnerFailed(RunnerError):
    """The runner failed to answer: it crashed, broke off, or answered 5xx (HTTP 502)."""


class RunnerTimedOut(RunnerFailed):
    """The runner stopped answering the request (HTTP 504); the scheduler replaces it."""


class RunnerUnreachable(RunnerFailed):
    """The runner refused or dropped the request without a byte of answer: when it turns out
    dead, the request goes to a fresh runner instead."""


def runner_message(status: int, content: bytes) -> str:
    """The runner's own error message from whichever shape it used."""
    try:
        data = from_json(content)
    except ValueError:
        return content.decode(errors="replace").strip()[:2000] or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        detail = data.get("detail")
        if isinstance(detail, list):  # FastAPI validation errors (llama-cpp-python)
            return "; ".join(
                f"{'.'.join(str(x) for x in d.get('loc', ()) if x != 'body')}: {d.get('msg')}"
                for d in detail
                if isinstance(d, dict)
            )
        if detail:
            return str(detail)
    return content.decode(errors="replace").strip()[:2000]


def _encoded(body: Body) -> bytes:
    return body if isinstance(body, bytes) else to_json(body)


@dataclass(frozen=True)
class Embeddings:
    """A runner's embeddings answer: its JSON object, and its vectors in input order (one per
    input: a runner that returns one vector per token has them mean-pooled here)."""

    data: dict[str, Any]
    vectors: list[list[float]]
    prompt_tokens: int | None


def pooled(vector: list[Any]) -> list[float]:
    """One vector per input: the mean of per-token vectors (a model without a pooling layer)."""
    if vector and isinstance(vector[0], list):
        n = len(vector)
        return [sum(col) / n for col in zip(*vector, strict=True)]
    return vector


class RunnerApi:
    """Requests to one runner, in its protocol. Shared by every request the runner serves;
    :meth:`for_request` gives one request its own view, whose calls share one place."""

    def __init__(
        self,
        client: RunnerClient,
        *,
        name: str,
        output_tail: Callable[[], str] = str,
        before_send: BeforeSend | None = None,
        in_flight: int = 0,
    ) -> None:
        self._client = client
        self._name = name
        self._output_tail = output_tail
        #: Per-kind hook run before any body is sent (see BeforeSend); None: nothing to prepare.
        self.before_send = before_send
        #: Requests at the runner at once: more wait here, in arrival order (as at Ollama's
        #: per-runner semaphore), not as connections piled on the runner's listen backlog, where
        #: a small backlog (cpp-httplib's is 5) turns them into SYN retries that back off for
        #: tens of seconds. 0: no limit.
        self._places = asyncio.Semaphore(in_flight) if in_flight > 0 else None
        #: A request's view (for_request): its one place. None: each call takes its own.
        self._hold: Place | None = None

    def for_request(self) -> RunnerApi:
        """This api for one request: its calls share one place at the runner, taken at the first
        and held until :meth:`give_back_place`, so its follow-up calls (counting its prompt after
        its stream) never wait behind other requests."""
        view = copy.copy(self)
        view._hold = Place(self._places)
        return view

    def give_back_place(self) -> None:
        """The request is done with the runner (a request's view; nothing for the runner's own)."""
        if self._hold is not None:
            self._hold.give_back()

    async def _take_place(self) -> Callable[[], None]:
        """Waits for the call's place; returns what gives it back (a request's view keeps its
        place until give_back_place)."""
        if self._hold is not None:
            await self._hold.take()
            return _nothing
        hold = Place(self._places)
        await hold.take()
        return hold.give_back

    # ---- the three calls --------------------------------------------------------------------
    async def complete(self, path: str, body: Body) -> bytes:
        """POSTs `body`; returns the runner's JSON answer's bytes, or raises."""
        done = await self._take_place()
        try:
            if self.before_send is not None:
                body = await self.before_send(path, body) or body
            try:
                resp = await self._client.post(path, _encoded(body), headers=_JSON_HEADERS)
            except TransportError as err:
                raise self.broke(err) from err
        finally:
            done()
        if resp.status >= 400:
            raise self._refusal(resp.status, resp.content)
        return resp.content

    async def stream(self, path: str, body: Body) -> EventStream:
        """Starts a streamed request; returns once its first event arrived (or it ended).

        Waiting for the first event means a runner that fails before producing anything still
        gets a real HTTP error status to the client. The caller must ``aclose()`` the stream.
        """
        done = await self._take_place()
        try:
            return await self._open(path, body, done)
        except BaseException:
            done()
            raise

    async def _open(self, path: str, body: Body, done: Callable[[], None]) -> EventStream:
        if self.before_send is not None:
            body = await self.before_send(path, body) or body
        try:
            resp = await self._client.stream(
                "POST", path, body=_encoded(body), headers=_SSE_HEADERS
            )
        except TransportError as err:
            raise self.broke(err) from err
        if resp.status >= 400:
            try:
                content = await resp.aread()
            except TransportError:
                content = b""
            finally:
                await resp.aclose()
            raise self._refusal(resp.status, content)
        stream = EventStream(self, resp, path, body, done)
        try:
            await stream.start()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def generate(self, path: str, body: Mapping[str, Any]) -> Assembly:
        """One generation (chat or completion) whose client wants the whole answer at once.

        Asked of the runner as a stream and assembled (see runners.assemble): only a streamed
        request is stopped by the runner when its connection closes, so a client that leaves
        (or times out) never leaves the runner generating for nobody.
        """
        return await generate_streamed(self.stream, path, body)

    async def embed(self, body: Body) -> Embeddings:
        """Embeddings for the body's ``input``; vectors in input order, pooled per input."""
        content = await self.complete("/v1/embeddings", body)
        try:
            data = from_json(content)
            rows = sorted(data.get("data") or (), key=lambda d: d.get("index", 0))
            vectors = [pooled(row["embedding"]) for row in rows]
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise self.failed(f"answered embeddings in an unknown shape ({err})") from err
        tokens = (data.get("usage") or {}).get("prompt_tokens")
        return Embeddings(data, vectors, int(tokens) if tokens is not None else None)

    # ---- errors -----------------------------------------------------------------------------
    def failed(self, what: str) -> RunnerFailed:
        return RunnerFailed(f"runner for model {self._name!r} {what}", self._output_tail())

    def broke(self, err: TransportError) -> RunnerFailed:
        """The error for a request whose connection failed (`err`): timed out, or lost."""
        if isinstance(err, UpstreamTimeout):
            return RunnerTimedOut(f"runner for model {self._name!r} {err}", self._output_tail())
        if isinstance(err, Unanswered):
            return RunnerUnreachable(f"runner for model {self._name!r} did not answer ({err})")
        return self.failed(f"failed during the request ({err})")

    def _refusal(self, status: int, content: bytes) -> Exception:
        message = runner_message(status, content)
        if status < 500:
            # The runner found the request itself wrong (context exceeded, bad field).
            return RunnerRejected(message)
        return self.failed(f"failed (HTTP {status}): {message}")

    async def cut_short(self, path: str, body: Body) -> Exception:
        """The error for a stream the runner ended before its first event, without ``[DONE]``.

        Such a stream says nothing about why (llama-cpp-python answers 200, then fails like
        this when the prompt exceeds the context). The runner is asked the same request once
        more, unstreamed and for one token, so its own HTTP answer decides: a 4xx is a refusal,
        anything else a failure.
        """
        try:
            fields = dict(from_json(body) if isinstance(body, bytes) else body)
        except ValueError:
            return self.failed("ended its stream without finishing")
        fields.update(stream=False, max_tokens=1)
        fields.pop("stream_options", None)
        try:
            resp = await self._client.post(path, to_json(fields), headers=_JSON_HEADERS)
        except TransportError as err:
            return self.failed(f"ended its stream without finishing ({err})")
        if resp.status >= 400:
            return self._refusal(resp.status, resp.content)
        return self.failed("ended its stream without finishing")


class EventStream:
    """A runner's server-sent events, as (JSON payload, arrival ns), until ``[DONE]``.

    A stream that ends without ``[DONE]`` raises :class:`RunnerFailed` (or, before its first
    event, whatever :meth:`RunnerApi.cut_short` finds).
    """

    def __init__(
        self,
        api: RunnerApi,
        response: StreamResponse,
        path: str,
        body: Body,
        done: Callable[[], None] | None = None,
    ) -> None:
        self._api = api
        self.response = response
        #: Gives its place at the runner back (at its end or close, whichever is first).
        self._done = done or _nothing
        self._path = path
        self._body = body
        # A request's view holds its place until its lease ends: no wrapper on every event then.
        by_lease = done is None or done is _nothing
        self._events = self._read() if by_lease else self._place_held_until_end(self._read())
        self._first: Event | None = None
        #: When the first event arrived (perf ns); None for a stream that had none.
        self.first_at: int | None = None

    async def start(self) -> None:
        try:
            self._first = await self._events.__anext__()
        except StopAsyncIteration:
            return
        self.first_at = self._first[1]

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for item in self._events:
            yield item

    async def aclose(self) -> None:
        """Closing mid-stream closes the connection: the runner stops generating."""
        try:
            await self.response.aclose()
        finally:
            self._done()

    async def _place_held_until_end(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        try:
            async for event in events:
                yield event
        finally:
            self._done()  # the runner is done with it: its place serves the next request

    async def _read(self) -> AsyncIterator[Event]:
        api = self._api
        seen = False
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event:/id: fields
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                if not payload:
                    continue
                try:
                    event = from_json(payload)
                except ValueError as err:
                    raise api.failed(f"sent an event that is not JSON: {payload[:200]!r}") from err
                if isinstance(event, dict):
                    if "error" in event and "choices" not in event:
                        raise api._refusal(500, payload.encode())
                    seen = True
                    yield event, time.perf_counter_ns()
        except TransportError as err:
            if seen or isinstance(err, UpstreamTimeout):  # never ask a hung runner again
                raise api.broke(err) from err
            raise await api.cut_short(self._path, self._body) from err
        if seen:
            raise api.failed("ended its stream without finishing")
        raise await api.cut_short(self._path, self._body)


def _nothing() -> None:
    pass
