"""The watchdog: notices a stuck or thrashing scheduler and says so on ``/health``.

What it checks, every ``watchdog_interval_s``:

- **event_loop** — a heartbeat task measures how late the loop runs it; later than
  ``watchdog_loop_lag_s`` means something blocked the loop (every request stalls with it). A
  thread of its own logs the loop's stack while it is blocked, so the culprit is in the log.
- **decision_loop** — the engine's timer task (keep-alive expiries, queue deadlines) is alive and
  not behind its deadline.
- **recovery_watcher** — the recovery watcher's thread is running.
- **idle_runner** — every ``idle_ping_interval_s`` each idle, ready runner is pinged (not only at
  its next request); one that does not answer is stopped and its next request reloads it.
- **thrash** — more than ``thrash_reloads`` loads, within ``thrash_window_s``, of models that had
  been evicted to make room within that window.
- **queue** — a request timed out in the queue, or the oldest waits past its deadline.

A failure keeps ``/health`` red (503, with the reasons) for ``watchdog_hold_s`` after it was last
seen, so a prober polling every few seconds sees it; ``residency_watchdog_failures`` counts them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from residency._core import Engine, ReservationState
from residency.config import Settings
from residency.metrics import ResidencyMetrics
from residency.scheduler.executor import Executor, Instance
from residency.watcher import Watcher

__all__ = ["Health", "Watchdog"]

log = logging.getLogger("residency.watchdog")


@dataclass(frozen=True)
class Health:
    ok: bool
    #: check → why it failed (empty when ok).
    failures: dict[str, str] = field(default_factory=dict)
    #: Requests waiting now (queued, or for a load in progress).
    waiting: int = 0

    def as_json(self) -> dict[str, Any]:
        status = "ok" if self.ok else "unhealthy"
        return {"status": status, "failures": self.failures, "waiting": self.waiting}


class Watchdog:
    def __init__(
        self,
        settings: Settings,
        metrics: ResidencyMetrics,
        *,
        engine: Engine,
        executor: Executor,
        watcher: Watcher,
        engine_now_ns: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._engine = engine
        self._executor = executor
        self._watcher = watcher
        self._engine_now_ns = engine_now_ns  # the clock the engine's times are on
        self._clock = clock
        #: check → (why, red until): what /health reports.
        self._failures: dict[str, tuple[str, float]] = {}
        #: The event loop's last heartbeat (from the start: a loop that never runs it is stuck).
        self._beat = clock()
        self._evicted_at: dict[str, float] = {}
        self._thrash: collections.deque[tuple[float, str]] = collections.deque()
        self._pings: asyncio.Task[None] | None = None
        metrics.listeners.append(self._on_model_event)

    # ---- what /health reads --------------------------------------------------------------------
    def health(self) -> Health:
        now = self._clock()
        late = self._late(now)
        if late is not None:
            self.fail("event_loop", f"the event loop has not run for {late:.1f} s")
        failures = {c: why for c, (why, until) in self._failures.items() if until > now}
        self._metrics.healthy.set(0 if failures else 1)
        return Health(not failures, failures, self._engine.queued())

    def fail(self, check: str, why: str) -> None:
        """Notes a failure seen now (counted and logged once per episode)."""
        now = self._clock()
        known = self._failures.get(check)
        if known is None or known[1] <= now:
            self._metrics.watchdog_failures.labels(check).inc()
            log.warning("watchdog: %s: %s", check, why)
        self._failures[check] = (why, now + self._s.watchdog_hold_s)

    def timed_out(self, model: str, why: str) -> None:
        """A request waited in the queue past queue_timeout_s (the engine rejected it)."""
        self._metrics.queue_timeouts.labels(model).inc()
        self.fail("queue", why)

    # ---- the loop ------------------------------------------------------------------------------
    async def run(self, timer_task: Callable[[], asyncio.Task[None] | None]) -> None:
        interval = self._s.watchdog_interval_s
        stop = threading.Event()
        monitor = threading.Thread(
            target=self._monitor,
            args=(threading.get_ident(), stop),
            name="residency-watchdog",
            daemon=True,
        )
        self._beat = self._clock()
        monitor.start()
        next_ping = self._beat + self._s.idle_ping_interval_s
        try:
            while True:
                before = self._clock()
                await asyncio.sleep(interval)
                now = self._clock()
                self._beat = now
                lag = now - before - interval
                if lag > self._s.watchdog_loop_lag_s:
                    self.fail("event_loop", f"the event loop ran {lag:.1f} s late (blocked)")
                self._check(timer_task(), now)
                if self._s.idle_ping_interval_s > 0 and now >= next_ping:
                    next_ping = now + self._s.idle_ping_interval_s
                    if self._pings is None or self._pings.done():
                        self._pings = asyncio.create_task(self._ping_idle(), name="idle-pings")
                self.health()  # keeps the gauge current without a scrape of /health
        finally:
            self._metrics.listeners.remove(self._on_model_event)
            stop.set()
            if self._pings is not None:
                self._pings.cancel()
                await asyncio.gather(self._pings, return_exceptions=True)
            monitor.join(timeout=5)

    def _late(self, now: float) -> float | None:
        """How long the loop's heartbeat is overdue, if beyond the bound."""
        silent = now - self._beat
        bound = self._s.watchdog_interval_s + self._s.watchdog_loop_lag_s
        return silent if silent > bound else None

    def _check(self, timer: asyncio.Task[None] | None, now: float) -> None:
        if timer is not None and timer.done():
            why = "cancelled" if timer.cancelled() else repr(timer.exception())
            self.fail("decision_loop", f"the scheduler's timer task ended: {why}")
        now_ns = self._engine_now_ns()
        deadline = self._engine.next_deadline()
        behind = (now_ns - deadline) / 1e9 if deadline is not None else 0.0
        if behind > self._s.watchdog_interval_s + self._s.watchdog_loop_lag_s:
            self.fail("decision_loop", f"the scheduler's timer is {behind:.1f} s behind")
        if not self._watcher.running:
            self.fail("recovery_watcher", "the recovery watcher's thread is not running")
        oldest = self._engine.oldest_wait(now_ns) / 1e9
        bound = self._s.queue_timeout_s
        if bound > 0 and oldest > bound + self._s.watchdog_interval_s:
            self.fail("queue", f"a request has waited {oldest:.1f} s, past queue_timeout_s")

    async def _ping_idle(self) -> None:
        idle = [i for i in self._executor.instances.values() if self._idle(i)]
        results = await asyncio.gather(*(self._ping(i) for i in idle), return_exceptions=True)
        for inst, ok in zip(idle, results, strict=True):
            if (
                ok is True
                or not self._idle(inst)
                or self._executor.instances.get(inst.key) is not inst
            ):
                continue  # answered, or in use (or gone) since: its request sees for itself
            self.fail("idle_runner", f"{inst.key}'s idle runner stopped answering; replaced")
            self._executor.runner_died(inst, "stopped answering its health check while idle")

    def _idle(self, inst: Instance) -> bool:
        if inst.runner is None or inst.failure is not None or not inst.ready.is_set():
            return False
        r = self._engine.resident_set.reservation(inst.key)
        return r is not None and r.state == ReservationState.READY and r.refcount == 0

    async def _ping(self, inst: Instance) -> bool:
        assert inst.runner is not None
        return not inst.runner.exited and await inst.runner.ping(self._s.ping_timeout_s)

    def _on_model_event(self, event: str, model: str) -> None:
        """Thrash: loads of models that were evicted to make room shortly before."""
        now = self._clock()
        window = self._s.thrash_window_s
        if event == "make_room":
            self._evicted_at[model] = now
            return
        if event != "loaded" or now - self._evicted_at.get(model, -window - 1) > window:
            return
        self._thrash.append((now, model))
        while self._thrash and now - self._thrash[0][0] > window:
            self._thrash.popleft()
        if len(self._thrash) > self._s.thrash_reloads:
            models = ", ".join(sorted({m for _, m in self._thrash}))
            self.fail(
                "thrash",
                f"{len(self._thrash)} reloads of evicted models within {window:g} s ({models}): "
                "more models are in use than fit",
            )

    # ---- the monitor thread --------------------------------------------------------------------
    def _monitor(self, loop_thread: int, stop: threading.Event) -> None:
        """Logs, once per stall, where the blocked event loop is (it cannot log itself)."""
        reported = False
        while not stop.wait(self._s.watchdog_interval_s):
            late = self._late(self._clock())
            if late is None:
                reported = False
            elif not reported:
                reported = True
                frame = sys._current_frames().get(loop_thread)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
                log.error(
                    "watchdog: the event loop has not run for %.1f s; it is at:\n%s", late, stack
                )
