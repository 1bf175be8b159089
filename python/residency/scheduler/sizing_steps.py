"""The driver's steps that size a request: its estimate, and partial offload when it fits on no
device whole (a part of ``Scheduler``, kept apart to keep the driver readable)."""

from __future__ import annotations

from residency._core import Action, Engine, ResidentSet
from residency.scheduler.clock import Clock
from residency.scheduler.executor import HOST_DEVICE
from residency.scheduler.requests import PendingRequest, shape_of
from residency.scheduler.sizing import Sizing

__all__ = ["SizingSteps"]


class SizingSteps:
    """Mixed into Scheduler, whose fields these are."""

    _sizing: Sizing
    _clock: Clock

    @property
    def engine(self) -> Engine:
        raise NotImplementedError  # Scheduler's

    @property
    def core(self) -> ResidentSet:
        raise NotImplementedError  # Scheduler's

    def _run(self, actions: list[Action]) -> None:
        raise NotImplementedError  # Scheduler's

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
