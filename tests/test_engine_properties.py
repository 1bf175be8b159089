"""Random arrival sequences through the engine (driven by the simulator), with both disciplines.

After every event: the budget invariant holds; loads start in FIFO order of the requests that
wait (the oldest waiting request is the one a load is for); a request passes an older waiting one
only by the discipline's rule — Ollama's fast path to a ready model at arrival, or affinity's
riding on a ready/loading model unless the oldest waiting request is past the starvation deadline
while busy models hold the room it needs; Ollama never
has two loads in flight. At the end every request was served or rejected.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residency import Action, ActionKind, Engine
from residency.sim import ModelSpec, SimConfig, Trace, TraceConfig, simulate
from residency.sim.trace import GB

NS = 1_000_000_000


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    n_models = draw(st.integers(2, 5))
    sizes = draw(st.lists(st.integers(1, 12), min_size=n_models, max_size=n_models))
    models = [
        ModelSpec(f"m{i}", sizes[i] * GB, 0.0, draw(st.floats(0.1, 8.0))) for i in range(n_models)
    ]
    n = draw(st.integers(1, 60))
    gaps = draw(st.lists(st.floats(0.0, 5.0), min_size=n, max_size=n))
    which = draw(st.lists(st.integers(0, n_models - 1), min_size=n, max_size=n))
    service = draw(st.lists(st.floats(0.05, 6.0), min_size=n, max_size=n))
    budget = draw(st.integers(max(sizes), max(sizes) + sum(sizes))) * GB
    return Trace(
        config=TraceConfig(),
        models=models,
        budget_bytes=budget,
        times=np.cumsum(np.asarray(gaps, dtype=np.float64)),
        model=np.asarray(which, dtype=np.int64),
        service=np.asarray(service, dtype=np.float64),
    )


class Checker:
    def __init__(self, trace: Trace, queue: str) -> None:
        self.arrival = [round(t * NS) for t in trace.times.tolist()]
        self.queue = queue
        self.waiting: set[int] = set()
        self.loads = 0
        self.blocked_before = 0

    def order(self, r: int) -> tuple[int, int]:
        return (self.arrival[r - 1], r)

    def __call__(self, engine: Engine, now: int, event: str, p: int, actions: list[Action]) -> None:
        if event == "arrive":
            self.waiting.add(p + 1)  # the engine's request ids are the trace's indices + 1
        loaded: set[str] = set()
        for a in actions:
            if a.kind == ActionKind.LOAD:
                self.loads += 1
                loaded.add(a.key)
                older = [w for w in self.waiting if self.order(w) < self.order(a.request)]
                assert not older, f"load for r{a.request} passed waiting {older}"
            elif a.kind in (ActionKind.GRANT, ActionKind.REJECT):
                self.waiting.discard(a.request)
                older = [w for w in self.waiting if self.order(w) < self.order(a.request)]
                if a.kind == ActionKind.GRANT and older:
                    if self.queue == "ollama":
                        # Only the fast path at arrival, to a loaded (not loading) model.
                        assert event == "arrive"
                        assert p + 1 == a.request
                        assert not a.joined_load
                    elif a.key not in loaded:  # riders of a load just started may join it
                        # Nothing passes a head that is past its deadline waiting for busy
                        # models (the state before this event is what the engine decided on).
                        oldest = min(older, key=self.order)
                        overdue = now - self.arrival[oldest - 1] >= engine.starvation_ns
                        assert not (overdue and self.blocked_before == oldest), a
        for d in engine.resident_set.devices():
            assert d.reserved_bytes <= d.budget_bytes
            assert d.models <= d.max_models
        if self.queue == "ollama":
            assert engine.loads_in_flight() <= 1
        self.blocked_before = engine.blocked_head()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trace=traces(),
    queue=st.sampled_from(["ollama", "affinity"]),
    starvation_s=st.sampled_from([0.0, 0.5, 3.0]),
    keep_alive_s=st.sampled_from([0.0, 2.0, 300.0, -1.0]),
    max_models=st.integers(1, 3),
)
def test_random_arrivals_keep_order_budget_and_conservation(
    trace: Trace, queue: str, starvation_s: float, keep_alive_s: float, max_models: int
) -> None:
    checker = Checker(trace, queue)
    cfg = SimConfig(
        queue=queue,
        starvation_s=starvation_s,
        keep_alive_s=keep_alive_s,
        max_models=max_models,
        parallel=2,
    )
    r = simulate(trace, cfg, observer=checker)
    assert r.served + r.rejected == r.requests == len(trace)
    assert r.rejected == 0  # the budget holds the largest model
    assert checker.loads == r.cold_loads >= 1
