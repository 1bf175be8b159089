"""Silent CPU fallback, caught: where a runner really put a model, and whether its decode speed
dropped against its own history.

llama.cpp does not fail when a model does not go to the GPU as asked (a CPU-only build, a driver
that is not found, memory taken by another process): it runs, at single-digit tokens per second.
Two signals catch it: the runner's own report of its buffers and offloaded layers, compared with
what the scheduler planned (:func:`placement_of`), and each model's decode speed compared with
its recent past (:class:`DecodeSpeed`, pure: samples in, verdicts out).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from residency.llamacpp import is_gpu_buffer

if TYPE_CHECKING:  # the executor imports this module
    from residency.metrics import ResidencyMetrics
    from residency.runners import Runner
    from residency.scheduler.executor import Instance

__all__ = ["DecodeSpeed", "Placement", "SpeedState", "judge_placement", "placement_of"]

log = logging.getLogger("residency.scheduler")

Fallback = Literal["none", "partial", "cpu"]

#: Without a layer count, GPU buffers below this share of the reservation mean a partial offload.
_GPU_SHARE_EXPECTED = 0.5


@dataclass(frozen=True)
class Placement:
    """Where a runner put a model, from its buffer lines and "offloaded N/M layers" line."""

    gpu_bytes: int
    host_bytes: int
    layers_on_gpu: int | None
    layers: int | None
    #: Less on the GPU than planned: "partial", or "cpu" (nothing on it); "none" as planned.
    fallback: Fallback

    @property
    def split(self) -> bool:
        """Whether part of the model runs on the CPU (planned or not): ps shows the split."""
        if self.fallback != "none":
            return True
        return self.layers is not None and (self.layers_on_gpu or 0) < self.layers

    def describe(self, device: str, planned_layers: int) -> str:
        """The warning's text: how much went where, against the plan, and the likely causes."""
        from residency.scheduler.sizing import gib

        layers = "" if self.layers is None else f", {self.layers_on_gpu}/{self.layers} layers"
        return (
            f"runs {'entirely' if self.fallback == 'cpu' else 'partly'} on the CPU: the runner "
            f"put {gib(self.gpu_bytes)} on {device} and {gib(self.host_bytes)} on the host"
            f"{layers} (planned: {'all' if planned_layers < 0 else planned_layers} layers); "
            "expect far slower answers (a CPU-only runner build, a missing driver, or GPU memory "
            "taken by another process)"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "gpu_bytes": self.gpu_bytes,
            "host_bytes": self.host_bytes,
            "layers_on_gpu": self.layers_on_gpu,
            "layers": self.layers,
            "cpu_fallback": self.fallback,
        }


def judge_placement(
    inst: Instance, runner: Runner, reserved: int, metrics: ResidencyMetrics
) -> Placement | None:
    """Where a GPU runner put its model; a warning and a count when less went to the GPU than
    planned (a silent CPU fallback: the runner works, at a fraction of the speed)."""
    if inst.device == "host":
        return None
    p = placement_of(
        runner.buffer_report(),
        runner.offloaded_layers(),
        planned_layers=inst.gpu_layers,
        reserved_bytes=reserved,
    )
    if p is not None and p.fallback != "none":
        log.warning("%s %s", inst.key, p.describe(inst.device, inst.gpu_layers))
        metrics.cpu_fallback(inst.key, "placement")
    return p


def placement_of(
    buffers: Mapping[str, int],
    offloaded: tuple[int, int] | None,
    *,
    planned_layers: int,
    reserved_bytes: int,
) -> Placement | None:
    """A GPU runner's placement; None when it reported nothing to judge by.

    `buffers` as Runner.buffer_report() gives them ({"CUDA0/model": bytes, ...}); `planned_layers`
    the layers it was started with (-1 = all); `reserved_bytes` what the scheduler reserved.
    """
    if not buffers and offloaded is None:
        return None
    gpu = sum(b for k, b in buffers.items() if is_gpu_buffer(k.split("/")[0]))
    host = sum(b for k, b in buffers.items() if not is_gpu_buffer(k.split("/")[0]))
    fallback: Fallback = "none"
    if offloaded is not None:
        on_gpu, layers = offloaded
        wanted = layers if planned_layers < 0 else min(planned_layers, layers)
        if on_gpu < wanted:
            fallback = "cpu" if on_gpu == 0 else "partial"
        return Placement(gpu, host, on_gpu, layers, fallback)
    if gpu == 0 and host > 0:
        fallback = "cpu"
    elif planned_layers < 0 and gpu < _GPU_SHARE_EXPECTED * reserved_bytes:
        fallback = "partial"
    return Placement(gpu, host, None, None, fallback)


@dataclass(frozen=True)
class SpeedState:
    """A model's decode speed now against its history (tokens per second)."""

    baseline_tps: float | None
    recent_tps: float | None
    slow: bool

    def as_json(self) -> dict[str, object]:
        return {
            "baseline_tokens_per_s": _round(self.baseline_tps),
            "recent_tokens_per_s": _round(self.recent_tps),
            "slowdown": self.slow,
        }


class DecodeSpeed:
    """Each model's decode speed against its own recent history.

    A sample is one request's generated tokens over its decode time (first to last token), taken
    only when it decoded alone (concurrent requests share the device) and long enough to mean
    something. The model is *slow* when the median of its last `recent` samples is below `bound`
    times the median of the `history` samples before them (default 0.5: slower by more than 2×;
    a CPU fallback is 5-20× slower, run-to-run noise far less). Samples taken while slow do not
    enter the baseline, so a lasting fallback stays flagged until the speed comes back.
    """

    def __init__(
        self,
        *,
        bound: float = 0.5,
        recent: int = 3,
        history: int = 32,
        min_history: int = 5,
        min_tokens: int = 16,
    ) -> None:
        if not 0 < bound < 1:
            raise ValueError(f"bound must be between 0 and 1, not {bound}")
        self.bound = bound
        self._recent_n = recent
        self._history_n = history
        self._min_history = min_history
        self.min_tokens = min_tokens
        self._baseline: dict[str, deque[float]] = {}
        self._recent: dict[str, deque[float]] = {}
        self._slow: set[str] = set()

    def observe(self, model: str, tokens: int, seconds: float) -> bool | None:
        """Takes one request's decode; returns True when the model just became slow, False when
        it just recovered, None when nothing changed (or the sample was too short to count)."""
        if tokens < self.min_tokens or seconds <= 0:
            return None
        tps = tokens / seconds
        recent = self._recent.setdefault(model, deque(maxlen=self._recent_n))
        baseline = self._baseline.setdefault(model, deque(maxlen=self._history_n))
        if len(recent) == recent.maxlen and model not in self._slow:
            baseline.append(recent[0])  # the oldest recent sample, before it drops out
        recent.append(tps)
        was = model in self._slow
        now = self.state(model).slow
        if now:
            self._slow.add(model)
        else:
            self._slow.discard(model)
        return None if now == was else now

    def state(self, model: str) -> SpeedState:
        recent = self._recent.get(model)
        baseline = self._baseline.get(model)
        recent_tps = statistics.median(recent) if recent else None
        if not baseline or len(baseline) < self._min_history:
            return SpeedState(None, recent_tps, False)
        base = statistics.median(baseline)
        full = recent is not None and len(recent) == self._recent_n
        slow = full and recent_tps is not None and recent_tps < self.bound * base
        return SpeedState(base, recent_tps, slow)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
