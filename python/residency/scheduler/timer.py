"""The keep-alive timer: tells the engine that time passed when its next deadline comes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from residency._core import Action, Engine
from residency.scheduler.clock import Clock

__all__ = ["KeepAliveTimer"]


class KeepAliveTimer:
    """Sleeps until the engine's next deadline (a keep-alive expiry), then ticks it; woken early
    when a deadline sooner than the one it sleeps for appears (never on every request)."""

    def __init__(self, engine: Engine, clock: Clock, run: Callable[[list[Action]], None]) -> None:
        self._engine = engine
        self._clock = clock
        self._run = run
        self._wake = asyncio.Event()
        #: The deadline the loop sleeps until (None: until woken).
        self._deadline: int | None = None

    def changed(self) -> None:
        """The engine's next deadline may have moved: wake the loop only if it is sooner."""
        soonest = self._engine.next_deadline()
        if soonest is not None and (self._deadline is None or soonest < self._deadline):
            self._wake.set()

    async def run(self) -> None:
        engine = self._engine
        while True:
            self._wake.clear()
            self._run(engine.tick(self._clock.now_ns()))
            deadline = engine.next_deadline()
            self._deadline = deadline
            if deadline is None:
                await self._wake.wait()
                continue
            sleeper = asyncio.ensure_future(self._clock.sleep_until(deadline))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
                await asyncio.gather(sleeper, waker, return_exceptions=True)
