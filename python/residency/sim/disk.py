"""The host's one disk in the simulator, shared by every read at once (a fluid model).

Loads read in the foreground and share the disk's bandwidth equally (two loads at once each take
twice as long as one alone); prefetches read in the background (as an ``ionice`` idle class would)
and progress only while no load reads, sharing what is left equally. Without it, two concurrent
loads would each read at the full bandwidth, which would flatter any queue that runs loads side by
side against Ollama's one load at a time. Deterministic; times in integer nanoseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

NS = 1_000_000_000


@dataclass
class _Job:
    left: float  # bytes still to read
    done: float  # bytes read so far
    background: bool


class Disk:
    """Reads in flight on one disk of ``bytes_per_s``; call :meth:`advance` before every change."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bps = bytes_per_s
        self.jobs: dict[str, _Job] = {}
        self.now = 0
        #: Bumped at every change, so a scheduled completion event can tell it is stale.
        self.version = 0

    def _rates(self) -> tuple[float, float]:
        """Bytes per second each foreground and each background job reads now."""
        fore = sum(1 for j in self.jobs.values() if not j.background)
        back = len(self.jobs) - fore
        if fore:
            return self.bps / fore, 0.0
        return 0.0, (self.bps / back if back else 0.0)

    def advance(self, t: int) -> None:
        """Moves every read on to ``t``."""
        if t <= self.now:
            return
        elapsed = (t - self.now) / NS
        fore, back = self._rates()
        for j in self.jobs.values():
            step = min(j.left, elapsed * (back if j.background else fore))
            j.left -= step
            j.done += step
        self.now = t

    def start(self, job: str, nbytes: float, now: int, *, background: bool) -> None:
        self.advance(now)
        self.jobs[job] = _Job(max(0.0, float(nbytes)), 0.0, background)
        self.version += 1

    def finish(self, job: str, now: int) -> float:
        """Ends ``job`` (done or cancelled): returns the bytes it read."""
        self.advance(now)
        j = self.jobs.pop(job, None)
        if j is None:
            return 0.0
        self.version += 1
        return j.done

    def read(self, job: str, now: int) -> float:
        """Bytes ``job`` has read by ``now`` (0 if there is no such job)."""
        self.advance(now)
        j = self.jobs.get(job)
        return 0.0 if j is None else j.done

    def next_done(self) -> tuple[int, str] | None:
        """When the first running read completes at today's rates, and which."""
        fore, back = self._rates()
        best: tuple[int, str] | None = None
        for name, j in self.jobs.items():
            rate = back if j.background else fore
            if j.left <= 0.5:
                at = self.now
            elif rate <= 0:
                continue
            else:
                at = self.now + max(1, int(j.left / rate * NS + 0.999))
            if best is None or (at, name) < best:
                best = (at, name)
        return best
