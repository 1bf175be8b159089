"""What the scheduler learns about each model while serving it: where its keep-alive came from
and who set it last, and how fast it decodes against its own history (scheduler.fallback)."""

from __future__ import annotations

import logging

from residency._core import ResidentSet
from residency.keepalive import KeepAliveOrigin
from residency.metrics import ResidencyMetrics
from residency.scheduler.fallback import DecodeSpeed

__all__ = ["Observations"]

log = logging.getLogger("residency.scheduler")


class Observations:
    def __init__(self, metrics: ResidencyMetrics) -> None:
        self._metrics = metrics
        #: Where each model's keep-alive came from and who set it last (/api/ps).
        self.keep_alive_origins: dict[str, KeepAliveOrigin] = {}
        self.speed = DecodeSpeed()

    def keep_alive_set(self, model: str, origin: KeepAliveOrigin) -> None:
        self.keep_alive_origins[model] = origin

    def decoded_alone(self, core: ResidentSet, model: str, tokens: int, ns: int) -> None:
        """A request's decode speed, counted only when it had its model to itself (requests that
        share a runner share its device, and each decodes slower)."""
        r = core.reservation(model)
        if r is not None and r.refcount == 1:
            self.decoded(model, tokens, ns / 1e9)

    def decoded(self, model: str, tokens: int, seconds: float) -> None:
        """One request's decode (taken alone: the caller checks it had the model to itself)."""
        change = self.speed.observe(model, tokens, seconds)
        if change is None:
            return
        state = self.speed.state(model)
        if change:
            log.warning(
                "%s decodes at %.1f tokens/s, below %.0f%% of its recent %.1f tokens/s: it may be "
                "running on the CPU (see PROCESSOR in `residency ps`)",
                model,
                state.recent_tps or 0.0,
                self.speed.bound * 100,
                state.baseline_tps or 0.0,
            )
            self._metrics.cpu_fallback(model, "slowdown")
        else:
            log.info("%s decodes at %.1f tokens/s again", model, state.recent_tps or 0.0)
