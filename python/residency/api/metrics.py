"""Per-request accounting: one structured log line, and the request's metrics.

The metric families themselves are residency.metrics'; this module only feeds them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from residency.api._types import LeaseLike
from residency.api.errors import ClientDisconnected, api_error, short
from residency.metrics import ResidencyMetrics

__all__ = ["RequestRecord"]

access_log = logging.getLogger("residency.access")

#: The status of a request whose client went away before its answer (nginx's 499).
CLIENT_CLOSED = 499


class RequestRecord:
    """What one request did, written once when it ends (to the log and the counters)."""

    __slots__ = (
        "_metrics",
        "api",
        "cold",
        "endpoint",
        "error",
        "finished",
        "key",
        "leased",
        "load_ns",
        "model",
        "queue_ns",
        "status",
        "stream",
        "t_start",
        "total_ns",
    )

    def __init__(self, metrics: ResidencyMetrics, api: str, endpoint: str) -> None:
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
        #: The name of the API key the request authenticated with ("" without keys).
        self.key = ""
        metrics.in_flight.inc()

    def took(self, lease: LeaseLike) -> None:
        self.leased = True
        self.cold = lease.cold
        self.load_ns = lease.load_duration_ns
        self.queue_ns = lease.queue_duration_ns

    def first_event(self, at_ns: int) -> None:
        """The runner's first streamed event arrived (perf ns): the time to first token."""
        if self.model:
            self._metrics.ttft.labels(self.model).observe((at_ns - self.t_start) / 1e9)

    def fail(self, err: BaseException) -> None:
        """Ends the record for a request that raised before (or instead of) answering."""
        if isinstance(err, ClientDisconnected | asyncio.CancelledError):
            self.finish(CLIENT_CLOSED)
        else:
            e = api_error(err)
            self.finish(e.status, e.message)

    def end_stream(self, error: BaseException | None) -> None:
        """Ends the record of a stream: clean, cut by the client, or ended by an error line."""
        if isinstance(error, ClientDisconnected):
            self.finish(CLIENT_CLOSED)
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
        self._observe()
        if access_log.isEnabledFor(logging.INFO):
            fields = {
                "api": self.api,
                "endpoint": self.endpoint,
                "model": short(self.model) if self.model else "-",
                "status": status,
                "stream": self.stream,
                "cold": self.cold,
                "load_ms": round(self.load_ns / 1e6, 3),
                "queue_ms": round(self.queue_ns / 1e6, 3),
                "total_ms": round(self.total_ns / 1e6, 3),
            }
            if self.key:
                fields["key"] = self.key
            if error:
                fields["error"] = error.splitlines()[0][:200] if error else ""
            access_log.info(
                " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()),
                extra={"residency_request": fields},
            )

    def _observe(self) -> None:
        m = self._metrics
        m.in_flight.dec()
        m.requests.labels(self.api, self.endpoint, str(self.status)).inc()
        m.request_duration.labels(self.api, self.endpoint).observe(self.total_ns / 1e9)
        if self.leased and self.model:
            m.leases.labels(self.model).inc()
            m.queue_wait.labels(self.model).observe(self.queue_ns / 1e9)
            if self.cold:
                m.cold_requests.labels(self.model).inc()
                m.load_duration.labels(self.model).observe(self.load_ns / 1e9)


def _logfmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
