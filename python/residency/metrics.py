"""residency's Prometheus metrics, on prometheus-client, in a registry of their own.

Embedders mount :attr:`ResidencyMetrics.registry` wherever they like (or nowhere); the server
serves it at ``/metrics``. Events are counted as they happen (the scheduler's loads, evictions
and crashes; the API's requests); the state of devices and resident models is read from the
scheduler at scrape time, so those gauges are never stale copies. Labels are bounded: configured
model names, device ids, endpoints, statuses and a fixed set of reasons. Every family is listed
in the README's "Metrics" section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "EVICTION_REASONS", "ResidencyMetrics", "StateSource"]

#: What :meth:`ResidencyMetrics.render` writes: the classic text format.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Why a resident model stopped being resident (the `reason` label of evictions).
EVICTION_REASONS = ("make_room", "keep_alive_expired", "unload_request", "crash", "reload")

# Loads take seconds to minutes; queue waits and first tokens from milliseconds up.
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class StateSource(Protocol):
    """What the gauges are read from at scrape time (the scheduler)."""

    def resident(self) -> Sequence[Any]: ...
    def models(self) -> Sequence[Any]: ...
    def device_usage(self) -> Sequence[tuple[Any, int | None]]: ...
    def failing(self) -> Sequence[Any]: ...
    def host_tier(self) -> Any: ...


class ResidencyMetrics:
    """Every metric family residency exports, registered in :attr:`registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.source: StateSource | None = None
        # ---- requests (the API) ----
        self.requests = Counter(
            "residency_http_requests",
            "HTTP requests by endpoint and status.",
            ("api", "endpoint", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "residency_http_request_duration_seconds",
            "Time to the last byte of the answer.",
            ("api", "endpoint"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "residency_http_requests_in_flight", "Requests being served now.", registry=r
        )
        self.leases = Counter(
            "residency_leases", "Requests that held a model, by model.", ("model",), registry=r
        )
        self.cold_requests = Counter(
            "residency_cold_requests",
            "Requests that had to load their model.",
            ("model",),
            registry=r,
        )
        self.queue_wait = Histogram(
            "residency_queue_duration_seconds",
            "Time requests waited for their model (queueing, eviction, recovery and load).",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.load_duration = Histogram(
            "residency_load_duration_seconds",
            "Cold requests' load_duration, as Ollama counts it (queue, eviction, recovery, start).",
            ("model",),
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "residency_time_to_first_token_seconds",
            "Request received to the runner's first streamed event.",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # ---- the scheduler's events ----
        self.loads = Counter(
            "residency_model_loads",
            "Runners started and ready (cold loads).",
            ("model",),
            registry=r,
        )
        self.runner_load_seconds = Histogram(
            "residency_model_load_seconds",
            "A cold load's own time: victims stopped, memory back, runner started and ready.",
            ("model",),
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "residency_model_load_failures", "Loads that failed.", ("model",), registry=r
        )
        self.evictions = Counter(
            "residency_evictions",
            "Resident models stopped, by reason: " + ", ".join(EVICTION_REASONS) + ".",
            ("model", "reason"),
            registry=r,
        )
        self.crashes = Counter(
            "residency_runner_crashes",
            "Ready runners that exited or stopped answering.",
            ("model",),
            registry=r,
        )
        self.circuit_opens = Counter(
            "residency_model_circuit_opens",
            "Times a model's circuit opened after consecutive runner failures.",
            ("model",),
            registry=r,
        )
        self.queue_timeouts = Counter(
            "residency_queue_timeouts",
            "Requests that waited in the queue past queue_timeout_s (answered 503).",
            ("model",),
            registry=r,
        )
        self.reloads = Counter(
            "residency_config_reloads",
            "Configuration reloads (SIGHUP or POST /api/residency/reload), by result: ok, failed.",
            ("result",),
            registry=r,
        )
        self.watchdog_failures = Counter(
            "residency_watchdog_failures",
            "Failures the watchdog noticed, by check: event_loop, decision_loop, recovery_watcher, "
            "idle_runner, thrash, queue.",
            ("check",),
            registry=r,
        )
        self.healthy = Gauge(
            "residency_healthy",
            "1 when /health answers ok, 0 when the watchdog sees a failure.",
            registry=r,
        )
        #: Called with (event, model) on every load ("loaded") and eviction (its reason): the
        #: watchdog's thrash check listens.
        self.listeners: list[Callable[[str, str], None]] = []
        self.cpu_fallbacks = Counter(
            "residency_cpu_fallbacks",
            "Models caught running on the CPU: `placement` (the runner put less on the GPU than "
            "planned) or `slowdown` (decode speed fell below half its recent median).",
            ("model", "kind"),
            registry=r,
        )
        r.register(_StateCollector(self))

    # ---- what the scheduler reports ---------------------------------------------------------
    def loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model).inc()
        self.runner_load_seconds.labels(model).observe(seconds)
        for listener in self.listeners:
            listener("loaded", model)

    def load_failed(self, model: str) -> None:
        self.load_failures.labels(model).inc()

    def evicted(self, model: str, reason: str) -> None:
        if reason not in EVICTION_REASONS:
            raise ValueError(f"unknown eviction reason {reason!r}")
        self.evictions.labels(model, reason).inc()
        for listener in self.listeners:
            listener(reason, model)

    def circuit_opened(self, model: str) -> None:
        self.circuit_opens.labels(model).inc()

    def cpu_fallback(self, model: str, kind: str) -> None:
        if kind not in ("placement", "slowdown"):
            raise ValueError(f"unknown CPU fallback kind {kind!r}")
        self.cpu_fallbacks.labels(model, kind).inc()

    def crashed(self, model: str) -> None:
        self.crashes.labels(model).inc()
        self.evicted(model, "crash")

    # ---- exposition -------------------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in Prometheus' text format (:data:`CONTENT_TYPE`)."""
        text: bytes = generate_latest(self.registry)
        return text


class _StateCollector(Collector):
    """Gauges of the scheduler's state, read when scraped."""

    def __init__(self, metrics: ResidencyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: names are fixed and unique

    def collect(self) -> Iterator[Metric]:
        source = self._metrics.source
        configured = GaugeMetricFamily("residency_models_configured", "Models clients may ask for.")
        device = {
            name: GaugeMetricFamily(f"residency_device_{name}_bytes", text, labels=("device",))
            for name, text in (
                ("total", "The device's memory."),
                ("budget", "What residency may reserve on it (total less the overhead)."),
                ("reserved", "Bytes reserved for resident models."),
                ("free", "Free bytes as the device's probe reports them now."),
            )
        }
        resident = GaugeMetricFamily(
            "residency_model_resident",
            "1 per resident model, by device and state.",
            labels=("model", "device", "state"),
        )
        per_model = {
            name: GaugeMetricFamily(f"residency_model_{name}", text, labels=("model", "device"))
            for name, text in (
                ("reserved_bytes", "Bytes the scheduler reserved."),
                ("measured_bytes", "Bytes the runner reported using."),
                ("estimated_bytes", "Bytes the estimator expected."),
                (
                    "warm_bytes",
                    'Bytes of the model\'s file in host RAM (mincore); device "": not loaded.',
                ),
            )
        }
        refcount = GaugeMetricFamily(
            "residency_model_refcount", "Requests holding each resident model.", labels=("model",)
        )
        failing = GaugeMetricFamily(
            "residency_model_consecutive_failures",
            "Runner failures in a row, by model and state (backoff, open, half_open, closed).",
            labels=("model", "state"),
        )
        fallback = _FallbackGauges()
        host = {
            name: GaugeMetricFamily(f"residency_host_cache_{name}_bytes", text)
            for name, text in (
                ("budget", "Bytes of model files the host tier may keep warm in RAM."),
                ("kept", "Bytes of the model files the host tier keeps warm."),
            )
        }
        if source is not None:
            configured.add_metric([], len(source.models()))
            for f in source.failing():
                failing.add_metric([f["name"], f["state"]], f["failures"])
            for usage, free in source.device_usage():
                device["total"].add_metric([usage.id], usage.total_bytes)
                device["budget"].add_metric([usage.id], usage.budget_bytes)
                device["reserved"].add_metric([usage.id], usage.reserved_bytes)
                if free is not None:
                    device["free"].add_metric([usage.id], free)
            rows = source.resident()
            for m in rows:
                resident.add_metric([m.name, m.device, m.state], 1)
                per_model["reserved_bytes"].add_metric([m.name, m.device], m.bytes)
                if m.measured_bytes is not None:
                    per_model["measured_bytes"].add_metric([m.name, m.device], m.measured_bytes)
                per_model["estimated_bytes"].add_metric([m.name, m.device], m.estimated_bytes)
                if m.warm_bytes is not None:
                    per_model["warm_bytes"].add_metric([m.name, m.device], m.warm_bytes)
                refcount.add_metric([m.name], m.refcount)
                fallback.add(m)
            tier = source.host_tier()
            if tier is not None:
                host["budget"].add_metric([], tier.budget_bytes)
                host["kept"].add_metric([], tier.kept_bytes)
                loaded = {m.name for m in rows}
                for f in tier.files:  # warm in RAM, not loaded: on no device
                    if f.name not in loaded:
                        per_model["warm_bytes"].add_metric([f.name, ""], f.warm_bytes)
        yield configured
        yield from device.values()
        yield resident
        yield from per_model.values()
        yield from host.values()
        yield refcount
        yield failing
        yield from fallback.families()
        yield from _kv_counters()


class _FallbackGauges:
    """Each resident model's real GPU share and decode speed (scheduler.fallback)."""

    def __init__(self) -> None:
        self.gpu_fraction = GaugeMetricFamily(
            "residency_model_gpu_fraction",
            "Share of the model's memory the runner placed on its GPU (0 on the host device).",
            labels=("model", "device"),
        )
        self.cpu_fallback = GaugeMetricFamily(
            "residency_model_cpu_fallback",
            "1 when the runner placed less of the model on the GPU than planned.",
            labels=("model",),
        )
        self.tps = GaugeMetricFamily(
            "residency_model_decode_tokens_per_second",
            "Median decode speed of the model's last requests.",
            labels=("model",),
        )
        self.slow = GaugeMetricFamily(
            "residency_model_decode_slowdown",
            "1 when the model decodes at less than half its recent median speed.",
            labels=("model",),
        )

    def add(self, m: Any) -> None:
        size = m.size or 0
        self.gpu_fraction.add_metric([m.name, m.device], m.size_vram / size if size else 0.0)
        placement = getattr(m, "placement", None)
        self.cpu_fallback.add_metric(
            [m.name], 0 if placement is None or placement.fallback == "none" else 1
        )
        speed = getattr(m, "decode_speed", None)
        if speed is not None and speed.recent_tps is not None:
            self.tps.add_metric([m.name], speed.recent_tps)
            self.slow.add_metric([m.name], 1 if speed.slow else 0)

    def families(self) -> Iterator[Metric]:
        yield from (self.gpu_fraction, self.cpu_fallback, self.tps, self.slow)


def _kv_counters() -> Iterator[Metric]:
    """KV slots saved before runners stopped and restored into their successors, by model."""
    from residency.runners.kvcache import KV_STATS

    for field, text in (
        ("saved", "llama-server slots saved before their runner stopped."),
        ("saved_bytes", "Bytes of slots saved."),
        ("restored", "Saved slots restored into a new runner."),
        ("restored_bytes", "Bytes of slots restored."),
        ("failed", "Slot saves or restores that failed (served by a normal prefill)."),
    ):
        family = CounterMetricFamily(f"residency_kv_{field}", text, labels=("model",))
        for model, stats in sorted(KV_STATS.items()):
            family.add_metric([model], getattr(stats, field))
        yield family
