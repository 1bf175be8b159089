"""The asyncio tasks the scheduler keeps a reference to (work, and runner stops)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["Tasks"]

log = logging.getLogger("residency.scheduler")


class Tasks:
    """Tasks the scheduler keeps a reference to. Stoppers (runner stops) are awaited at shutdown,
    never cancelled: a half-stopped runner would outlive the scheduler."""

    def __init__(self) -> None:
        self.work: set[asyncio.Task[Any]] = set()
        self.stoppers: set[asyncio.Task[Any]] = set()

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, stopper: bool = False
    ) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"residency-{name}")
        (self.stoppers if stopper else self.work).add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.work.discard(task)
        self.stoppers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())
