"""Carries out the engine's Load and Stop actions: runner processes, memory waits, measurements.

Owns what the core never touches — processes, sockets, the recovery watcher — and reports back what
happened (ready, gone, failed) through the driver. Decides nothing: which model loads where, and
which stops, came from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from residency._core import StopCause
from residency.config import Settings
from residency.errors import ResidencyError, RunnerError
from residency.memory import MemoryProbe
from residency.metrics import ResidencyMetrics
from residency.registry import ModelEntry
from residency.runners import LaunchSpec, Runner, runner_class
from residency.runners.choice import kv_persistence, resolve_kind
from residency.scheduler.clock import Clock
from residency.scheduler.device_memory import HOST_DEVICE, DeviceMemory
from residency.scheduler.fallback import Placement, judge_placement
from residency.scheduler.host_cache import HostCache
from residency.scheduler.lease import LoadOptions
from residency.scheduler.sizing import gib
from residency.scheduler.tasks import Tasks
from residency.watcher import Watcher

__all__ = ["HOST_DEVICE", "Executor", "Instance", "RunnerFactory", "Tasks", "default_runner"]

log = logging.getLogger("residency.scheduler")


#: The metrics' name for each engine stop cause (failed runners count as crashes or failed loads).
_EVICTION_REASON = {
    StopCause.MAKE_ROOM: "make_room",
    StopCause.RELOAD: "reload",
    StopCause.EXPIRED: "keep_alive_expired",
    StopCause.UNLOAD: "unload_request",
}

#: Makes the runner for a launch spec: (runner kind, spec, exit callback) → Runner (tests: fakes).
RunnerFactory = Callable[[str, LaunchSpec, Callable[[Runner], None]], Runner]


def default_runner(kind: str, spec: LaunchSpec, on_exit: Callable[[Runner], None]) -> Runner:
    return runner_class(kind)(spec, on_exit=on_exit)


class Events(Protocol):
    """What the executor reports to the driver (which feeds the engine)."""

    def runner_ready(self, inst: Instance, load_s: float, measured: int | None) -> None: ...
    def runner_gone(self, key: str) -> None: ...
    def runner_failed(self, inst: Instance, reason: str) -> None: ...


@dataclass(eq=False)
class Instance:
    """One residency of a model: the process side of the core's reservation."""

    key: str
    entry: ModelEntry
    options: LoadOptions
    device: str
    device_index: int
    gpu_layers: int
    #: Every GPU the runner uses: one, or all of them for a sched_spread device.
    device_indices: tuple[int, ...] = ()
    runner: Runner | None = None
    #: Set when loading ended, well or not (`failure` says which).
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failure: ResidencyError | None = None
    #: Where the runner really put the model (a GPU device's runner that reported it).
    placement: Placement | None = None


class Executor:
    def __init__(
        self,
        *,
        settings: Settings,
        clock: Clock,
        probe: MemoryProbe | None,
        watcher: Watcher | None,
        device_index: dict[str, tuple[int, ...]],
        runner_factory: RunnerFactory,
        events: Events,
        tasks: Tasks,
        metrics: ResidencyMetrics,
        host_cache: HostCache | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        #: Free bytes per device, and the wait for victims' memory to come back.
        self.memory = DeviceMemory(probe, watcher, device_index, settings.recovery_timeout_s)
        self._runner_factory = runner_factory
        self._events = events
        self._tasks = tasks
        self._metrics = metrics
        #: The model files' page cache (None: left to the kernel).
        self.host_cache = host_cache
        #: Models loading or ready (one runner per model key at a time: the engine's guarantee).
        self.instances: dict[str, Instance] = {}
        #: Runners being stopped, until they have exited.
        self.stopping: dict[str, tuple[Instance, asyncio.Task[None]]] = {}

    def create(
        self, key: str, entry: ModelEntry, options: LoadOptions, device: str, gpu_layers: int
    ) -> Instance:
        inst = Instance(
            key=key,
            entry=entry,
            options=options,
            device=device,
            device_index=self.memory.indices_of(device)[0],
            device_indices=self.memory.indices_of(device),
            gpu_layers=gpu_layers,
        )
        self.instances[key] = inst
        return inst

    def load(self, inst: Instance, victims: list[str], freed_bytes: int, needed: int) -> None:
        stops = [self.stopping[v][1] for v in victims if v in self.stopping]
        self._tasks.spawn(self._load(inst, stops, freed_bytes, needed), f"load-{inst.key}")

    def prefetch(self, key: str, path: Path) -> None:
        """A request waits for ``key``, not resident: read its file ahead if the tier admits it."""
        if self.host_cache is not None:
            self.host_cache.waiting(key, path, self._clock.now_ns())

    def stop(
        self, key: str, why: str, *, evicted: bool, cause: StopCause
    ) -> asyncio.Task[None] | None:
        """Stops the model's runner (the engine already moved it to Unloading); reports gone."""
        inst = self.instances.pop(key, None)
        if inst is None:
            return None
        reason = _EVICTION_REASON.get(cause)  # failures are counted where they are noticed
        if reason is not None:
            self._metrics.evicted(key, reason)
        # A runner that already exited holds no memory: the engine hears at once, and the task
        # only reaps what is left of its group and closes its client.
        exited = inst.runner is not None and inst.runner.exited
        kill = evicted or cause == StopCause.FAILED  # a hung runner ignores SIGTERM anyway
        task = self._tasks.spawn(
            self._stop(inst, why, kill, report=not exited), f"stop-{key}", stopper=True
        )
        if exited:
            self._events.runner_gone(key)
        else:
            self.stopping[key] = (inst, task)
        return task

    # ---- loading and stopping -------------------------------------------------------------------
    async def _load(
        self, inst: Instance, stops: list[asyncio.Task[None]], freed_bytes: int, needed: int
    ) -> None:
        t0 = self._clock.now_ns()
        phases: list[float] = [time.monotonic()]  # real time of each phase's end, for the log
        try:
            free_before = self.memory.free_on(inst.device)
            # When the device already shows the memory this load needs (a host with RAM to spare
            # beyond the configured budget), the victims' exit need not be awaited before the
            # spawn; with another load in flight its pending allocation is not visible, so no.
            overlap = bool(stops) and (
                free_before is not None
                and free_before >= needed
                and not self._other_load_in_flight(inst)
            )
            host = self.host_cache
            if host is not None and stops and not overlap:  # prefetch while the victims drain
                host.waiting(inst.key, inst.entry.path, self._clock.now_ns())
            if not overlap:
                await asyncio.shield(asyncio.gather(*stops))
            phases.append(time.monotonic())
            if not overlap:
                freed = freed_bytes if stops else 0
                await self.memory.await_memory(inst.key, inst.device, free_before, freed, needed)
            phases.append(time.monotonic())
            runner = self._make_runner(inst)
            inst.runner = runner
            if host is not None:
                host.mapped(inst.key, inst.entry.path, self._clock.now_ns())
            free_at_spawn = None if overlap else self.memory.free_on(inst.device)
            await runner.start()
            await runner.wait_ready(self.settings.load_timeout_s())
            await asyncio.shield(asyncio.gather(*stops))
            phases.append(time.monotonic())
            load_s = (self._clock.now_ns() - t0) / 1e9
            measured = self._measure(runner, inst, free_at_spawn)
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
                gib(measured) if measured else "none",
                gib(needed),
            )
            inst.placement = judge_placement(inst, runner, needed, self._metrics)
            inst.ready.set()
            if host is not None:
                host.loaded(inst.key, self._clock.now_ns())
            self._metrics.loaded(inst.key, load_s)
            self._events.runner_ready(inst, load_s, measured)
        except BaseException as err:
            failure = (
                err
                if isinstance(err, ResidencyError)
                else RunnerError(f"loading {inst.key!r} failed: {err!r}")
            )
            if isinstance(err, asyncio.CancelledError):
                failure = ResidencyError(f"loading {inst.key!r} was cancelled (shutting down)")
            inst.failure = failure
            log.warning("load of %s failed: %s", inst.key, failure)
            if isinstance(err, Exception):  # not a cancellation (shutdown)
                self._metrics.load_failed(inst.key)
            # The engine voids the requests granted on it and asks for the runner's stop; they
            # learn of the failure once it is gone (ready is set then), its memory free again.
            self._events.runner_failed(inst, str(failure))
            if not isinstance(err, Exception):
                raise

    async def _stop(self, inst: Instance, why: str, evicted: bool, *, report: bool) -> None:
        """An eviction has a load waiting for the memory, and the core guarantees the victim is
        idle: it gets `evict_grace_s` (default 0: SIGKILL at once, as Ollama kills its runners)
        instead of the graceful `stop_timeout_s`, which costs llama-cpp-python 0.2-0.3 s."""
        log.info("stopping %s: %s", inst.key, why)
        grace = self.settings.evict_grace_s if evicted else self.settings.stop_timeout_s
        try:
            if inst.runner is not None:
                with contextlib.suppress(Exception):
                    await inst.runner.stop(grace)
        finally:
            if self.stopping.get(inst.key, (None,))[0] is inst:
                del self.stopping[inst.key]
            if self.host_cache is not None and inst.runner is not None:
                self.host_cache.unmapped(inst.key, self._clock.now_ns())
            if report:
                self._events.runner_gone(inst.key)
            if not inst.ready.is_set():  # stopped while loading: its waiters fail now
                inst.failure = inst.failure or ResidencyError(f"{inst.key!r} was stopped: {why}")
                inst.ready.set()

    def on_runner_exit(self, runner: Runner) -> None:
        inst = self.instances.get(runner.spec.name)
        if inst is None or inst.runner is not runner or runner.stopping:
            return
        if not inst.ready.is_set():
            return  # wait_ready sees the exit and the load task handles it
        self.runner_died(
            inst, runner.stalled or f"exited unexpectedly ({runner.exit_description()})"
        )

    def runner_died(self, inst: Instance, what: str) -> None:
        """A ready runner exited or hung: fail it; the engine frees it and asks for its stop."""
        assert inst.runner is not None
        inst.failure = inst.runner.error(what)
        self._metrics.crashed(inst.key)
        self._events.runner_failed(inst, what)

    async def shutdown(self) -> None:
        """Stops every runner (loads were cancelled by the caller)."""
        instances = list(self.instances.values()) + [i for i, _ in self.stopping.values()]
        self.instances.clear()
        for inst in instances:
            inst.failure = inst.failure or ResidencyError("the scheduler is shutting down")
            inst.ready.set()
        await asyncio.gather(
            *(i.runner.stop(self.settings.stop_timeout_s) for i in instances if i.runner),
            return_exceptions=True,
        )
        if self.host_cache is not None:
            await self.host_cache.aclose()

    def _measure(self, runner: Runner, inst: Instance, free_at_spawn: int | None) -> int | None:
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
        free_now = self.memory.free_on(inst.device)
        if free_now is None or free_now >= free_at_spawn:
            return None
        return free_at_spawn - free_now

    def _other_load_in_flight(self, inst: Instance) -> bool:
        return any(
            i is not inst and i.device == inst.device and not i.ready.is_set()
            for i in self.instances.values()
        )

    def _make_runner(self, inst: Instance) -> Runner:
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
            device_indices=inst.device_indices,
            env=dict(cfg.env),
            health_path=cfg.health_path if cfg.runner == "command" else None,
            timeouts=self.settings.upstream_timeouts(),
            args=tuple(cfg.args),
            embedding=cfg.embedding,
            chat_format=cfg.chat_format,
            command=cfg.command,
            binary=self.settings.llama_server,
            kv=kv_persistence(self.settings, cfg),
            flash_attention=cfg.flash_attention,
            details=inst.entry.details,
            projectors=tuple(cfg.projectors),
        )
        kind = resolve_kind(cfg.runner, self.settings)
        return self._runner_factory(kind, spec, self.on_runner_exit)
