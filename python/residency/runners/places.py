"""A request's place at its runner: how many requests a runner is sent at once is bounded
(:class:`residency.runners.protocol.RunnerApi`'s ``in_flight``); a request takes one place at its
first call and keeps it until it gives it back, so all its calls count once."""

from __future__ import annotations

import asyncio

__all__ = ["Place"]


class Place:
    """One request's place at its runner: taken at its first call, kept until given back."""

    def __init__(self, places: asyncio.Semaphore | None) -> None:
        self._places = places
        self._held = False

    async def take(self) -> None:
        if self._places is None or self._held:
            return
        await self._places.acquire()
        if self._held:  # another call of the same request took it meanwhile
            self._places.release()
        else:
            self._held = True

    def give_back(self) -> None:
        if self._held and self._places is not None:
            self._held = False
            self._places.release()
