"""The ingress's scheduler: the API pipeline's seam (``SchedulerLike``), backed by Ray Serve.

The FastAPI app talks to its scheduler through ``session(model)`` → a lease whose ``api`` is the
runner protocol (complete, stream, embed). :class:`RayScheduler` hands out a :class:`RayLease`
whose ``api`` sends each of those calls to the model-server deployment with the model as the
multiplexed model id; the router picks the replica, whose own scheduler leases its runner for
exactly that call. So both APIs, their translation, limits and errors are the single-node code,
unchanged; only where the runner call goes differs.

The lease is taken on the replica, not here: its timings (cold, load_duration) arrive with the
call's answer and update this lease, which the API reads when it writes its final answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

from residency.config import Settings
from residency.errors import ModelTooLargeError
from residency.keepalive import KeepAliveClient
from residency.metrics import ResidencyMetrics
from residency.ray.router import ResidencyRouter, routers
from residency.ray.stats import tier_of
from residency.ray.transport import as_api_error
from residency.registry import ModelEntry, Registry
from residency.runners.assemble import Assembly, generate_streamed
from residency.runners.protocol import Body, Embeddings, Event, RunnerApi

__all__ = ["ClusterDevice", "ClusterResident", "RayLease", "RayScheduler"]

KeepAlive = str | float | None
#: How long start() waits for every replica's first routing stats.
STATS_WAIT_S = 30.0
T = TypeVar("T")

#: How long a request waits for a replica that can fit its model before it is refused.
#: As long as a replacement replica may take to start and report (seen > 10 s on a loaded host).
FIT_WAIT_S = 30.0


@contextlib.asynccontextmanager
async def _replica_errors() -> AsyncIterator[None]:
    """Ray's errors (a replica's failure, its death) as the API errors a client reads."""
    try:
        yield
    except Exception as err:
        mapped = as_api_error(err)
        if mapped is None:
            raise
        raise mapped from None


@dataclass
class RayLease:
    """One request's lease, as the API sees it; the replica holds the real one per call."""

    model: str
    entry: ModelEntry
    scheduler: RayScheduler = field(repr=False)
    keep_alive: KeepAlive = None
    options: Mapping[str, Any] | None = None
    cold: bool = False
    load_duration_ns: int = 0
    queue_duration_ns: int = 0
    #: Where the last call was served (replica id, node id); "" before any.
    replica: str = ""
    node: str = ""
    used: bool = False

    @property
    def api(self) -> RunnerApi:
        # RunnerApi's calls and their errors, made through Serve: the same protocol by shape.
        return cast(RunnerApi, RemoteRunnerApi(self))

    def took(self, info: Mapping[str, Any]) -> None:
        self.used = True
        self.cold = self.cold or bool(info["cold"])
        self.load_duration_ns = max(self.load_duration_ns, int(info["load_duration_ns"]))
        self.queue_duration_ns = max(self.queue_duration_ns, int(info["queue_duration_ns"]))
        self.replica, self.node = str(info["replica"]), str(info["node"])

    def decoded(self, tokens: int, ns: int) -> None:
        """Decode speed is sampled by the replica that generated."""

    def handle(self, *, stream: bool = False) -> Any:
        return self.scheduler.handle.options(multiplexed_model_id=self.model, stream=stream)


class RemoteRunnerApi:
    """RunnerApi's three calls, made on the replica the router picks for the lease's model."""

    before_send = None

    def __init__(self, lease: RayLease) -> None:
        self._lease = lease

    async def _placed(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, sent again when the replica it reached cannot fit the model: one that had not
        reported yet (a roll, a restart) is a routing miss, not the cluster's answer. Refused
        only once no replica can fit it (RayScheduler.some_replica_fits)."""
        deadline = time.monotonic() + FIT_WAIT_S
        while True:
            try:
                async with _replica_errors():
                    return await call()
            except ModelTooLargeError:
                if time.monotonic() >= deadline:
                    raise
                await self._lease.scheduler.some_replica_fits(self._lease.entry.name)
                await asyncio.sleep(0.2)  # the miss's replica reports, and the router learns

    async def complete(self, path: str, body: Body) -> bytes:
        lease = self._lease

        async def call() -> Any:
            handle = lease.handle()
            return await handle.complete.remote(path, body, lease.keep_alive, lease.options)

        answer, info = await self._placed(call)
        lease.took(info)
        return bytes(answer)

    async def generate(self, path: str, body: Mapping[str, Any]) -> Assembly:
        """Streamed from the replica and assembled here, as RunnerApi.generate does: a client
        that leaves cancels the replica's stream, and the runner stops."""
        return await generate_streamed(self.stream, path, body)

    async def embed(self, body: Body) -> Embeddings:
        lease = self._lease

        async def call() -> Any:
            return await lease.handle().embed.remote(body, lease.keep_alive, lease.options)

        result, info = await self._placed(call)
        lease.took(info)
        embeddings: Embeddings = result
        return embeddings

    async def stream(self, path: str, body: Body) -> RemoteEventStream:
        lease = self._lease

        async def call() -> RemoteEventStream:
            handle = lease.handle(stream=True)
            gen = handle.stream.remote(path, body, lease.keep_alive, lease.options)
            stream = RemoteEventStream(gen)
            try:
                info = await gen.__anext__()
                lease.took(info)
                await stream.start()
            except BaseException:
                await stream.aclose()
                raise
            return stream

        return await self._placed(call)


class RemoteEventStream:
    """A replica's streamed events, stamped on arrival here (as EventStream stamps them)."""

    def __init__(self, gen: Any) -> None:
        self._gen = gen
        self._first: Event | None = None
        self.first_at: int | None = None

    async def start(self) -> None:
        try:
            payload = await self._gen.__anext__()
        except StopAsyncIteration:
            return
        self.first_at = time.perf_counter_ns()
        self._first = (payload, self.first_at)

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async with _replica_errors():
            async for payload in self._gen:
                yield payload, time.perf_counter_ns()

    async def aclose(self) -> None:
        """Cancels the replica's generator: its lease is released, the runner stops generating."""
        self._gen.cancel()


@dataclass(frozen=True)
class ClusterResident:
    """One resident model on one replica (ResidentLike): /api/ps's cluster-wide rows."""

    name: str
    entry: ModelEntry
    device: str
    state: str
    bytes: int
    estimated_bytes: int
    measured_bytes: int | None
    size_vram: int
    expires_at: datetime | None
    context_length: int
    refcount: int
    warm_bytes: int | None
    replica: str
    node: str
    #: Ollama's "size" (the reservation; the replica reports no CPU/GPU split yet).
    size: int = 0
    #: Placement checks, decode history and keep-alive origins stay on the replica.
    placement: Any = None
    decode_speed: Any = None
    keep_alive_ns: int | None = None
    keep_alive_origin: Any = None


@dataclass(frozen=True)
class ClusterDevice:
    """One device of one replica, as the metrics and /api/ps read a DeviceUsage."""

    id: str
    total_bytes: int
    budget_bytes: int
    reserved_bytes: int
    max_models: int


def place(device: str, replica: str, node: str) -> str:
    """A device's cluster-wide name: ``device@replica/node`` (node ids cut to 8 characters)."""
    return f"{device}@{replica}/{node[:8]}"


class RayScheduler:
    """SchedulerLike over a model-server deployment handle (see the module's doc)."""

    def __init__(self, settings: Settings, handle: Any, *, deployment: str = "ModelServer") -> None:
        self.settings = settings
        self.handle = handle
        self.deployment = deployment
        self.metrics = ResidencyMetrics()
        self.metrics.source = self
        self._registry = Registry.from_settings(settings)

    async def start(self) -> None:
        """Waits for a replica to answer (this also starts this process's router), then for
        every replica's first stats (up to STATS_WAIT_S), so the first requests route by them."""
        async with _replica_errors():
            await self.handle.ping.remote()
        deadline = time.monotonic() + STATS_WAIT_S
        while time.monotonic() < deadline:
            router = self._router()
            if router is not None and all(s for _, s in router.view()):
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Nothing to stop here: the replicas and their runners are Serve's to stop."""

    def models(self) -> list[ModelEntry]:
        return self._registry.entries()

    def resolve(self, name: str) -> ModelEntry:
        return self._registry.resolve(name)

    def _router(self) -> ResidencyRouter | None:
        return routers().get(self.deployment)

    def view(self) -> list[dict[str, Any]]:
        """Every replica's last routing stats (the router's view)."""
        router = self._router()
        return [] if router is None else [s for _, s in router.view() if s]

    @contextlib.asynccontextmanager
    async def _session(
        self, model: str, keep_alive: KeepAlive, options: Mapping[str, Any] | None
    ) -> AsyncIterator[RayLease]:
        entry = self.resolve(model)
        await self.some_replica_fits(entry.name)
        lease = RayLease(model, entry, self, keep_alive, options)
        yield lease
        if not lease.used:  # a load-only request (Ollama's empty prompt): load it somewhere
            async with _replica_errors():
                lease.took(await lease.handle().load.remote(keep_alive, options))

    async def some_replica_fits(self, name: str) -> None:
        """Raises ModelTooLargeError when every replica reported the model cannot fit, for
        FIT_WAIT_S: the router never sends it to such a replica, so the request would wait
        forever; a replica being replaced (a rolling update, a restart) gets that long to come."""
        deadline = time.monotonic() + FIT_WAIT_S
        while (view := self.view()) and all(tier_of(name, s) is None for s in view):
            if time.monotonic() >= deadline:
                raise ModelTooLargeError(
                    f"model {name!r} fits on no replica of the cluster "
                    f"(each reported it larger than its largest device)"
                )
            await asyncio.sleep(0.1)

    def session(
        self,
        model: str,
        *,
        keep_alive: KeepAlive = None,
        options: Mapping[str, Any] | None = None,
        client: KeepAliveClient | None = None,
    ) -> contextlib.AbstractAsyncContextManager[RayLease]:
        # `client` (who asked, for keep-alive governance) is not relayed: each replica applies
        # its own keep-alive policy without knowing the caller's key.
        del client
        return self._session(model, keep_alive, options)

    def failing(self) -> list[dict[str, Any]]:
        """Crash-loop state lives in each replica's own circuit; the cluster view has none yet."""
        return []

    def host_tier(self) -> None:
        """Each replica's host has its own page cache (its rows carry warm_bytes); the cluster
        view aggregates none yet."""

    async def unload(self, model: str) -> None:
        """Unloads the model from every replica that holds it (each call reaches one holder)."""
        name = self.resolve(model).name
        for _ in range(max(1, len(self.view()))):
            async with _replica_errors():
                await self.handle.options(multiplexed_model_id=name).unload.remote()
            if not any(name in s.get("models", {}) for s in self.view()):
                break

    def resident(self) -> list[ClusterResident]:
        rows = []
        for stats in self.view():
            replica, node = str(stats.get("replica", "")), str(stats.get("node", ""))
            for name, m in stats.get("models", {}).items():
                try:
                    entry = self.resolve(name)
                except Exception:
                    continue  # configured on that replica only
                expires = m.get("expires_at")
                rows.append(
                    ClusterResident(
                        name=name,
                        entry=entry,
                        device=place(str(m["device"]), replica, node),
                        state=str(m["state"]),
                        bytes=int(m["bytes"]),
                        estimated_bytes=int(m["estimated_bytes"]),
                        measured_bytes=m.get("measured_bytes"),
                        size_vram=int(m["size_vram"]),
                        expires_at=None if expires is None else datetime.fromisoformat(expires),
                        context_length=int(m["context_length"]),
                        refcount=int(m["refcount"]),
                        warm_bytes=m.get("warm_bytes"),
                        replica=replica,
                        node=node,
                        size=int(m["bytes"]),
                    )
                )
        return rows

    def device_usage(self) -> Sequence[tuple[ClusterDevice, int | None]]:
        out: list[tuple[ClusterDevice, int | None]] = []
        for stats in self.view():
            for d in stats.get("devices", ()):
                dev = ClusterDevice(
                    id=place(str(d["id"]), str(stats["replica"]), str(stats["node"])),
                    total_bytes=int(d["total"]),
                    budget_bytes=int(d["budget"]),
                    reserved_bytes=int(d["reserved"]),
                    max_models=int(d["max_models"]),
                )
                out.append((dev, None))
        return out
