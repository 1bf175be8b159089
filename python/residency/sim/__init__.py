"""Trace-driven simulation of residency's scheduling on the real C++ core, with a virtual clock.

``make_trace`` builds a seeded synthetic workload; ``simulate`` replays it through the scheduling
engine the server runs (:class:`residency.Engine`: queue, admission, eviction, keep-alive) and
reports cold loads, load seconds, time to first token and idle memory, so queue disciplines and
eviction policies can be compared by measurement.
"""

from __future__ import annotations

from residency.sim.config import SimConfig, SimResult
from residency.sim.page_cache import LruPageCache
from residency.sim.simulator import simulate
from residency.sim.trace import ModelSpec, Trace, TraceConfig, make_trace

__all__ = [
    "LruPageCache",
    "ModelSpec",
    "SimConfig",
    "SimResult",
    "Trace",
    "TraceConfig",
    "make_trace",
    "simulate",
]
