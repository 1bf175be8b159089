"""Crash loops back off: a model whose runner keeps failing is retried less and less often.

Each model has a streak: its runner's consecutive failures (a failed load, a crash, a runner that
stopped answering), reset by the first request it serves to the end. The 1st failure reloads at
once (a lone crash is not a loop); from the 2nd, the next load waits ``failure_backoff_s``,
doubling each time — requests arriving meanwhile wait with it (**backoff**). At
``circuit_failures`` the circuit **opens**: requests get 503 with the last failure's reason and
Retry-After until ``circuit_cooldown_s`` has passed (doubling with each further failure); then the
next request's load is the trial (**half-open**) — served to the end, it closes the circuit.

The driver owns this state (one instance, on its clock); the engine keeps deciding placement and
the queue, and learns of failures through ``failed()`` as before. Pure and clock-injected: every
call takes ``now_ns``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from residency.config_faults import FaultSettings
from residency.errors import ServerBusyError

__all__ = ["Circuit", "CircuitOpenError"]

log = logging.getLogger("residency.scheduler")

#: The longest failure reason kept (it is shown to clients, in /api/ps and in the log).
_REASON_CHARS = 200


class CircuitOpenError(ServerBusyError):
    """The model failed too often in a row; HTTP 503 with Retry-After."""

    code = "model_failing"


@dataclass
class _Streak:
    failures: int
    reason: str
    #: Until when (monotonic ns) no load may start; a circuit open (half-open once passed).
    retry_at_ns: int


class Circuit:
    """Per-model failure streaks, backoff and circuit state (see the module doc)."""

    def __init__(
        self, settings: FaultSettings, on_open: Callable[[str], None] | None = None
    ) -> None:
        self._settings = settings
        self._streaks: dict[str, _Streak] = {}
        #: Told the model's name each time its circuit opens (a metric counts it).
        self._on_open = on_open

    def failed(self, key: str, reason: str, now_ns: int) -> None:
        """`key`'s runner failed (failed load, crash, timeout)."""
        s = self._settings
        line = (reason.strip().splitlines() or ["failed"])[0][:_REASON_CHARS]
        streak = self._streaks.get(key)
        n = 1 if streak is None else streak.failures + 1
        if n >= s.circuit_failures:
            delay = s.circuit_cooldown_s * 2.0 ** (n - s.circuit_failures)
        elif n >= 2:
            delay = s.failure_backoff_s * 2.0 ** (n - 2)
        else:
            delay = 0.0
        delay = min(delay, s.failure_backoff_max_s)
        self._streaks[key] = _Streak(n, line, now_ns + int(delay * 1e9))
        if n >= s.circuit_failures:
            if self._on_open is not None:
                self._on_open(key)
            log.error("%s failed %d times in a row (last: %s): circuit open for %g s",
                      key, n, line, delay)  # fmt: skip
        elif delay > 0:
            log.warning("%s failed %d times in a row (last: %s): next load in %g s",
                        key, n, line, delay)  # fmt: skip

    def succeeded(self, key: str) -> None:
        """A request on `key` was served to the end: its streak is over."""
        streak = self._streaks.pop(key, None)
        if streak is not None and streak.failures > 1:
            log.info("%s served again after %d failures: circuit closed", key, streak.failures)

    @property
    def failing(self) -> bool:
        """Any streak at all (the hot path asks this first)."""
        return bool(self._streaks)

    def wait_ns(self, key: str, now_ns: int) -> int:
        """How long a request for `key` must wait before its load may start (0: now).

        Raises CircuitOpenError while the circuit is open."""
        streak = self._streaks.get(key)
        if streak is None or now_ns >= streak.retry_at_ns:
            return 0
        left = streak.retry_at_ns - now_ns
        if streak.failures >= self._settings.circuit_failures:
            retry = max(1, math.ceil(left / 1e9))
            raise CircuitOpenError(
                f"model {key!r} failed {streak.failures} times in a row "
                f"(last: {streak.reason}); not retried for {retry} s",
                retry_after_s=retry,
            )
        return left

    def state(self, key: str, now_ns: int) -> str | None:
        """ "backoff", "open", "half_open", "closed" (failed, but no wait), or None."""
        streak = self._streaks.get(key)
        if streak is None:
            return None
        tripped = streak.failures >= self._settings.circuit_failures
        if now_ns >= streak.retry_at_ns:
            return "half_open" if tripped else "closed"
        return "open" if tripped else "backoff"

    def rows(self, now_ns: int) -> list[dict[str, Any]]:
        """One row per failing model, for /api/ps and the metrics."""
        return [
            {
                "name": key,
                "state": self.state(key, now_ns),
                "failures": s.failures,
                "last_error": s.reason,
                "retry_in_s": max(0.0, round((s.retry_at_ns - now_ns) / 1e9, 3)),
            }
            for key, s in sorted(self._streaks.items())
        ]
