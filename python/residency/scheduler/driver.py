"""The asyncio driver of the core's scheduling engine: requests in, runners out.

Every decision — who waits, who goes next, what loads where, what is evicted or expires — is the
engine's (``residency._core.Engine``). This module turns requests and runner events into engine
events and carries out the actions that come back: grants wake the waiting request, Load and Stop go
to the executor (processes, memory waits), Estimate reads the model file, Reject fails a request.
Engine calls happen between awaits, so the event loop needs no lock of its own.

    request → arrive → (queued…) Grant → [wait for the load] → ping if idle → serve → done
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from residency._core import Action, ActionKind, DeviceUsage, Engine, InvalidStateError, ResidentSet
from residency.config import Settings
from residency.errors import ResidencyError, RunnerError
from residency.keepalive import KeepAliveChoice, KeepAliveClient, KeepAliveOrigin, parse_keep_alive
from residency.memory import DeviceInfo, MemoryProbe
from residency.metrics import ResidencyMetrics
from residency.registry import ModelEntry, Registry
from residency.runners.protocol import RunnerUnreachable
from residency.scheduler.admission import Admission
from residency.scheduler.circuit import Circuit
from residency.scheduler.clock import Clock, MonotonicClock
from residency.scheduler.devices import discover, engine_devices
from residency.scheduler.executor import (
    Executor,
    Instance,
    RunnerFactory,
    Tasks,
    default_runner,
)
from residency.scheduler.host_cache import make_host_cache
from residency.scheduler.lease import Lease, LoadOptions, ResidentModel
from residency.scheduler.observations import Observations
from residency.scheduler.requests import PendingRequest, copy_error, shape_of
from residency.scheduler.rows import HostTierView, device_usage, host_tier_view, resident_rows
from residency.scheduler.runner_checks import check_before_use, exits_soon, still_serving
from residency.scheduler.sizing import Sizing, gib
from residency.scheduler.timer import KeepAliveTimer
from residency.scheduler.watchdog import Watchdog
from residency.watcher import Watcher

__all__ = ["Scheduler"]

log = logging.getLogger("residency.scheduler")


class Scheduler(Admission):
    """Loads, keeps alive, evicts and recovers models on behalf of concurrent requests."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        registry: Registry | None = None,
        runner_factory: RunnerFactory | None = None,
        probe: MemoryProbe | None = None,
        devices: list[DeviceInfo] | None = None,
        journal: bool = False,
        metrics: ResidencyMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else ResidencyMetrics()  # gauges read self
        self.metrics.source = self
        self._clock: Clock = clock or MonotonicClock()
        self._registry = registry or Registry.from_settings(settings)
        self._runner_factory = runner_factory or default_runner
        self._probe = probe
        self._device_infos = devices
        self._journal = journal  # keep the engine's journal (the differential test compares it)
        self._sizing = Sizing(settings)
        #: Crash-loop backoff and circuit per model (see scheduler.circuit).
        self.circuit = Circuit(settings, on_open=self.metrics.circuit_opened)
        self._engine: Engine | None = None
        self._executor: Executor | None = None
        self._watcher: Watcher | None = None
        self._tasks = Tasks()
        self._requests: dict[int, PendingRequest] = {}
        self._ids = itertools.count(1)
        self._timer: KeepAliveTimer | None = None
        self._seen = Observations(self.metrics)
        self._timer_task: asyncio.Task[None] | None = None
        self._started = self._closed = False
        #: Liveness of the loop, idle runners, the watcher, thrash and waits (/health reads it).
        self.watchdog: Watchdog | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Discovers devices, starts the recovery watcher, the keep-alive timer and preloads."""
        if self._started:
            return
        if self._closed:
            raise InvalidStateError("the scheduler was stopped; create a new one")
        self._started = True
        s = self.settings
        if self._device_infos is None:
            self._probe, self._device_infos = discover(s)
        devices, index = engine_devices(s, self._device_infos)
        self._engine = Engine(
            devices, s.policy, s.queue, s.max_queue, int(s.starvation_s * 1e9), self._journal,
            queue_timeout_ns=int(s.queue_timeout_s * 1e9), max_loads=s.max_loads,
        )  # fmt: skip
        self._watcher = Watcher()
        self._watcher.start()
        self._executor = Executor(
            settings=s,
            clock=self._clock,
            probe=self._probe,
            watcher=self._watcher,
            device_index=index,
            runner_factory=self._runner_factory,
            events=self,
            tasks=self._tasks,
            metrics=self.metrics,
            host_cache=make_host_cache(
                s.host_cache_bytes,
                s.host_cache_half_life_s,
                self._engine.resident_set.set_host_warm,
            ),
        )
        for entry in self._registry.entries():
            self._sizing.keep_alive(entry)  # parsed once, at start-up
        self._timer = KeepAliveTimer(self._engine, self._clock, self._run)
        self._timer_task = asyncio.create_task(self._timer.run(), name="residency-keep-alive")
        for name in s.preload:
            self._tasks.spawn(self._preload(name), f"preload-{name}")
        self.watchdog = Watchdog(
            s, self.metrics, engine=self._engine, executor=self._executor,
            watcher=self._watcher, engine_now_ns=self._clock.now_ns,
        )  # fmt: skip
        self._tasks.spawn(self.watchdog.run(lambda: self._timer_task), "watchdog")

    async def stop(self) -> None:
        """Cancels timers and loads, stops every runner group (SIGTERM, deadline, SIGKILL)."""
        if self._closed:
            return
        self._closed = True
        for req in self._requests.values():
            if not req.granted.done():
                req.granted.set_exception(ResidencyError("the scheduler is shutting down"))
        tasks = [t for t in (self._timer_task, *self._tasks.work) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*list(self._tasks.stoppers), return_exceptions=True)
        if self._executor is not None:
            await self._executor.shutdown()
        if self._watcher is not None:
            self._watcher.close_loop(asyncio.get_running_loop())  # its eventfd reader
            self._watcher.stop()

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the API servers use -------------------------------------------------------------------
    def models(self) -> list[ModelEntry]:
        return self._registry.entries()

    def resolve(self, name: str) -> ModelEntry:
        return self._registry.resolve(name)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise InvalidStateError("the scheduler is not started")
        return self._engine

    @property
    def core(self) -> ResidentSet:
        """The core's resident set (read-only use: snapshot, devices, stats)."""
        return self.engine.resident_set

    def session(
        self,
        model: str,
        *,
        keep_alive: str | float | None = None,
        options: Mapping[str, Any] | None = None,
        client: KeepAliveClient | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """``async with scheduler.session("gemma3:270m") as lease:``: a ready runner, one request.

        keep_alive applies on exit (None keeps the model's current value), bounded or replaced
        as the keep-alive rules of `client`'s key, the model and the server say. Raises
        ModelNotFoundError, ServerBusyError, ModelTooLargeError, RunnerError, InvalidArgumentError.
        """
        return self._session(model, keep_alive, options, client)

    async def load(
        self,
        model: str,
        *,
        keep_alive: str | float | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Lease:
        """Makes the model resident without a request; returns the (released) lease's timings."""
        async with self.session(model, keep_alive=keep_alive, options=options) as lease:
            return lease

    async def unload(self, model: str) -> None:
        """Unloads now if idle (returning once the runner exited), else after its last request."""
        entry = self.resolve(model)
        if self._engine is None or self._executor is None:
            return
        self._run(self._engine.unload(entry.name, self._clock.now_ns()))
        stopping = self._executor.stopping.get(entry.name)
        if stopping is not None:
            await asyncio.shield(stopping[1])

    def device_usage(self) -> list[tuple[DeviceUsage, int | None]]:
        return [] if self._executor is None else device_usage(self.core, self._executor)

    def failing(self) -> list[dict[str, Any]]:
        """Models whose runner failed lately: backoff and circuit state (/api/ps, metrics)."""
        return self.circuit.rows(self._clock.now_ns())

    def resident(self) -> list[ResidentModel]:
        if self._engine is None or self._executor is None:
            return []
        now = self._clock.now_ns()
        seen = self._seen
        return resident_rows(self._engine, self._executor, now, seen.keep_alive_origins, seen.speed)

    def host_tier(self) -> HostTierView | None:
        """The host page cache: its budget and the configured models' files warm in it."""
        host = None if self._executor is None else self._executor.host_cache
        return host_tier_view(host, (e.name for e in self.models()))

    # ---- one request ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _session(
        self,
        model: str,
        keep_alive: str | float | None,
        options: Mapping[str, Any] | None,
        client: KeepAliveClient | None,
    ) -> AsyncIterator[Lease]:
        lease, request_id, ka = await self._acquire(model, keep_alive, options, client)
        try:
            yield lease
        except RunnerUnreachable:  # dropped unanswered: if it is dying, fail it before the retry
            if await exits_soon(lease.runner):
                still_serving(self._executor, lease, "exited (dropped a request unanswered)")
            raise
        else:
            if self.circuit.failing and still_serving(self._executor, lease):
                self.circuit.succeeded(lease.entry.name)  # served to the end: the streak is over
        finally:
            # Synchronous: a cancelled client cannot interrupt its own release.
            lease.release()
            if ka.ns is not None:
                self._seen.keep_alive_set(lease.entry.name, KeepAliveOrigin.of(ka, client))
            self._run(self.engine.done(request_id, self._clock.now_ns(), ka.ns))

    async def _acquire(
        self,
        model: str,
        keep_alive: str | float | None,
        options: Mapping[str, Any] | None,
        client: KeepAliveClient | None,
    ) -> tuple[Lease, int, KeepAliveChoice]:
        """The lease, the request's id, and the keep-alive it applies (ns None: the model's)."""
        if not self._started or self._closed:
            raise InvalidStateError("the scheduler is not running")
        entry = self.resolve(model)
        want = self._sizing.options(entry, options)
        asked = None if keep_alive is None else parse_keep_alive(keep_alive)
        ka = self._sizing.govern_keep_alive(entry, asked, client)
        ka_ns = self._sizing.keep_alive(entry) if ka.ns is None else ka.ns
        origin = KeepAliveOrigin.of(ka, client)
        t0 = self._clock.now_ns()
        for _attempt in range(3):
            if self.circuit.failing:  # backing off after failures (raises if its circuit is open)
                wait = self.circuit.wait_ns(entry.name, self._clock.now_ns())
                await self._clock.sleep_until(self._clock.now_ns() + wait)
            req = self._arrive(entry, want, ka_ns, t0)
            req.keep_alive_origin = origin
            try:
                inst, grant = await req.granted
            except asyncio.CancelledError:
                self._run(self.engine.cancel(req.id, self._clock.now_ns()))
                raise
            finally:
                self._requests.pop(req.id, None)
            granted_ns = self._clock.now_ns()
            try:
                await inst.ready.wait()
                if inst.failure is None and not grant.joined_load:
                    await check_before_use(self._executor, inst, grant.idle_for)
            except asyncio.CancelledError:
                self._run(self.engine.cancel(req.id, self._clock.now_ns()))
                raise
            if inst.failure is not None:
                if not grant.joined_load:
                    continue  # a ready runner died before this request used it: load it again
                raise copy_error(inst.failure)
            assert inst.runner is not None
            now = self._clock.now_ns()
            # A request that joined a load waited for it: that wait is its load_duration, as in
            # Ollama, and it counts as cold. One queued behind a busy model reports its queue time.
            lease = Lease(
                model=model,
                entry=entry,
                cold=grant.joined_load,
                load_duration_ns=now - t0 if grant.joined_load else 0,
                queue_duration_ns=granted_ns - t0,
                ctx=inst.options.ctx,
                device=inst.device,
                runner=inst.runner,
                on_decoded=functools.partial(self._seen.decoded_alone, self.core, entry.name),
            )
            return lease, req.id, ka
        raise RunnerError(f"the runner for {entry.name!r} kept failing its health check")

    def _arrive(self, entry: ModelEntry, want: LoadOptions, ka_ns: int, t0: int) -> PendingRequest:
        loop = asyncio.get_running_loop()
        req = PendingRequest(next(self._ids), entry, want, ka_ns, loop.create_future())
        known = self._sizing.cached(entry, want)
        if known is not None:
            req.bytes, req.gpu_layers = known
        self._requests[req.id] = req
        now = self._clock.now_ns()
        self._run(self.engine.arrive(req.id, entry.name, shape_of(want), req.bytes, ka_ns, now))
        return req

    # ---- carrying out the engine's actions -----------------------------------------------------
    def _run(self, actions: list[Action]) -> None:
        for a in actions:
            kind = a.kind
            if kind == ActionKind.GRANT:
                req = self._requests.get(a.request)
                if req is not None and not req.granted.done() and self._executor is not None:
                    req.granted.set_result((self._executor.instances[a.key], a))
            elif kind == ActionKind.LOAD:
                self._load(a)
            elif kind == ActionKind.STOP:
                assert self._executor is not None
                self._executor.stop(a.key, a.reason, evicted=a.evicted, cause=a.cause)
            elif kind == ActionKind.ESTIMATE:
                req = self._requests[a.request]
                self._tasks.spawn(self._estimate(req), f"estimate-{a.key}")
            elif kind == ActionKind.PREFETCH:
                waiter = self._requests.get(a.request)
                if waiter is not None and self._executor is not None:
                    self._executor.prefetch(a.key, waiter.entry.path)
            else:
                self._reject(a)
        if self._timer is not None:
            self._timer.changed()

    def _load(self, a: Action) -> None:
        assert self._executor is not None
        req = self._requests[a.request]
        if req.entry.config.pinned:
            self.core.set_pinned(a.key, True, self._clock.now_ns())
        if req.keep_alive_origin is not None:  # the loading request's keep-alive is the first
            self._seen.keep_alive_set(a.key, req.keep_alive_origin)
        inst = self._executor.create(a.key, req.entry, req.want, a.device, req.gpu_layers)
        self._executor.load(inst, list(a.victims), a.freed_bytes, a.bytes)

    # ---- what the executor reports -------------------------------------------------------------
    def runner_ready(self, inst: Instance, load_s: float, measured: int | None) -> None:
        self._run(self.engine.ready(inst.key, self._clock.now_ns(), load_s, measured))
        r = self.core.reservation(inst.key)
        if measured is not None and r is not None and not r.measured:
            log.warning("%s measured %s, more than its device holds beside the others; keeping "
                        "the estimate %s", inst.key, gib(measured), gib(r.bytes))  # fmt: skip

    def runner_gone(self, key: str) -> None:
        if not self._closed:
            self._run(self.engine.gone(key, self._clock.now_ns()))

    def runner_failed(self, inst: Instance, reason: str) -> None:
        if not self._closed:
            if isinstance(inst.failure, RunnerError):  # not a cancelled or too large load
                self.circuit.failed(inst.key, inst.failure.summary, self._clock.now_ns())
            self._run(self.engine.failed(inst.key, reason, self._clock.now_ns()))

    async def _preload(self, name: str) -> None:
        try:
            lease = await self.load(name)
            log.info("preloaded %s in %.2f s", name, lease.load_duration_ns / 1e9)
        except ResidencyError as err:
            log.error("preloading %s failed: %s", name, err)
