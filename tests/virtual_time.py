"""A virtual clock for asyncio and in-process fake runners that take their time on it, so the real
Scheduler can replay a trace exactly as the simulator does (tests only)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from residency.config import ModelConfig, load_settings
from residency.errors import RunnerError
from residency.memory import DeviceInfo
from residency.runners import LaunchSpec, Runner
from residency.scheduler import Scheduler

NS = 1_000_000_000
# Wake-up order at equal times, as the simulator orders its events.
SERVED, GONE, READY, TICK, ARRIVE = 0, 1, 2, 3, 4


class VirtualClock:
    """Time moves only when every task is blocked: then the earliest sleeper wakes (one at a time,
    ordered by deadline, then kind, then who slept first)."""

    def __init__(self) -> None:
        self.t = 0
        self._sleepers: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now_ns(self) -> int:
        return self.t

    async def sleep_until(self, deadline_ns: int, kind: int = TICK) -> None:
        if deadline_ns <= self.t:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline_ns, kind, next(self._seq), fut))
        await fut

    async def run_until(self, done: Callable[[], bool], settle: int = 60) -> None:
        while not done():
            for _ in range(settle):  # let every task run until it blocks
                await asyncio.sleep(0)
            if done():
                return
            while self._sleepers and self._sleepers[0][3].cancelled():
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                raise AssertionError("deadlock: nothing sleeps and the run is not done")
            deadline, _, _, fut = heapq.heappop(self._sleepers)
            self.t = deadline
            fut.set_result(None)


class FakeRunner:
    """A runner that loads in `load_s` and exits `lag_s` after a stop, on the virtual clock."""

    supports_offload = False

    def __init__(
        self,
        spec: LaunchSpec,
        on_exit: Callable[[Runner], None],
        clock: VirtualClock,
        load_s: float,
        lag_s: float,
    ) -> None:
        self.spec = spec
        self._on_exit = on_exit
        self._clock = clock
        self._load_ns = round(load_s * NS)
        self._lag_ns = round(lag_s * NS)
        self.exited = False
        self.stopping = False
        self.base_url = f"http://fake/{spec.name}"
        self.client: Any = None
        self.pid: int | None = None
        self.stalled: str | None = None

    async def start(self) -> None:
        pass

    async def wait_ready(self, stall_timeout_s: float, *, interval_s: float = 0.01) -> float:
        await self._clock.sleep_until(self._clock.now_ns() + self._load_ns, READY)
        return self._load_ns / NS

    async def ping(self, timeout_s: float = 10.0) -> bool:
        return not self.exited

    def vanished(self) -> bool:
        return self.exited

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        self.stopping = True
        if not self.exited:
            await self._clock.sleep_until(self._clock.now_ns() + self._lag_ns, GONE)
            self.exited = True
        return 0

    def crash(self) -> None:
        self.exited = True
        self._on_exit(cast(Runner, self))

    def reported_bytes(self) -> int | None:
        return None

    def buffer_report(self) -> dict[str, int]:
        return {}  # reports nothing: its placement is not judged

    def offloaded_layers(self) -> tuple[int, int] | None:
        return None

    def output_tail(self, lines: int = 40) -> str:
        return ""

    def error(self, what: str) -> RunnerError:
        return RunnerError(f"fake runner {self.spec.name}: {what}")

    def exit_description(self) -> str:
        return "exited"


def fake_scheduler(
    tmp_path: Path,
    models: dict[str, tuple[int, float]],
    *,
    budget: int,
    clock: VirtualClock,
    lag_s: float = 1.0,
    runners: list[FakeRunner] | None = None,
    journal: bool = False,
    **settings: Any,
) -> Scheduler:
    """A Scheduler on one simulated GPU of `budget` bytes whose models ({name: (bytes, load
    seconds)}) are served by FakeRunners on `clock`: no process, no socket, no probe."""
    configs = []
    for name, (nbytes, _) in models.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(b"fake")
        configs.append(
            ModelConfig(name=name, path=path, runner="command", command=["x"], memory=nbytes)
        )

    def factory(kind: str, spec: LaunchSpec, on_exit: Callable[[Runner], None]) -> Runner:
        runner = FakeRunner(spec, on_exit, clock, models[spec.name][1], lag_s)
        if runners is not None:
            runners.append(runner)
        return cast(Runner, runner)

    gpu = DeviceInfo(
        id="gpu0", index=0, name="sim", total_bytes=budget, free_bytes=budget, backend="simulated"
    )
    return Scheduler(
        load_settings(models=configs, **settings),
        clock=clock,
        runner_factory=factory,
        devices=[gpu],
        journal=journal,
    )
