"""Carries out the core's host-tier decisions on the real page cache: warm, drop, measure.

The core's :class:`residency.HostTier` decides which model files stay warm in RAM; this executes
its actions with the kernel's own interfaces (:mod:`residency.pagecache`) and feeds it facts. All
file I/O runs in threads, off the event loop; at most one warm reads at a time (the disk is shared
with the loads themselves) and each can be cancelled between chunks. A file a runner maps is never
dropped: the tier knows which files are mapped, and this re-checks before every drop.

The tier counts files, not models: two models on one file (two names, or two symlinks to one blob
as in the Hugging Face cache) are one entry of its bytes, and both are told when it warms.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from residency import pagecache
from residency._core import HostAction, HostActionKind, HostTier

__all__ = ["HostCache", "make_host_cache"]

log = logging.getLogger("residency.scheduler")
#: (model key, bytes of its file warm in RAM).
WarmListener = Callable[[str, int], None]
NS = 1_000_000_000
#: Files smaller than this are left to the kernel: they read in milliseconds either way.
MIN_FILE = 64 << 20


class HostCache:
    """One host's page cache for model files: the core's tier plus the I/O that carries it out."""

    def __init__(
        self,
        budget_bytes: int,
        half_life_s: float = 300.0,
        *,
        min_file_bytes: int = MIN_FILE,
        on_warm: WarmListener | None = None,
    ) -> None:
        self.tier = HostTier(budget_bytes, round(half_life_s * NS))
        #: Told a file's warm bytes when they change: the engine's tier-aware eviction reads them.
        self.on_warm: WarmListener = on_warm or (lambda key, nbytes: None)
        self.min_file_bytes = min_file_bytes
        self._paths: dict[str, Path] = {}  # model key → its file, symlinks resolved
        #: The tier's keys (a file's resolved path) → the models using that file.
        self._models: dict[str, set[str]] = {}
        #: Runners mapping each file now: two models may share one file.
        self._mapped: dict[Path, int] = {}
        self._warming: dict[str, threading.Event] = {}  # file → its warm's cancel flag
        self._io = asyncio.Semaphore(1)
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- events from the executor (each returns at once; the I/O runs in the background) ------
    def waiting(self, key: str, path: Path, now_ns: int) -> None:
        """A load of ``key`` must wait (victims draining, a queue): prefetch it if admitted."""
        file = self._register(key, path)
        self._run(self.tier.waiting(file, _size(self._paths[key]), now_ns))

    def mapped(self, key: str, path: Path, now_ns: int) -> None:
        """A runner starts on ``key``'s file (it maps it until it exits)."""
        file = self._register(key, path)
        real = self._paths[key]
        self._mapped[real] = self._mapped.get(real, 0) + 1
        self._cancel(file)  # the runner reads it now; a prefetch would only compete
        if self._mapped[real] == 1:
            self._run(self.tier.mapped(file, True, now_ns))

    def loaded(self, key: str, now_ns: int) -> None:
        """The runner of ``key`` is ready: it read the whole file."""
        path = self._paths.get(key)
        if path is not None:
            size = _size(path)
            self._tell(str(path), size)  # the runner read it all: warm now, whatever is kept
            self._run(self.tier.loaded(str(path), size, now_ns))

    def unmapped(self, key: str, now_ns: int) -> None:
        """A runner of ``key`` exited."""
        path = self._paths.get(key)
        if path is None or path not in self._mapped:
            return
        left = self._mapped[path] - 1
        if left > 0:
            self._mapped[path] = left  # another runner still maps the file
            return
        del self._mapped[path]
        self._run(self.tier.mapped(str(path), False, now_ns))

    # ---- facts --------------------------------------------------------------------------------
    async def measure(self, key: str, now_ns: int) -> int | None:
        """Bytes of ``key``'s file in RAM now, as mincore sees it (None: file unknown)."""
        path = self._paths.get(key)
        if path is None:
            return None
        try:
            warm = await asyncio.to_thread(pagecache.resident_bytes, path)
        except OSError as err:
            log.warning("page cache: cannot measure %s: %s", path, err)
            return None
        self._tell(str(path), warm)
        self._run(self.tier.measured(str(path), warm, now_ns))
        return warm

    def kept(self, key: str) -> bool:
        """Whether the tier keeps ``key``'s file warm."""
        path = self._paths.get(key)
        return path is not None and self.tier.kept(str(path))

    def kept_of(self, key: str) -> int:
        """Bytes of ``key``'s file the tier keeps warm (its first bytes)."""
        path = self._paths.get(key)
        return 0 if path is None else self.tier.kept_of(str(path))

    def warm_bytes(self, key: str) -> int | None:
        """Bytes of ``key``'s file in RAM now (mincore; a few ms for a large file)."""
        path = self._paths.get(key)
        if path is None:
            return None
        try:
            return pagecache.resident_bytes(path)
        except OSError:
            return None

    async def aclose(self) -> None:
        for key in list(self._warming):
            self._cancel(key)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- carrying out -------------------------------------------------------------------------
    def _register(self, key: str, path: Path) -> str:
        """Notes ``key``'s file; returns the tier's key for it."""
        real = Path(os.path.realpath(path))
        self._paths[key] = real
        self._models.setdefault(str(real), set()).add(key)
        return str(real)

    def _tell(self, file: str, nbytes: int) -> None:
        """Every model on ``file``: it has ``nbytes`` warm (the engine's tier-aware eviction)."""
        for key in self._models.get(file, ()):
            self.on_warm(key, nbytes)

    def _run(self, actions: list[HostAction]) -> None:
        for a in actions:
            path = Path(a.key) if a.key in self._models else None
            # The file's size decides, not the action's bytes: a drop's bytes are only the tail
            # it gives up, and a large file's small tail must go as the tier decided.
            if path is None or _size(path) < self.min_file_bytes:
                continue
            if a.kind == HostActionKind.WARM:  # its first a.bytes (the tier may keep a part)
                if a.key not in self._warming:
                    # Registered now, so that the load that follows can cancel it even before
                    # it had its turn at the disk.
                    self._warming[a.key] = threading.Event()
                    self._spawn(self._warm(a.key, path, self._warming[a.key], a.bytes))
            elif path not in self._mapped:  # never drop what a runner maps (any entry's)
                self._cancel(a.key)
                self._tell(a.key, a.keep)
                self._spawn(self._drop(path, a.keep))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm(self, key: str, path: Path, cancel: threading.Event, nbytes: int) -> None:
        try:
            async with self._io:
                await asyncio.to_thread(pagecache.warm, path, cancelled=cancel, limit=nbytes)
            if not cancel.is_set():
                self._tell(key, min(nbytes, _size(path)))
        except OSError as err:
            log.warning("page cache: cannot warm %s: %s", path, err)
        finally:
            self._warming.pop(key, None)

    async def _drop(self, path: Path, keep: int = 0) -> None:
        try:
            await asyncio.to_thread(pagecache.drop, path, keep=keep)
        except OSError as err:
            log.warning("page cache: cannot drop %s: %s", path, err)

    def _cancel(self, key: str) -> None:
        cancel = self._warming.get(key)
        if cancel is not None:
            cancel.set()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def make_host_cache(
    budget_bytes: int | None, half_life_s: float, on_warm: WarmListener | None = None
) -> HostCache | None:
    """The configured host cache: ``budget_bytes`` None is half the RAM available now, 0 none."""
    if budget_bytes is None:
        budget_bytes = _available_ram() // 2
    if budget_bytes <= 0:
        return None
    return HostCache(budget_bytes, half_life_s, on_warm=on_warm)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
