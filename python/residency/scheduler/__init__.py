"""The asyncio scheduler: a driver of the core's scheduling engine (see driver.py).

The engine (C++, ``residency._core.Engine``) decides; this package carries out its decisions with
real runner processes, memory waits and timers, and hands requests their leases.
"""

from __future__ import annotations

from residency.scheduler.clock import Clock, MonotonicClock
from residency.scheduler.driver import Scheduler
from residency.scheduler.executor import RunnerFactory
from residency.scheduler.lease import Lease, LoadOptions, ResidentModel

__all__ = [
    "Clock",
    "Lease",
    "LoadOptions",
    "MonotonicClock",
    "ResidentModel",
    "RunnerFactory",
    "Scheduler",
]
