"""Upstream timeouts: a request whose runner stopped answering fails within a bound.

A runner can stop answering without exiting: stopped (SIGSTOP), deadlocked, wedged in a driver
call. Its requests would wait for ever. A plain time-to-first-byte limit cannot tell that apart
from a slow prefill (a long prompt on a CPU legitimately takes minutes before the first token), so
the main rule looks at the runner itself: a request fails once the runner sent it nothing **and**
the runner's processes did no work — no CPU time, no I/O, no page faults — for ``stall_s``. A busy
prefill burns CPU and is never cut short; a stopped or deadlocked runner is noticed in ``stall_s``.

Two plain limits complete it, for a runner that spins without answering: ``chunk_s`` between two
chunks of an answer that has started, and ``first_byte_s`` before the first byte (off by
default, for the prefill above). The watch runs only while requests are in flight, one task per
runner, and costs the hot path a timestamp per read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from residency.runners.http import UpstreamTimeout

if TYPE_CHECKING:
    from residency.runners.http import _Connection

__all__ = ["UpstreamTimeouts", "UpstreamWatch", "tree_progress"]

log = logging.getLogger(__name__)

#: Processes of one runner's tree read for its progress (a runner is a handful).
_MAX_TREE = 64


@dataclass(frozen=True)
class UpstreamTimeouts:
    """Seconds; 0 turns a limit off."""

    #: No byte for the request and no work done by the runner for this long: it has stalled.
    stall_s: float = 60.0
    #: The first byte of an answer, however busy the runner looks (off: prefill can be long).
    first_byte_s: float = 0.0
    #: Between two chunks of an answer that has started, however busy the runner looks.
    chunk_s: float = 300.0

    @property
    def enabled(self) -> bool:
        return any(t > 0 for t in (self.stall_s, self.first_byte_s, self.chunk_s))

    @property
    def check_every_s(self) -> float:
        """How often the watch looks: a quarter of the shortest limit, within [0.05 s, 1 s]."""
        shortest = min(t for t in (self.stall_s, self.first_byte_s, self.chunk_s) if t > 0)
        return min(1.0, max(0.05, shortest / 4))


def tree_progress(pid: int | None) -> tuple[int, ...]:
    """CPU ticks, major faults and bytes read by `pid` and its descendants: any work changes it.

    Descendants count because a runner may be a wrapper whose child does the work; a process
    that has exited drops out (the sum may fall, which is a change all the same)."""
    if pid is None:
        return ()
    ticks = faults = rchar = 0
    todo, seen = [pid], 0
    while todo and seen < _MAX_TREE:
        p = todo.pop()
        seen += 1
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(stat[11]) + int(stat[12])  # utime + stime
            faults += int(stat[9])  # majflt: paging the model in from disk is work (minor
            # faults are not: a new thread's stack makes some, and a wedged server still spawns)
        except (OSError, IndexError, ValueError):
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            rchar += int(Path(f"/proc/{p}/io").read_text().split()[1])
        with contextlib.suppress(OSError), contextlib.suppress(ValueError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return (ticks, faults, rchar, seen)


class UpstreamWatch:
    """Fails the connections of one runner whose answers stop coming (see the module doc)."""

    def __init__(
        self,
        timeouts: UpstreamTimeouts,
        progress: Callable[[], tuple[int, ...]],
        name: str,
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        self.timeouts = timeouts
        self._progress = progress
        self._name = name
        #: Told why, once per failed connection (the runner: it is replaced).
        self._on_timeout = on_timeout
        self._task: asyncio.Task[None] | None = None

    def busy(self, connections: set[_Connection]) -> None:
        """A connection was taken: watch until none is busy (RunnerClient.on_busy)."""
        if self.timeouts.enabled and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(
                self._run(connections), name=f"upstream-watch-{self._name}"
            )

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self, connections: set[_Connection]) -> None:
        marker = self._progress()
        worked_at = time.monotonic()
        while connections:
            await asyncio.sleep(self.timeouts.check_every_s)
            now = time.monotonic()
            current = self._progress()
            if current != marker:
                marker, worked_at = current, now
            for conn in list(connections):
                why = self.overdue(conn, now, worked_at)
                if why is not None:
                    log.warning("runner for %s: %s", self._name, why)
                    conn.fail(UpstreamTimeout(why))
                    if self._on_timeout is not None:
                        self._on_timeout(why)

    def overdue(self, conn: _Connection, now: float, worked_at: float) -> str | None:
        """Why `conn` must fail now, or None."""
        if conn.complete or conn.closed or conn.paused or conn.sent_at == 0.0:
            return None  # answered, gone, or the client is the slow one
        t = self.timeouts
        started = conn.received_any
        quiet_since = conn.last_data_at if started else conn.sent_at
        silent = now - quiet_since
        what = "between two chunks" if started else "before the first byte"
        if t.stall_s > 0 and now - max(quiet_since, worked_at) > t.stall_s:
            return f"sent nothing and did no work for {t.stall_s:g} s {what} (stalled)"
        if started and t.chunk_s > 0 and silent > t.chunk_s:
            return f"sent nothing for {t.chunk_s:g} s between two chunks"
        if not started and t.first_byte_s > 0 and silent > t.first_byte_s:
            return f"sent no answer within {t.first_byte_s:g} s"
        return None
