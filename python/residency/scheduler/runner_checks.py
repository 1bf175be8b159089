"""Checks of a ready runner around one request: before it is handed out, and after it failed.

A runner can die or hang between two requests; the exit may even be noticed by a request's
connection before the event loop reaps the process. These checks make sure a request right after
a crash meets a fresh runner instead of the corpse (the engine voids its grant; the driver asks
again and a new runner loads).
"""

from __future__ import annotations

import asyncio

from residency.runners import Runner
from residency.scheduler.executor import Executor, Instance
from residency.scheduler.lease import Lease

__all__ = ["PING_AFTER_IDLE_NS", "check_before_use", "exits_soon", "still_serving"]

#: A runner idle longer than this is pinged before it is handed out (it may have hung meanwhile).
PING_AFTER_IDLE_NS = 1_000_000_000


async def check_before_use(executor: Executor | None, inst: Instance, idle_ns: int) -> None:
    """Fails `inst` if its process has exited (reaped or not), or if it sat idle and fails its
    ping; the caller then asks for the model again."""
    assert inst.runner is not None
    assert executor is not None
    runner = inst.runner
    ok = not runner.vanished()
    if ok and idle_ns >= PING_AFTER_IDLE_NS:
        ok = await runner.ping(executor.settings.ping_timeout_s)
    if not ok and inst.failure is None:
        what = "exited" if runner.vanished() else "stopped answering its health check"
        executor.runner_died(inst, what)


async def exits_soon(runner: Runner, within_s: float = 0.25) -> bool:
    """Whether `runner` has exited or does within `within_s`: a runner that dropped a request
    unanswered is dying as a rule (its sockets close before its exit shows)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not runner.vanished():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def still_serving(executor: Executor | None, lease: Lease, fail_with: str | None = None) -> bool:
    """Whether the lease's runner is still its model's, unfailed; with `fail_with`, it is failed
    for that reason (the engine frees it and the next request loads a fresh one)."""
    inst = None if executor is None else executor.instances.get(lease.entry.name)
    if executor is None or inst is None or inst.runner is not lease.runner:
        return False
    if inst.failure is not None:
        return False
    if fail_with is not None:
        executor.runner_died(inst, fail_with)
    return True
