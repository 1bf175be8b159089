"""Waiting for freed memory to show up again, on one C++ thread that never holds the GIL.

After a runner exits, drivers report its VRAM as free late (typically 0.5–1.5 s on CUDA). Loading
the next model before then risks an out-of-memory failure or a silent CPU fallback. A
:class:`Watcher` polls the device until it shows ≥ 75 % of the freed bytes again (Ollama's rule),
or already has the bytes the next load needs, or a timeout passes.

How a result reaches asyncio without the watcher thread touching Python: each event loop gets a
``CompletionQueue`` whose eventfd the loop watches with ``add_reader``. The C++ thread queues the
result and writes the eventfd; the loop wakes, drains the queue and completes the futures on its own
thread. No extra Python thread, no ``call_soon_threadsafe`` from C++, one fd per loop.

Poll schedule (defaults): a watch polls at once (after a crash the memory is usually back
already), then 1 ms later, each gap 1.5× the last, capped at 6 ms; at the cap every watch polls on
one shared clock-aligned grid, so concurrent watches share wake-ups. Recovery takes 0.5–1.5 s, so a
watch spends nearly all its life at the cap: the detection delay is uniform in [0, 6 ms] plus
wake-up and event-loop latency, and the cost is one wake-up per 6 ms. A wake-up, not the probe call
(~2 µs simulated, ~16 µs host), is most of that cost: ~45 µs of CPU on a 2-vCPU VM, so 6 ms is
~0.7–0.8 % of a core. ``python benchmarks/bench_recovery.py --sweep`` measures the curve; on that
VM a 4 ms cap cost 1.1 % of a core (over the 1 % budget) for a p50 of 2.7 ms, and 8 ms saved 0.2 %
for a p50 of 4.5 ms (too close to the 5 ms target).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from types import TracebackType

from residency._core import (
    CompletionQueue,
    MemoryProbe,
    RecoveryOutcome,
    RecoveryResult,
    RecoveryWatcher,
)
from residency.errors import InvalidStateError

__all__ = ["RecoveryOutcome", "RecoveryResult", "Watcher"]

DEFAULT_TIMEOUT_S = 5.0


class _Channel:
    """One event loop's end: the queue whose fd the loop watches, and the futures it completes.

    Holds no reference to its loop, so a closed loop can be collected (and its channel with it)."""

    def __init__(self) -> None:
        self.queue = CompletionQueue()
        self.futures: dict[int, asyncio.Future[RecoveryResult]] = {}

    def drain(self) -> None:
        # Runs on the loop's thread, called by the loop when the eventfd becomes readable.
        for watch_id, result in self.queue.drain():
            fut = self.futures.pop(watch_id, None)
            if fut is not None and not fut.done():
                fut.set_result(result)


class Watcher:
    """One C++ thread serving any number of concurrent recovery watches.

    Constructing starts nothing; ``start()`` (or the first watch) starts the thread and ``stop()``
    ends it — both idempotent; pending watches then complete as ``RecoveryOutcome.STOPPED``.
    Usable as a (sync or async) context manager. Thread-safe; any number of event loops may share
    one Watcher.
    """

    def __init__(
        self, *, initial_poll_s: float = 0.001, max_poll_s: float = 0.006, growth: float = 1.5
    ) -> None:
        self._core = RecoveryWatcher(
            initial_poll_s=initial_poll_s, max_poll_s=max_poll_s, growth=growth
        )
        # Guards _channels and _stopped.
        self._lock = threading.Lock()
        self._channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Channel] = (
            weakref.WeakKeyDictionary()
        )
        self._stopped = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self._stopped = False
        self._core.start()

    def stop(self) -> None:
        """Stops the thread (returns as soon as an in-flight probe call returns)."""
        with self._lock:
            self._stopped = True
        self._core.stop()

    @property
    def running(self) -> bool:
        return self._core.running

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Watcher:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _ensure_started(self) -> None:
        with self._lock:
            stopped = self._stopped
        if stopped:
            raise InvalidStateError("the recovery watcher was stopped: call start() to reuse it")
        self._core.start()

    # ---- watching ----------------------------------------------------------------------------
    async def recovered(
        self,
        probe: MemoryProbe,
        device_index: int,
        *,
        free_before: int,
        expected_freed: int,
        needed: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RecoveryResult:
        """Waits until device ``device_index`` shows ``free − free_before ≥ 75 % of expected_freed``
        or ``free ≥ needed`` (RECOVERED), ``timeout_s`` passes (TIMED_OUT) or the probe fails
        (PROBE_FAILED). Cancelling the awaiting task cancels the watch."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        channel = self._channel(loop)
        fut: asyncio.Future[RecoveryResult] = loop.create_future()
        watch_id = self._core.watch(
            probe,
            device_index,
            free_before=free_before,
            expected_freed=expected_freed,
            needed=needed,
            timeout_s=timeout_s,
            queue=channel.queue,
        )
        # Safe after watch(): the result can only be delivered by drain(), on this thread.
        channel.futures[watch_id] = fut
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                channel.futures.pop(watch_id, None)
                self._core.cancel(watch_id)

    def wait(
        self,
        probe: MemoryProbe,
        device_index: int,
        *,
        free_before: int,
        expected_freed: int,
        needed: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RecoveryResult:
        """Like :meth:`recovered`, blocking the calling thread (with the GIL released)."""
        self._ensure_started()
        return self._core.wait(
            probe,
            device_index,
            free_before=free_before,
            expected_freed=expected_freed,
            needed=needed,
            timeout_s=timeout_s,
        )

    def _channel(self, loop: asyncio.AbstractEventLoop) -> _Channel:
        with self._lock:
            channel = self._channels.get(loop)
            if channel is None:
                channel = _Channel()
                loop.add_reader(channel.queue.fd, channel.drain)
                self._channels[loop] = channel
            return channel

    # ---- introspection -----------------------------------------------------------------------
    @property
    def poll_schedule(self) -> tuple[float, float, float]:
        """(initial_poll_s, growth, max_poll_s)."""
        return (self._core.initial_poll_s, self._core.growth, self._core.max_poll_s)

    @property
    def pending(self) -> int:
        """Watches not yet completed."""
        return self._core.pending

    @property
    def queries(self) -> int:
        """Probe queries made so far (one query serves every due watch of a device)."""
        return self._core.queries

    def thread_cpu_s(self) -> float:
        """CPU time the watcher thread has used, in seconds."""
        return self._core.thread_cpu_ns() / 1e9

    def close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Forgets ``loop`` and stops watching its fd (a collected loop is forgotten anyway)."""
        with self._lock:
            channel = self._channels.pop(loop, None)
        if channel is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.remove_reader(channel.queue.fd)
