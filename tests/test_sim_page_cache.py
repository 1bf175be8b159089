"""The honest baseline's host tier: the kernel-LRU page cache, alone and inside the simulator."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from residency.errors import ConfigError
from residency.sim import LruPageCache, SimConfig, Trace, TraceConfig, make_trace, simulate

#: Figures of the simulator before the page cache existed (commit c931260, queue × seed), which
#: the cache switched off must reproduce: cold loads, load seconds, TTFT mean / p99 / max,
#: resident GB·s.
PINNED = {
    (1, "ollama"): (218, 2412.9727415908965, 22.629955813252668, 192.73790630949992,
                    239.806162601, 338546.8134136851),
    (1, "affinity"): (208, 2230.1457477234767, 10.659167329333998, 67.559397717,
                      97.138815116, 335230.2439954068),
    (5, "ollama"): (441, 4750.500501242283, 573.8291537597834, 1157.68561049236,
                    1174.846955875, 227557.70323719876),
    (5, "affinity"): (424, 4031.0240585974852, 25.131185544927998, 113.50095681543,
                      126.961052554, 190808.3882991291),
}  # fmt: skip
SCENARIOS: dict[int, dict[str, Any]] = {
    1: {"alpha": 0.7, "cv": 4.0},
    5: {"alpha": 1.0, "cv": 2.0, "total_rate": 0.3},
}


def trace_for(seed: int) -> Trace:
    params: dict[str, Any] = {"total_rate": 0.1, **SCENARIOS[seed]}
    return make_trace(TraceConfig(n_requests=1500, seed=seed, **params))


@pytest.mark.parametrize(("seed", "queue"), sorted(PINNED))
def test_cache_off_reproduces_the_previous_figures(seed: int, queue: str) -> None:
    r = simulate(trace_for(seed), SimConfig(policy="ollama", queue=queue))
    got = (r.cold_loads, r.load_seconds, r.ttft_mean_s, r.ttft_p99_s, r.ttft_max_s, r.resident_gb_s)
    assert got == pytest.approx(PINNED[seed, queue], rel=1e-9)
    assert r.host_hit_gb == 0


def test_a_page_cache_makes_reloads_cheaper_never_dearer() -> None:
    trace = trace_for(1)
    off = simulate(trace, SimConfig(policy="ollama", queue="ollama"))
    on = simulate(trace, SimConfig(policy="ollama", queue="ollama", host_cache_x=2.0))
    assert on.host_hit_gb > 0
    assert on.load_seconds < off.load_seconds
    assert on.ttft_mean_s < off.ttft_mean_s


def test_host_as_slow_as_disk_costs_what_no_cache_costs() -> None:
    trace = trace_for(1)
    disk = trace.config.disk_gb_per_s
    off = simulate(trace, SimConfig(policy="ollama", queue="ollama"))
    same = SimConfig(policy="ollama", queue="ollama", host_cache_x=3.0, host_gb_per_s=disk)
    on = simulate(trace, same)
    assert on.host_hit_gb > 0
    assert on.load_seconds == pytest.approx(off.load_seconds, rel=1e-6)


def test_lru_hand_computed() -> None:
    c = LruPageCache(10)
    assert c.touch("a", 4) == 0
    assert c.touch("b", 4) == 0
    assert c.touch("a", 4) == 4  # a is now the most recent
    assert c.touch("c", 4) == 0  # 12 > 10: b (least recent) loses 2 of its 4
    assert (c.cached("a"), c.cached("b"), c.cached("c"), c.used) == (4, 2, 4, 10)
    assert c.touch("b", 4) == 2  # half of b came from RAM; a is the LRU now and gives 2
    assert (c.cached("a"), c.cached("b"), c.cached("c")) == (2, 4, 4)
    assert c.touch("big", 25) == 0  # larger than the budget: cached in part, everything else out
    assert (c.cached("big"), c.cached("a"), c.used) == (10, 0, 10)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40)), max_size=60), st.integers(0, 50))
def test_lru_never_exceeds_its_budget(touches: list[tuple[int, int]], budget: int) -> None:
    c = LruPageCache(budget)
    for key, nbytes in touches:
        hit = c.touch(f"m{key}", nbytes)
        assert hit in range(nbytes + 1)
        assert c.used <= budget
        assert c.cached(f"m{key}") == min(nbytes, budget)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        LruPageCache(-1)
    with pytest.raises(ConfigError):
        SimConfig(host_cache_x=-1.0)
    with pytest.raises(ConfigError):
        SimConfig(engine_start_s=-0.5)
