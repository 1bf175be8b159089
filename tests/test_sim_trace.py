"""The trace generator produces what its parameters say, and the same seed gives the same trace."""

from __future__ import annotations

import numpy as np
import pytest

from residency.errors import ConfigError
from residency.sim import TraceConfig, make_trace
from residency.sim.trace import GB


@pytest.mark.parametrize(("alpha", "cv"), [(0.7, 1.0), (1.3, 4.0)])
def test_rates_follow_zipf_and_gaps_have_the_requested_cv(alpha: float, cv: float) -> None:
    cfg = TraceConfig(alpha=alpha, cv=cv, n_requests=60_000, n_models=6, total_rate=1.0, seed=3)
    trace = make_trace(cfg)
    assert len(trace) == cfg.n_requests
    assert np.all(np.diff(trace.times) >= 0)
    span = trace.times[-1] - trace.times[0]
    weights = np.arange(1, cfg.n_models + 1, dtype=float) ** -alpha
    for i, m in enumerate(trace.models):
        assert m.rate == pytest.approx(cfg.total_rate * weights[i] / weights.sum())
        t = trace.times[trace.model == i]
        # Bursty processes converge slowly: allow more slack for CV 4.
        tol = 0.05 if cv == 1.0 else 0.25
        assert len(t) / span == pytest.approx(m.rate, rel=tol)
        gaps = np.diff(t)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.3 if cv > 1 else 0.05)


def test_sizes_budget_and_load_costs() -> None:
    cfg = TraceConfig(seed=5)
    trace = make_trace(cfg)
    sizes = np.array([m.bytes for m in trace.models]) / GB
    assert sizes.min() >= cfg.min_gb
    assert sizes.max() <= cfg.max_gb
    # Many small, few large.
    assert (sizes < 10).sum() >= (sizes > 30).sum() * 2
    assert trace.budget_bytes >= max(m.bytes for m in trace.models)
    assert 2.0 <= trace.total_bytes / trace.budget_bytes <= 5.0
    for m in trace.models:
        assert m.load_seconds == pytest.approx(
            m.bytes / GB / cfg.disk_gb_per_s + cfg.engine_start_s
        )
    assert trace.service.mean() == pytest.approx(cfg.service_mean_s, rel=0.05)
    # Keys say nothing of popularity (Ollama breaks ties by name).
    assert [m.key for m in trace.models] != sorted(m.key for m in trace.models)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    a, b = make_trace(TraceConfig(seed=11)), make_trace(TraceConfig(seed=11))
    c = make_trace(TraceConfig(seed=12))
    assert a.models == b.models
    assert a.budget_bytes == b.budget_bytes
    assert np.array_equal(a.times, b.times)
    assert np.array_equal(a.model, b.model)
    assert np.array_equal(a.service, b.service)
    assert not np.array_equal(a.times, c.times)


def test_on_off_phases_insert_off_periods_of_the_given_length() -> None:
    cfg = TraceConfig(
        n_models=1,
        n_requests=5_000,
        total_rate=0.5,
        on_mean_s=300.0,
        off_min_s=150.0,
        off_max_s=600.0,
        seed=2,
    )
    trace = make_trace(cfg)
    gaps = np.diff(trace.times)
    long_gaps = gaps[gaps >= cfg.off_min_s]
    # Poisson gaps at 0.5 req/s almost never reach 150 s: these are the off periods, one per cycle.
    cycles = (trace.times[-1] - trace.times[0]) / (cfg.on_mean_s + 375.0)
    assert len(long_gaps) == pytest.approx(cycles, rel=0.5)
    assert long_gaps.max() < cfg.off_max_s + 200
    # The long-run rate is preserved despite the off periods.
    assert len(trace) / (trace.times[-1] - trace.times[0]) == pytest.approx(0.5, rel=0.15)


@pytest.mark.parametrize(
    "bad",
    [{"alpha": -1.0}, {"cv": 0.0}, {"n_models": 0}, {"min_gb": 70.0}, {"total_to_budget": 0.5}],
)
def test_bad_parameters_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="trace:"):
        TraceConfig(**bad)  # type: ignore[arg-type]
