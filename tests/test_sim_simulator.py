"""The simulator replays traces on the real core: it conserves requests, is deterministic, and its
measurements match hand-computed values on small traces."""

from __future__ import annotations

import numpy as np
import pytest

from residency import policy_names
from residency.sim import ModelSpec, SimConfig, Trace, TraceConfig, make_trace, simulate
from residency.sim.trace import GB


def tiny(times: list[float], which: list[int], service: list[float], budget_gb: float) -> Trace:
    models = [ModelSpec("a", 10 * GB, 0.0, 5.0), ModelSpec("b", 20 * GB, 0.0, 8.0)]
    return Trace(
        config=TraceConfig(),
        models=models,
        budget_bytes=int(budget_gb * GB),
        times=np.asarray(times, dtype=np.float64),
        model=np.asarray(which, dtype=np.int64),
        service=np.asarray(service, dtype=np.float64),
    )


@pytest.mark.parametrize("policy", policy_names())
def test_every_request_is_served_or_rejected(policy: str) -> None:
    trace = make_trace(TraceConfig(n_requests=3_000, alpha=1.0, cv=4.0, total_rate=0.2, seed=7))
    r = simulate(trace, SimConfig(policy=policy))
    assert r.served + r.rejected == r.requests == 3_000
    assert r.rejected == 0  # the budget always holds the largest model
    assert r.cold_loads >= len({int(m) for m in trace.model})  # each model loads at least once
    assert r.evictions + r.expirations >= r.cold_loads - trace.config.n_models
    assert 0 <= r.idle_gb_s <= r.resident_gb_s
    assert 0 <= r.ttft_p50_s <= r.ttft_p99_s


def test_same_seed_same_result() -> None:
    cfg = TraceConfig(n_requests=2_000, seed=4, total_rate=0.2)
    a = simulate(make_trace(cfg), SimConfig(policy="gdsf+adaptive"))
    b = simulate(make_trace(cfg), SimConfig(policy="gdsf+adaptive"))
    assert a == b


def test_hand_computed_load_serve_and_expire() -> None:
    # a at t=0 (load 5 s, serve 2 s), a again at t=10 (hit), b at t=100: both fit, nothing evicted.
    trace = tiny([0.0, 10.0, 100.0], [0, 0, 1], [2.0, 2.0, 3.0], budget_gb=40)
    r = simulate(trace, SimConfig(policy="ollama", keep_alive_s=50.0))
    assert (r.cold_loads, r.load_seconds, r.evictions) == (2, 13.0, 0)
    # a expired at 12 + 50 = 62; b expires after the end (111), which is not charged.
    assert r.expirations == 1
    # TTFTs: 5 (load a), 0 (hit), 8 (load b).
    assert r.ttft_mean_s == pytest.approx(13.0 / 3)
    # Idle: a 7→10 and 12→62 (10 GB), b none (busy until the end at 111).
    assert r.idle_gb_s == pytest.approx(10 * (3 + 50))
    assert r.duration_s == pytest.approx(111.0)


def test_eviction_waits_for_recovery_and_requests_queue_behind_loads() -> None:
    # Only one fits: b's arrival at t=20 evicts idle a; b loads after the 1 s recovery lag.
    trace = tiny([0.0, 20.0, 21.0], [0, 1, 1], [2.0, 2.0, 2.0], budget_gb=25)
    r = simulate(trace, SimConfig(policy="ollama", recovery_lag_s=1.0))
    assert (r.cold_loads, r.evictions) == (2, 1)
    # TTFTs: 5 (load a), 1 + 8 = 9 (lag + load b), 8 (queued behind b's load since t=21).
    assert r.ttft_mean_s == pytest.approx((5 + 9 + 8) / 3)


def test_busy_model_makes_the_next_one_wait() -> None:
    # a serves until t=105; b cannot evict a busy model, so it waits, then loads after the lag.
    trace = tiny([0.0, 10.0], [0, 1], [100.0, 1.0], budget_gb=25)
    r = simulate(trace, SimConfig(policy="gdsf", recovery_lag_s=1.0))
    assert r.waited == 1
    assert r.served == 2
    assert r.ttft_p99_s == pytest.approx(105 + 1 + 8 - 10, rel=0.02)


def test_too_large_is_rejected_and_counted() -> None:
    trace = tiny([0.0, 1.0], [1, 0], [1.0, 1.0], budget_gb=15)
    r = simulate(trace, SimConfig())
    assert (r.rejected, r.served) == (1, 1)


def test_keep_alive_zero_unloads_at_once_and_forever_never() -> None:
    trace = tiny([0.0, 100.0], [0, 0], [1.0, 1.0], budget_gb=40)
    zero = simulate(trace, SimConfig(keep_alive_s=0.0))
    forever = simulate(trace, SimConfig(keep_alive_s=-1.0))
    # The second expiry comes after the last completion, where the books close.
    assert (zero.cold_loads, zero.expirations, zero.idle_gb_s) == (2, 1, 0.0)
    assert (forever.cold_loads, forever.expirations) == (1, 0)
    assert forever.idle_gb_s == pytest.approx(10 * (100 - 6))
