"""Per-request accounting: one structured log line and the Prometheus counters behind /metrics.

Kept in-process and lock-free (everything runs on the event loop); rendering reads the scheduler's
resident set at scrape time so the gauges are never stale copies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence

from residency.api._types import LeaseLike, ResidentLike
from residency.api.errors import ClientDisconnected, api_error

__all__ = ["Metrics", "RequestRecord"]

access_log = logging.getLogger("residency.access")


class Metrics:
    """Counters since start. Labels are bounded: endpoints and configured model names only."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.duration_sum: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.duration_count: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.cold_loads: defaultdict[str, int] = defaultdict(int)
        self.load_seconds: defaultdict[str, float] = defaultdict(float)
        self.queue_seconds: defaultdict[str, float] = defaultdict(float)
        self.leases: defaultdict[str, int] = defaultdict(int)
        self.in_flight = 0

    def observe(self, rec: RequestRecord) -> None:
        self.requests[(rec.api, rec.endpoint, str(rec.status))] += 1
        key = (rec.api, rec.endpoint)
        self.duration_sum[key] += rec.total_ns / 1e9
        self.duration_count[key] += 1
        if rec.leased and rec.model:
            self.leases[rec.model] += 1
            self.queue_seconds[rec.model] += rec.queue_ns / 1e9
            if rec.cold:
                self.cold_loads[rec.model] += 1
                self.load_seconds[rec.model] += rec.load_ns / 1e9

    def render(self, resident: Sequence[ResidentLike], configured: int) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("residency_http_requests_total", "counter", "HTTP requests by endpoint, status.")
        for (api, endpoint, status), n in sorted(self.requests.items()):
            out.append(
                f"residency_http_requests_total{_labels(api=api, endpoint=endpoint, status=status)}"
                f" {n}"
            )
        family("residency_http_request_duration_seconds", "summary", "Time to the last byte.")
        for (api, endpoint), total in sorted(self.duration_sum.items()):
            labels = _labels(api=api, endpoint=endpoint)
            out.append(f"residency_http_request_duration_seconds_sum{labels} {total:.9f}")
            count = self.duration_count[(api, endpoint)]
            out.append(f"residency_http_request_duration_seconds_count{labels} {count}")
        family("residency_http_requests_in_flight", "gauge", "Requests being served now.")
        out.append(f"residency_http_requests_in_flight {self.in_flight}")
        family("residency_leases_total", "counter", "Requests that held a model, by model.")
        for model, n in sorted(self.leases.items()):
            out.append(f"residency_leases_total{_labels(model=model)} {n}")
        family(
            "residency_queue_duration_seconds_total", "counter", "Time requests waited for a model."
        )
        for model, s in sorted(self.queue_seconds.items()):
            out.append(f"residency_queue_duration_seconds_total{_labels(model=model)} {s:.9f}")
        family("residency_cold_requests_total", "counter", "Requests that had to load their model.")
        for model, n in sorted(self.cold_loads.items()):
            out.append(f"residency_cold_requests_total{_labels(model=model)} {n}")
        family(
            "residency_load_duration_seconds_total",
            "counter",
            "load_duration of cold requests (queueing, eviction, recovery and start).",
        )
        for model, s in sorted(self.load_seconds.items()):
            out.append(f"residency_load_duration_seconds_total{_labels(model=model)} {s:.9f}")
        family("residency_models_configured", "gauge", "Models clients may ask for.")
        out.append(f"residency_models_configured {configured}")
        family("residency_model_resident", "gauge", "1 per resident model, by device and state.")
        for r in resident:
            labels = _labels(model=r.name, device=r.device, state=r.state)
            out.append(f"residency_model_resident{labels} 1")
        family("residency_model_reserved_bytes", "gauge", "Bytes the scheduler reserved.")
        for r in resident:
            out.append(
                f"residency_model_reserved_bytes{_labels(model=r.name, device=r.device)} {r.bytes}"
            )
        family("residency_model_measured_bytes", "gauge", "Bytes the runner reported using.")
        for r in resident:
            if r.measured_bytes is not None:
                labels = _labels(model=r.name, device=r.device)
                out.append(f"residency_model_measured_bytes{labels} {r.measured_bytes}")
        family("residency_model_refcount", "gauge", "Requests holding each resident model.")
        for r in resident:
            out.append(f"residency_model_refcount{_labels(model=r.name)} {r.refcount}")
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class RequestRecord:
    """What one request did, written once when it ends (to the log and the counters)."""

    __slots__ = (
        "_metrics",
        "api",
        "cold",
        "endpoint",
        "error",
        "finished",
        "leased",
        "load_ns",
        "model",
        "queue_ns",
        "status",
        "stream",
        "t_start",
        "total_ns",
    )

    def __init__(self, metrics: Metrics, api: str, endpoint: str) -> None:
        self._metrics = metrics
        self.api = api
        self.endpoint = endpoint
        self.t_start = time.perf_counter_ns()
        self.model = ""
        self.stream = False
        self.leased = False
        self.cold = False
        self.load_ns = 0
        self.queue_ns = 0
        self.status: int | str = 0
        self.error = ""
        self.total_ns = 0
        self.finished = False
        metrics.in_flight += 1

    def took(self, lease: LeaseLike) -> None:
        self.leased = True
        self.cold = lease.cold
        self.load_ns = lease.load_duration_ns
        self.queue_ns = lease.queue_duration_ns

    def fail(self, err: BaseException) -> None:
        """Ends the record for a request that raised before (or instead of) answering."""
        if isinstance(err, ClientDisconnected | asyncio.CancelledError):
            self.finish("disconnected")
        else:
            e = api_error(err)
            self.finish(e.status, e.message)

    def end_stream(self, error: BaseException | None) -> None:
        """Ends the record of a stream: clean, cut by the client, or ended by an error line."""
        if isinstance(error, ClientDisconnected):
            self.finish("disconnected")
        elif error is not None or self.error:
            self.finish("stream_error", self.error or str(error))
        else:
            self.finish(200)

    def finish(self, status: int | str, error: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        self.status = status
        self.error = error
        self.total_ns = time.perf_counter_ns() - self.t_start
        self._metrics.in_flight -= 1
        self._metrics.observe(self)
        if access_log.isEnabledFor(logging.INFO):
            fields = {
                "api": self.api,
                "endpoint": self.endpoint,
                "model": self.model or "-",
                "status": status,
                "stream": self.stream,
                "cold": self.cold,
                "load_ms": round(self.load_ns / 1e6, 3),
                "queue_ms": round(self.queue_ns / 1e6, 3),
                "total_ms": round(self.total_ns / 1e6, 3),
            }
            if error:
                fields["error"] = error.splitlines()[0][:200] if error else ""
            access_log.info(
                " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()),
                extra={"residency_request": fields},
            )


def _logfmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
