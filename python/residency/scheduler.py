"""The asyncio orchestrator: turns "a request for model X" into a warm runner.

The C++ core (ResidentSet) owns every reservation and its refcount; this module owns what the core
never touches: runner processes, sockets, timers and waiting requests. Each request runs:

    resolve → queue slot → admit (Hit: join; Load: stop victims, await memory, spawn; Wait: sleep
    until a release/load/unload; TooLarge: fail) → acquire → ready → serve → release(keep_alive)

Decisions happen between awaits, so they are atomic on the event loop without a lock; waiting
requests sleep on a broadcast event woken on every release, load and unload (never a polling loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Protocol

from residency._core import (
    AdmitOutcome,
    BudgetExceededError,
    Device,
    DeviceUsage,
    InvalidArgumentError,
    InvalidStateError,
    ModelBusyError,
    ReservationState,
    ResidentSet,
    UnknownModelError,
)
from residency.config import Settings
from residency.errors import (
    EstimateError,
    ModelTooLargeError,
    ResidencyError,
    RunnerError,
    ServerBusyError,
)
from residency.keepalive import parse_keep_alive
from residency.memory import DeviceInfo, MemoryProbe, discover_devices, open_probe
from residency.metrics import ResidencyMetrics
from residency.registry import ModelEntry, Registry
from residency.runners import LaunchSpec, Runner, runner_class
from residency.runners.http import RunnerClient
from residency.runners.protocol import RunnerApi
from residency.watcher import RecoveryOutcome, Watcher

__all__ = [
    "Clock",
    "Lease",
    "LoadOptions",
    "MonotonicClock",
    "ResidentModel",
    "Scheduler",
]

log = logging.getLogger(__name__)

HOST_DEVICE = "host"


class Clock(Protocol):
    """Monotonic nanoseconds, and sleeping until a point of that clock (tests drive it by hand)."""

    def now_ns(self) -> int: ...

    async def sleep_until(self, deadline_ns: int) -> None: ...


class MonotonicClock:
    """The real clock: time.monotonic_ns and asyncio.sleep."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    async def sleep_until(self, deadline_ns: int) -> None:
        delay = (deadline_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(frozen=True)
class LoadOptions:
    """The options that decide a runner's memory; a runner serves any request it satisfies."""

    ctx: int
    parallel: int
    kv_type: str
    gpu_layers: int | Literal["auto"]

    def satisfies(self, want: LoadOptions) -> bool:
        """A larger context or more slots serve smaller requests without a reload."""
        return (
            self.ctx >= want.ctx
            and self.parallel >= want.parallel
            and self.kv_type == want.kv_type
            and want.gpu_layers in ("auto", self.gpu_layers)
        )


@dataclass
class Lease:
    """A ready runner, held for one request: it cannot be evicted or expire until released."""

    model: str
    entry: ModelEntry
    base_url: str
    #: Pooled and shared by every request to this runner: reuse it, never create one per request.
    client: RunnerClient
    cold: bool
    #: Queueing + eviction + recovery + start, as Ollama counts load_duration.
    load_duration_ns: int
    queue_duration_ns: int
    ctx: int
    device: str
    runner: Runner = field(repr=False)

    @property
    def api(self) -> RunnerApi:
        """The runner's protocol: what the API layer uses (never the process or its socket)."""
        return self.runner.api

    def output_tail(self, lines: int = 40) -> str:
        """The runner's last output lines, for error messages."""
        return self.runner.output_tail(lines)

    @property
    def alive(self) -> bool:
        return not self.runner.exited

    def error(self, what: str) -> RunnerError:
        """A RunnerError for a failed proxied request, saying whether the runner died."""
        if self.runner.exited:
            what = f"{what}; the runner exited ({self.runner.exit_description()})"
        return self.runner.error(what)


@dataclass(frozen=True)
class ResidentModel:
    """One row of /api/ps."""

    name: str
    entry: ModelEntry
    device: str
    state: str
    #: Bytes reserved (the measurement once the runner reported one, else the estimate).
    bytes: int
    estimated_bytes: int
    measured_bytes: int | None
    size_vram: int
    expires_at: datetime | None
    context_length: int
    refcount: int


@dataclass(eq=False)
class _Instance:
    """One residency of a model: the Python side (its process) of the core's reservation."""

    key: str
    entry: ModelEntry
    options: LoadOptions
    device: str
    device_index: int
    gpu_layers: int
    runner: Runner | None = None
    #: Set when loading ended, well or not (`failure` says which).
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failure: ResidencyError | None = None
    #: Stopping has begun (evicted, expired, unloaded, reloading, crashed): do not join it.
    closing: bool = False
    #: The core's reservation was force-removed (crash, failed load): references are void.
    dead: bool = False
    unload_when_idle: bool = False
    last_used_ns: int = 0
    load_duration_ns: int = 0


class Scheduler:
    """Loads, keeps alive, evicts and recovers models on behalf of concurrent requests."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        metrics: ResidencyMetrics | None = None,
    ) -> None:
        self.settings = settings
        #: Loads, evictions and crashes are counted here; its gauges read this scheduler.
        self.metrics = metrics if metrics is not None else ResidencyMetrics()
        self.metrics.source = self
        self._clock: Clock = clock or MonotonicClock()
        self._registry = Registry.from_settings(settings)
        self._core: ResidentSet | None = None
        self._probe: MemoryProbe | None = None
        self._watcher: Watcher | None = None
        self._device_index: dict[str, int] = {}
        self._instances: dict[str, _Instance] = {}
        #: Estimated bytes per (model, options): estimating reads the GGUF, once.
        self._estimates: dict[tuple[str, LoadOptions], int] = {}
        #: Each model's options when a request sets none (the usual case), worked out once.
        self._default_options: dict[str, LoadOptions] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stoppers: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # replaced on every notify: a broadcast to waiters
        self._wake_timer = asyncio.Event()
        #: The expiry the keep-alive timer sleeps until (None: until woken).
        self._timer_deadline: int | None = None
        self._pending = 0
        self._started = False
        self._closed = False
        self._default_keep_alive_ns = settings.keep_alive_ns()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Discovers devices, starts the recovery watcher, the keep-alive timer and preloads."""
        if self._started:
            return
        if self._closed:
            raise InvalidStateError("the scheduler was stopped; create a new one")
        self._started = True
        self._core = ResidentSet(self._discover_devices(), self.settings.policy)
        self._watcher = Watcher()
        self._watcher.start()
        self._timer = asyncio.create_task(self._keep_alive_loop(), name="residency-keep-alive")
        for name in self.settings.preload:
            self._spawn(self._preload(name), f"preload-{name}")

    async def stop(self) -> None:
        """Cancels timers and loads, stops every runner group (SIGTERM, deadline, SIGKILL)."""
        if self._closed:
            return
        self._closed = True
        self._notify()  # waiting requests see the scheduler closing and fail
        tasks = [t for t in (self._timer, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*list(self._stoppers), return_exceptions=True)
        instances = list(self._instances.values())
        for inst in instances:
            inst.closing = True
            inst.dead = True
            inst.failure = inst.failure or ResidencyError("the scheduler is shutting down")
            inst.ready.set()
        await asyncio.gather(
            *(i.runner.stop(self.settings.stop_timeout_s) for i in instances if i.runner),
            return_exceptions=True,
        )
        if self._core is not None:
            for inst in instances:
                self._forget(inst, force=True)
        self._instances.clear()
        if self._watcher is not None:
            self._watcher.close_loop(asyncio.get_running_loop())  # its eventfd reader
            self._watcher.stop()
        self._notify()

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

    def device_usage(self) -> list[tuple[DeviceUsage, int | None]]:
        """Each device's accounting in the core, with the free bytes its probe reports now."""
        if self._core is None:
            return []
        return [(d, self._free(self._device_index.get(d.id, 0))) for d in self._core.devices()]

    @property
    def core(self) -> ResidentSet:
        """The core's resident set (read-only use: snapshot, devices, stats)."""
        if self._core is None:
            raise InvalidStateError("the scheduler is not started")
        return self._core

    def session(
        self,
        model: str,
        *,
        keep_alive: str | float | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """``async with scheduler.session("gemma3:270m") as lease:``: a ready runner, one request.

        keep_alive applies on exit (None keeps the model's current value). Raises
        ModelNotFoundError, ServerBusyError, ModelTooLargeError, RunnerError, InvalidArgumentError.
        """
        return self._session(model, keep_alive, options)

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
        """Unloads now if idle, else as soon as its last request ends."""
        entry = self.resolve(model)
        inst = self._instances.get(entry.name)
        if inst is None or inst.closing or self._core is None:
            return
        r = self._core.reservation(entry.name)
        if r is not None and r.refcount == 0 and inst.ready.is_set():
            self._core.begin_unload(entry.name)
            await self._stop_instance(inst, "unloaded on request", "unload_request")
        else:
            inst.unload_when_idle = True

    def resident(self) -> list[ResidentModel]:
        if self._core is None:
            return []
        now = self._clock.now_ns()
        wall = datetime.now(timezone.utc)
        rows = []
        for r in self._core.snapshot():
            inst = self._instances.get(r.key)
            if inst is None:
                continue
            expires = r.expires_at
            rows.append(
                ResidentModel(
                    name=r.key,
                    entry=inst.entry,
                    device=r.device,
                    state=r.state.name.lower(),
                    bytes=r.bytes,
                    estimated_bytes=r.estimated_bytes,
                    measured_bytes=r.bytes if r.measured else None,
                    size_vram=0 if r.device == HOST_DEVICE else r.bytes,
                    expires_at=None
                    if expires is None or expires >= 2**63 - 1
                    else wall + timedelta(microseconds=(expires - now) / 1000),
                    context_length=inst.options.ctx,
                    refcount=r.refcount,
                )
            )
        return rows

    # ---- one request ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _session(
        self, model: str, keep_alive: str | float | None, options: Mapping[str, Any] | None
    ) -> AsyncIterator[Lease]:
        lease, inst = await self._acquire(model, keep_alive, options)
        try:
            yield lease
        finally:
            # Synchronous: a cancelled client cannot interrupt its own release.
            self._release(inst, None if keep_alive is None else parse_keep_alive(keep_alive))

    async def _acquire(
        self, model: str, keep_alive: str | float | None, options: Mapping[str, Any] | None
    ) -> tuple[Lease, _Instance]:
        if not self._started or self._closed:
            raise InvalidStateError("the scheduler is not running")
        entry = self.resolve(model)
        want = self._options(entry, options)
        ka_ns = (
            self._model_keep_alive(entry) if keep_alive is None else parse_keep_alive(keep_alive)
        )
        if self._pending >= self.settings.max_queue:
            raise ServerBusyError(
                f"server busy: {self._pending} requests are already waiting "
                f"(max_queue {self.settings.max_queue}); retry later",
                retry_after_s=1.0,
            )
        self._pending += 1
        t0 = self._clock.now_ns()
        try:
            for _attempt in range(3):
                inst, cold, queued_ns = await self._admit(entry, want, ka_ns, t0)
                try:
                    await inst.ready.wait()
                except asyncio.CancelledError:
                    self._release(inst, None)
                    raise
                if inst.failure is not None:
                    # The failed load force-removed the reservation: our reference is void.
                    raise _copy_error(inst.failure)
                runner = inst.runner
                assert runner is not None
                if not cold and not await self._healthy(inst):
                    continue  # it was killed as dead; load it again
                now = self._clock.now_ns()
                lease = Lease(
                    model=model,
                    entry=entry,
                    base_url=runner.base_url,
                    client=runner.client,
                    cold=cold,
                    load_duration_ns=now - t0 if cold else 0,
                    queue_duration_ns=queued_ns,
                    ctx=inst.options.ctx,
                    device=inst.device,
                    runner=runner,
                )
                return lease, inst
            raise RunnerError(f"the runner for {entry.name!r} kept failing its health check")
        finally:
            self._pending -= 1

    async def _healthy(self, inst: _Instance) -> bool:
        """Ping a runner that sat idle before handing it out (it may have hung meanwhile)."""
        assert inst.runner is not None
        r = self.core.reservation(inst.key)
        if inst.runner.exited:
            ok = False
        elif self._clock.now_ns() - inst.last_used_ns < 1_000_000_000:
            return True
        elif r is None or r.refcount > 1:
            # Other requests are in flight: it is in use, not idle. A busy runner may answer
            # slowly, and killing it would fail the requests it is serving.
            return True
        else:
            try:
                ok = await inst.runner.ping(self.settings.ping_timeout_s)
            except asyncio.CancelledError:
                self._release(inst, None)
                raise
        if not ok and not inst.dead:
            self._runner_died(inst, "stopped answering its health check")
        return ok

    async def _admit(
        self, entry: ModelEntry, want: LoadOptions, ka_ns: int, t0: int
    ) -> tuple[_Instance, bool, int]:
        """Returns an instance this request holds a core reference on, whether it is a cold load,
        and how long the request queued."""
        core = self.core
        key = entry.name
        # Only a load needs the estimate: a warm hit (the usual case) never looks it up.
        estimate: tuple[int, int] | None = None
        while True:
            if self._closed:
                raise ResidencyError("the scheduler is shutting down")
            changed = self._changed
            now = self._clock.now_ns()
            inst = self._instances.get(key)
            if inst is not None and not inst.closing:
                if inst.options.satisfies(want):
                    core.acquire(key, now)
                    return inst, False, now - t0
                # Options that change memory: reload once nobody uses it.
                r = core.reservation(key)
                if r is not None and r.refcount == 0 and inst.ready.is_set():
                    core.begin_unload(key)
                    self._spawn(
                        self._stop_instance(inst, "options changed", "reload", evict=True),
                        f"reload-{key}",
                        stopper=True,
                    )
                await changed.wait()
                continue
            if inst is not None:  # being stopped: wait until it is gone
                await changed.wait()
                continue
            if estimate is None:
                # Estimating can take a while (it reads the GGUF, in a thread): the state may
                # change meanwhile, so decide again afterwards, without an await in between.
                estimate = await self._needed(entry, want)
                continue
            needed, gpu_layers = estimate
            decision = core.admit(key, needed, now, ka_ns)
            if decision.outcome == AdmitOutcome.LOAD:
                device = decision.device or HOST_DEVICE
                inst = _Instance(
                    key=key,
                    entry=entry,
                    options=want,
                    device=device,
                    device_index=self._device_index.get(device, 0),
                    gpu_layers=gpu_layers,
                )
                self._instances[key] = inst
                if entry.config.pinned:
                    core.set_pinned(key, True, now)
                core.acquire(key, now)
                self._spawn(
                    self._load(inst, list(decision.victims), decision.freed_bytes, needed),
                    f"load-{key}",
                )
                return inst, True, now - t0
            if decision.outcome == AdmitOutcome.WAIT:
                log.info("%s waits: %s", key, decision.reason)
                await changed.wait()
                continue
            if decision.outcome == AdmitOutcome.TOO_LARGE:
                partial = await self._partial_offload(entry, want, needed, gpu_layers)
                if partial is not None:
                    estimate = partial
                    continue
                raise ModelTooLargeError(
                    f"model {key!r} needs {_gib(needed)} with context {want.ctx}, which fits on no "
                    f"device: {decision.reason}"
                )
            raise InvalidStateError(f"the core reports {key!r} resident, but no runner serves it")

    def _release(self, inst: _Instance, keep_alive_ns: int | None) -> None:
        if inst.dead or self._core is None:
            return  # the reservation was force-removed; nothing to give back
        now = self._clock.now_ns()
        inst.last_used_ns = now
        if inst.unload_when_idle:
            keep_alive_ns = 0
        try:
            self._core.release(inst.key, now, keep_alive_ns)
        except (UnknownModelError, InvalidStateError) as err:
            log.warning("release of %s: %s", inst.key, err)
        self._changed.set()
        self._changed = asyncio.Event()
        # The timer sleeps until the soonest expiry; a release only moves it when it is sooner
        # (waking the timer task on every request cost a dozen task operations each).
        soonest = self._core.next_expiry()
        if soonest is not None and (self._timer_deadline is None or soonest < self._timer_deadline):
            self._wake_timer.set()

    # ---- loading, stopping, crashing ------------------------------------------------------------
    async def _load(
        self, inst: _Instance, victims: list[str], freed_bytes: int, needed: int
    ) -> None:
        core = self.core
        t0 = self._clock.now_ns()
        phases: list[float] = [time.monotonic()]  # real time of each phase's end, for the log
        try:
            free_before = self._free(inst.device_index)
            victim_insts = [self._instances[v] for v in victims if v in self._instances]
            # Stops are tasks of their own: a cancelled load must not leave a victim half-stopped.
            stops = [
                self._spawn(
                    self._stop_instance(v, f"evicted for {inst.key}", "make_room", evict=True),
                    f"evict-{v.key}",
                    stopper=True,
                )
                for v in victim_insts
            ]
            # When the device already shows the memory this load needs (a host with RAM to spare
            # beyond the configured budget), the victims' exit need not be awaited before the
            # spawn; with another load in flight its pending allocation is not visible, so no.
            overlap = bool(stops) and (
                free_before is not None
                and free_before >= needed
                and not self._other_load_in_flight(inst)
            )
            if not overlap:
                await asyncio.shield(asyncio.gather(*stops))
            phases.append(time.monotonic())
            if not overlap:
                await self._await_memory(inst, free_before, freed_bytes if stops else 0, needed)
            phases.append(time.monotonic())
            runner = self._make_runner(inst)
            inst.runner = runner
            free_at_spawn = None if overlap else self._free(inst.device_index)
            await runner.start()
            await runner.wait_ready(self.settings.load_timeout_s())
            await asyncio.shield(asyncio.gather(*stops))
            phases.append(time.monotonic())
            now = self._clock.now_ns()
            measured = self._measure(runner, inst, free_at_spawn)
            load_s = (now - t0) / 1e9
            try:
                core.loaded(inst.key, now, load_s, measured)
            except BudgetExceededError as err:
                log.warning(
                    "%s measured %s, more than its device can hold beside the others (%s); "
                    "keeping the estimate %s",
                    inst.key,
                    _gib(measured or 0),
                    err,
                    _gib(needed),
                )
                core.loaded(inst.key, now, load_s)
            inst.load_duration_ns = now - t0
            inst.last_used_ns = now
            self.metrics.loaded(inst.key, load_s)
            stop_ms, memory_ms, start_ms = ((b - a) * 1e3 for a, b in itertools.pairwise(phases))
            log.info(
                "loaded %s on %s in %.2f s (stop %d victims %s, memory %.0f ms, start %.0f ms; "
                "%s measured, %s estimated)",
                inst.key,
                inst.device,
                load_s,
                len(stops),
                "alongside the start" if overlap else f"{stop_ms:.0f} ms",
                memory_ms,
                start_ms,
                _gib(measured) if measured else "none",
                _gib(needed),
            )
            inst.ready.set()
            self._notify()  # waiters for a reload or a Wait may proceed now
            if inst.unload_when_idle:
                r = core.reservation(inst.key)
                if r is not None and r.refcount == 0:
                    core.begin_unload(inst.key)
                    self._spawn(
                        self._stop_instance(inst, "unloaded on request", "unload_request"),
                        "unload",
                        stopper=True,
                    )
        except BaseException as err:
            failure = (
                err
                if isinstance(err, ResidencyError)
                else RunnerError(f"loading {inst.key!r} failed: {err!r}")
            )
            if isinstance(err, asyncio.CancelledError):
                failure = ResidencyError(f"loading {inst.key!r} was cancelled (shutting down)")
            inst.failure = failure
            inst.closing = True
            log.warning("load of %s failed: %s", inst.key, failure)
            if isinstance(err, Exception):  # not a cancellation (shutdown)
                self.metrics.load_failed(inst.key)
            if inst.runner is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(inst.runner.stop(self.settings.stop_timeout_s))
            self._forget(inst, force=True)
            inst.ready.set()
            self._notify()
            if not isinstance(err, Exception):
                raise

    async def _stop_instance(
        self, inst: _Instance, why: str, reason: str, *, evict: bool = False
    ) -> None:
        """Stops a runner the core already moved to Unloading, then tells the core it is gone.

        An eviction has a load waiting for the memory, and the core guarantees the victim is idle:
        it gets `evict_grace_s` (default 0: SIGKILL at once, as Ollama kills its runners) instead
        of the graceful `stop_timeout_s`, which costs llama-cpp-python 0.2-0.3 s of shutdown."""
        inst.closing = True
        log.info("stopping %s: %s", inst.key, why)
        self.metrics.evicted(inst.key, reason)
        grace = self.settings.evict_grace_s if evict else self.settings.stop_timeout_s
        try:
            if inst.runner is not None:
                await inst.runner.stop(grace)
        finally:
            self._forget(inst, force=False)
            self._notify()

    def _forget(self, inst: _Instance, *, force: bool) -> None:
        """Removes the reservation from the core (forcing drops its references) and the instance."""
        core = self._core
        if core is not None:
            r = core.reservation(inst.key)
            if r is not None and self._instances.get(inst.key) is inst:
                if r.state != ReservationState.UNLOADING:
                    try:
                        core.begin_unload(inst.key, force=force)
                    except ModelBusyError:
                        core.begin_unload(inst.key, force=True)
                    if force:
                        inst.dead = True
                core.unloaded(inst.key)
        if self._instances.get(inst.key) is inst:
            del self._instances[inst.key]
        self._wake_timer.set()

    def _runner_died(self, inst: _Instance, what: str) -> None:
        """A ready runner exited or hung: fail it, free its reservation, keep serving."""
        runner = inst.runner
        assert runner is not None
        inst.failure = runner.error(what)
        inst.closing = True
        self.metrics.crashed(inst.key)
        self._forget(inst, force=True)
        inst.dead = True
        self._notify()
        # Kills what is left of its group and closes its client.
        self._spawn(runner.stop(self.settings.stop_timeout_s), f"reap-{inst.key}", stopper=True)

    def _on_runner_exit(self, runner: Runner) -> None:
        inst = self._instances.get(runner.spec.name)
        if inst is None or inst.runner is not runner or runner.stopping or inst.closing:
            return
        if not inst.ready.is_set():
            return  # wait_ready sees the exit and the load task handles it
        self._runner_died(inst, f"exited unexpectedly ({runner.exit_description()})")

    def _make_runner(self, inst: _Instance) -> Runner:
        cfg = inst.entry.config
        spec = LaunchSpec(
            name=inst.key,
            model_path=inst.entry.path,
            ctx=inst.options.ctx,
            parallel=inst.options.parallel,
            kv_type=inst.options.kv_type,
            gpu_layers=inst.gpu_layers,
            device=inst.device,
            device_index=inst.device_index,
            env=dict(cfg.env),
            health_path=cfg.health_path if cfg.runner == "command" else None,
            args=tuple(cfg.args),
            embedding=cfg.embedding,
            chat_format=cfg.chat_format,
            command=cfg.command,
            binary=self.settings.llama_server,
            details=inst.entry.details,
        )
        return runner_class(cfg.runner)(spec, on_exit=self._on_runner_exit)

    # ---- memory --------------------------------------------------------------------------------
    def _discover_devices(self) -> list[Device]:
        s = self.settings
        self._probe, infos = _discover(s)
        devices = []
        for info in infos:
            total = (
                info.total_bytes
                if s.memory_limit is None
                else min(info.total_bytes, s.memory_limit)
            )
            overhead = 0 if info.id == HOST_DEVICE else min(s.gpu_overhead, total)
            devices.append(Device(info.id, total, overhead, s.max_loaded_models))
            self._device_index[info.id] = info.index
        log.info("devices: %s", ", ".join(f"{d.id} ({_gib(d.total_bytes)})" for d in devices))
        return devices

    def _free(self, index: int) -> int | None:
        if self._probe is None:
            return None
        try:
            return int(self._probe.query(index).free_bytes)
        except ResidencyError as err:
            log.warning("memory probe failed: %s", err)
            return None

    async def _await_memory(
        self, inst: _Instance, free_before: int | None, expected_freed: int, needed: int
    ) -> None:
        """After victims exit, wait until the device shows their memory back (drivers report it
        late). On the host, also refuse to start a load the machine cannot hold."""
        if self._probe is None or self._watcher is None or free_before is None:
            return
        free_now = self._free(inst.device_index)
        if expected_freed == 0:
            if free_now is None or free_now >= needed:
                return
            # Memory still held by something that exited (a crash) or by another process.
            free_before, expected_freed = free_now, needed - free_now
        result = await self._watcher.recovered(
            self._probe,
            inst.device_index,
            free_before=free_before,
            expected_freed=expected_freed,
            needed=needed,
            timeout_s=self.settings.recovery_timeout_s,
        )
        outcome = result.outcome
        log.info(
            "recovery on %s: %s after %.3f s (%d polls, %s free)",
            inst.device,
            outcome.name,
            result.elapsed_s,
            result.polls,
            _gib(result.last_free_bytes),
        )
        if outcome != RecoveryOutcome.RECOVERED and inst.device == HOST_DEVICE:
            last = result.last_free_bytes
            if last < needed:
                # Ollama never checks CPU loads; starting one the host cannot hold invites the OOM
                # killer into every process here.
                raise ModelTooLargeError(
                    f"model {inst.key!r} needs {_gib(needed)} but the host has {_gib(last)} "
                    f"available after waiting {self.settings.recovery_timeout_s:g} s"
                )

    def _measure(self, runner: Runner, inst: _Instance, free_at_spawn: int | None) -> int | None:
        """The runner's own buffer report; else, on a GPU, what the device lost while it loaded."""
        reported = runner.reported_bytes()
        if reported:
            if inst.device.startswith("cuda"):
                # llama.cpp's buffer lines leave out the CUDA context, kernels, cuBLAS and ggml's
                # pool (600-720 MiB per runner on an H100): keep reserving what the estimate
                # reserved for them, or the measurement would shrink the reservation by that much.
                from residency.estimate import DEFAULT_GPU_OVERHEAD_BYTES

                reported += DEFAULT_GPU_OVERHEAD_BYTES
            return reported
        if inst.device == HOST_DEVICE or free_at_spawn is None:
            return None  # host free memory moves with every process: not a measurement
        if self._other_load_in_flight(inst):
            return None  # another load on the device blurs the difference
        free_now = self._free(inst.device_index)
        if free_now is None or free_now >= free_at_spawn:
            return None
        return free_at_spawn - free_now

    def _other_load_in_flight(self, inst: _Instance) -> bool:
        return any(
            i is not inst and i.device == inst.device and not i.ready.is_set()
            for i in self._instances.values()
        )

    async def _needed(self, entry: ModelEntry, want: LoadOptions) -> tuple[int, int]:
        """Bytes to reserve on the device, and the GPU layers to start with (-1 = all)."""
        layers = -1 if want.gpu_layers == "auto" else int(want.gpu_layers)
        if entry.config.memory is not None:
            return entry.config.memory, layers
        key = (entry.name, want)
        if key not in self._estimates:
            kw = self._estimate_options(entry, want)
            on_gpu = self._has_gpu()
            est = await asyncio.to_thread(
                _estimate,
                entry,
                gpu_layers="all" if layers < 0 else layers,
                device="gpu" if on_gpu else "cpu",
                **kw,
            )
            self._estimates[key] = int(est.gpu_bytes if on_gpu else est.total_bytes)
        return self._estimates[key], layers

    async def _partial_offload(
        self, entry: ModelEntry, want: LoadOptions, needed: int, layers: int
    ) -> tuple[int, int] | None:
        """For a model too large for any GPU: the layers that fit on the largest, the rest on the
        host (what llama.cpp's -ngl does). None when the runner or the device cannot split."""
        if (
            layers >= 0
            or not self._has_gpu()
            or not runner_class(entry.runner).supports_offload
            or entry.config.memory is not None
        ):
            return None
        budget = max(d.budget_bytes for d in self.core.devices())
        from residency.estimate import fit_layers

        fit = await asyncio.to_thread(
            fit_layers, entry.path, budget, **self._estimate_options(entry, want)
        )
        if fit.layers <= 0 or fit.gpu_bytes >= needed:
            return None
        log.info(
            "%s does not fit on one GPU (%s): %d layers on the GPU (%s), the rest on the host (%s)",
            entry.name,
            _gib(needed),
            fit.layers,
            _gib(fit.gpu_bytes),
            _gib(fit.host_bytes),
        )
        return fit.gpu_bytes, fit.layers

    def _estimate_options(self, entry: ModelEntry, want: LoadOptions) -> dict[str, Any]:
        """The estimator's options for the command line the runner kind will use (its own)."""
        return runner_class(entry.runner).estimate_options(
            ctx=want.ctx,
            parallel=want.parallel,
            kv_type=want.kv_type,
            embedding=entry.config.embedding,
        )

    def _has_gpu(self) -> bool:
        return any(d.id != HOST_DEVICE for d in self.core.devices())

    # ---- options and keep-alive ----------------------------------------------------------------
    def _options(self, entry: ModelEntry, options: Mapping[str, Any] | None) -> LoadOptions:
        if not options:
            default = self._default_options.get(entry.name)
            if default is None:
                default = self._default_options[entry.name] = self._options_from(entry, {})
            return default
        return self._options_from(entry, options)

    def _options_from(self, entry: ModelEntry, options: Mapping[str, Any]) -> LoadOptions:
        cfg = entry.config
        opts = dict(options)
        ctx = _opt_int(opts, ("ctx", "num_ctx")) or cfg.ctx
        if ctx is None:
            ctx = self.settings.default_ctx
            trained = entry.context_length
            if trained:
                ctx = min(ctx, trained)
        parallel = _opt_int(opts, ("parallel", "num_parallel")) or cfg.parallel
        kv_type = opts.get("kv_type", cfg.kv_type)
        if not isinstance(kv_type, str):
            raise InvalidArgumentError(f"option kv_type must be a string, not {kv_type!r}")
        gpu: int | Literal["auto"] = cfg.gpu_layers
        for name in ("gpu_layers", "num_gpu"):
            if name in opts:
                value = opts[name]
                if value == "auto":
                    gpu = "auto"
                elif isinstance(value, int) and not isinstance(value, bool):
                    gpu = value
                else:
                    raise InvalidArgumentError(f"option {name} must be an int or 'auto'")
        return LoadOptions(
            ctx=ctx,
            parallel=parallel or self.settings.num_parallel,
            kv_type=kv_type,
            gpu_layers=gpu,
        )

    def _model_keep_alive(self, entry: ModelEntry) -> int:
        if entry.config.keep_alive is not None:
            return parse_keep_alive(entry.config.keep_alive)
        return self._default_keep_alive_ns

    async def _keep_alive_loop(self) -> None:
        """Unloads idle models whose keep-alive ran out; sleeps until the next expiry or change."""
        core = self.core
        while True:
            self._wake_timer.clear()
            now = self._clock.now_ns()
            for key in core.expired(now):
                inst = self._instances.get(key)
                if inst is None or inst.closing:
                    continue
                try:
                    core.begin_unload(key)
                except (ModelBusyError, InvalidStateError):
                    continue
                self._spawn(
                    self._stop_instance(inst, "keep-alive expired", "keep_alive_expired"),
                    f"expire-{key}",
                    stopper=True,
                )
            deadline = core.next_expiry()
            self._timer_deadline = deadline
            if deadline is None:
                await self._wake_timer.wait()
                continue
            sleeper = asyncio.ensure_future(self._clock.sleep_until(deadline))
            waker = asyncio.ensure_future(self._wake_timer.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
                await asyncio.gather(sleeper, waker, return_exceptions=True)

    async def _preload(self, name: str) -> None:
        try:
            lease = await self.load(name)
            log.info("preloaded %s in %.2f s", name, lease.load_duration_ns / 1e9)
        except ResidencyError as err:
            log.error("preloading %s failed: %s", name, err)

    # ---- plumbing ------------------------------------------------------------------------------
    def _notify(self) -> None:
        """Wakes every waiting request (and the timer): something was released, loaded or freed."""
        self._changed.set()
        self._changed = asyncio.Event()
        self._wake_timer.set()

    def _spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, stopper: bool = False
    ) -> asyncio.Task[Any]:
        """A task the scheduler keeps a reference to. Stoppers (runner stops) are awaited at
        shutdown, never cancelled: a half-stopped runner would outlive the scheduler."""
        task = asyncio.create_task(coro, name=f"residency-{name}")
        (self._stoppers if stopper else self._tasks).add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._stoppers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())


# ---- helpers over the parts other modules provide --------------------------------------------
def _discover(settings: Settings) -> tuple[MemoryProbe, list[DeviceInfo]]:
    """Devices from residency.memory (the simulated GPU when settings.simulated_device is set)."""
    if settings.simulated_device is not None:
        probe = open_probe("simulated", simulated_path=settings.simulated_device)
    else:
        probe = open_probe(settings.probe)
    return probe, discover_devices(probe)


def _estimate(entry: ModelEntry, **options: Any) -> Any:
    """residency.estimate for a configured model; a precise error for files it cannot read."""
    from residency.estimate import estimate

    try:
        return estimate(entry.path, **options)
    except EstimateError as err:
        if entry.runner == "command":
            raise EstimateError(
                f"{err}; give model {entry.name!r} a `memory` (bytes to reserve) in the config"
            ) from None
        raise


def _opt_int(opts: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in opts and opts[name] is not None:
            value = opts[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(
                    f"option {name} must be a positive integer, not {value!r}"
                )
            return value
    return None


def _copy_error(err: ResidencyError) -> ResidencyError:
    """A fresh exception per waiting request (one object raised in many tasks mixes tracebacks)."""
    if isinstance(err, RunnerError):
        copy = RunnerError.__new__(RunnerError)
        ResidencyError.__init__(copy, *err.args)
        copy.output_tail = err.output_tail
        return copy
    try:
        return type(err)(*err.args)
    except TypeError:
        return ResidencyError(str(err))


def _gib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
