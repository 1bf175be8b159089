"""The driver's part in admitting a request: estimating what it needs, and when it fits on no
device, retrying with the layers that fit on the largest GPU (partial offload) or failing it; and
what a reload does to the requests and runners of models whose configuration changed."""

from __future__ import annotations

from residency._core import Action, Engine, RejectCode, ResidentSet
from residency.errors import ResidencyError, ServerBusyError
from residency.registry import Registry
from residency.scheduler.clock import Clock
from residency.scheduler.executor import HOST_DEVICE, Tasks
from residency.scheduler.reload import ModelChanges, model_changes
from residency.scheduler.requests import PendingRequest, shape_of
from residency.scheduler.sizing import Sizing
from residency.scheduler.watchdog import Watchdog

__all__ = ["Admission"]


class Admission:
    """Mixed into the Scheduler: the Estimate and Reject actions' handling, and reloads."""

    _sizing: Sizing
    _tasks: Tasks
    _clock: Clock
    _requests: dict[int, PendingRequest]
    _registry: Registry
    watchdog: Watchdog | None

    @property
    def engine(self) -> Engine:
        raise NotImplementedError

    @property
    def core(self) -> ResidentSet:
        raise NotImplementedError

    def _run(self, actions: list[Action]) -> None:
        raise NotImplementedError

    def _reject(self, a: Action) -> None:
        req = self._requests.get(a.request)
        if req is None or req.granted.done():
            return  # a voided grant: the request sees its runner's failure
        if a.code in (RejectCode.BUSY, RejectCode.TIMED_OUT):
            if a.code == RejectCode.TIMED_OUT and self.watchdog is not None:
                self.watchdog.timed_out(a.key, a.reason)
            req.granted.set_exception(ServerBusyError(a.reason, retry_after_s=1.0))
        elif a.code == RejectCode.TOO_LARGE:
            self._tasks.spawn(self._too_large(req, a.reason), f"offload-{a.key}")
        else:
            req.granted.set_exception(ResidencyError(a.reason))

    async def _estimate(self, req: PendingRequest) -> None:
        try:
            sized = await self._sizing.needed(req.entry, req.want, self._has_gpu())
            req.bytes, req.gpu_layers = sized
        except Exception as err:
            self._run(self.engine.cancel(req.id, self._clock.now_ns()))
            if not req.granted.done():
                req.granted.set_exception(err)
            return
        self._run(self.engine.sized(req.id, req.bytes, self._clock.now_ns()))

    async def _too_large(self, req: PendingRequest, reason: str) -> None:
        """Fits on no device: retry with the layers that fit on the largest GPU, else fail."""
        try:
            budget = max(d.budget_bytes for d in self.core.devices()) if self._has_gpu() else None
            partial = await self._sizing.partial_offload(
                req.entry, req.want, req.bytes, req.gpu_layers, budget
            )
        except Exception as err:
            partial = None
            reason = f"{reason} (partial offload failed: {err})"
        if req.granted.done():
            return
        if partial is None:
            req.granted.set_exception(req.too_large(reason))
            return
        req.bytes, req.gpu_layers = partial
        now = self._clock.now_ns()
        shape = shape_of(req.want)
        self._run(
            self.engine.arrive(req.id, req.entry.name, shape, req.bytes, req.keep_alive_ns, now)
        )

    def _has_gpu(self) -> bool:
        return any(d.id != HOST_DEVICE for d in self.core.devices())

    def replace_models(self, registry: Registry) -> ModelChanges:
        """Serves `registry`'s models from now on (a reload): a changed model's runner serves
        the requests it has and then stops (newcomers wait for a fresh one); a removed one
        drains and stops; an added one loads on its first request. Requests still queued for a
        changed or removed model were sized for the old configuration: they get 503 + Retry-After
        (a retry resolves the new one)."""
        changes = model_changes(self._registry.entries(), registry.entries())
        self._registry, old = registry, self._registry
        old.close()
        gone = {*changes.changed, *changes.removed}
        for req in [r for r in self._requests.values() if r.entry.name in gone]:
            if not req.granted.done():
                self._run(self.engine.cancel(req.id, self._clock.now_ns()))
                why = f"model {req.entry.name!r} was reconfigured while this request waited"
                req.granted.set_exception(ServerBusyError(why))
        for name in sorted(gone):
            self._sizing.forget(name)
            self._run(self.engine.unload(name, self._clock.now_ns(), fresh=True))
        return changes
