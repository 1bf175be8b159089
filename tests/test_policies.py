"""gdsf, tiered and adaptive keep-alive, through the core's public API."""

from __future__ import annotations

import pytest

from residency import AdmitOutcome, Device, InvalidArgumentError, ResidentSet, policy_names

GiB = 1 << 30
S = 1_000_000_000
MINUTE = 60 * S
ADAPTIVE_MAX = 30 * MINUTE  # AdaptiveKeepAliveOptions::max_keep_alive


def load(
    rs: ResidentSet,
    key: str,
    nbytes: int,
    now: int,
    *,
    keep_alive: int = 5 * MINUTE,
    load_seconds: float = 10.0,
) -> list[str]:
    d = rs.admit(key, nbytes, now, keep_alive)
    assert d.outcome is AdmitOutcome.LOAD, d
    for v in d.victims:
        rs.unloaded(v)
    rs.loaded(key, now, load_seconds)
    return list(d.victims)


def use(rs: ResidentSet, key: str, now: int, times: int = 1) -> None:
    for _ in range(times):
        rs.acquire(key, now)
        rs.release(key, now)


def test_all_policies_are_selectable_by_name() -> None:
    assert policy_names() == [
        "ollama",
        "gdsf",
        "tiered",
        "ollama+adaptive",
        "gdsf+adaptive",
        "tiered+adaptive",
    ]
    for name in policy_names():
        assert ResidentSet([Device("gpu0", 10 * GiB)], name).policy == name
    for bad in ["gdsf+", "+adaptive", "lru+adaptive", "gdsf+adaptive+adaptive"]:
        with pytest.raises(InvalidArgumentError, match="unknown eviction policy"):
            ResidentSet([Device("gpu0", 10 * GiB)], bad)


def test_gdsf_keeps_the_frequently_used_model_where_ollama_evicts_by_name() -> None:
    for policy, expected in [("ollama", ["a-hot"]), ("gdsf", ["b-cold"])]:
        rs = ResidentSet([Device("gpu0", 20 * GiB, 0, 5)], policy)
        load(rs, "a-hot", 8 * GiB, 0)
        load(rs, "b-cold", 8 * GiB, 0)
        use(rs, "a-hot", S, times=20)
        use(rs, "b-cold", 2 * S)
        assert load(rs, "c-new", 8 * GiB, 3 * S) == expected, policy


def test_tiered_evicts_the_model_whose_file_is_warm_in_host_ram() -> None:
    # Same keep-alive for all: Ollama takes "a-cold" (by name); tiered takes "b-warm", whose file
    # the host tier holds in RAM, so bringing it back reads no disk.
    for policy, expected in [("ollama", ["a-cold"]), ("tiered", ["b-warm"])]:
        rs = ResidentSet([Device("gpu0", 20 * GiB, 0, 5)], policy)
        load(rs, "a-cold", 8 * GiB, 0)
        load(rs, "b-warm", 8 * GiB, 0)
        rs.set_host_warm("b-warm", 8 * GiB)
        rs.set_host_warm("a-cold", 2 * GiB)  # partly warm is still a disk read
        assert rs.stats("b-warm").host_warm_bytes == 8 * GiB
        assert load(rs, "c-new", 8 * GiB, S) == expected, policy


def test_tiered_keeps_the_operators_keep_alive_order_then_least_recently_used() -> None:
    rs = ResidentSet([Device("gpu0", 30 * GiB, 0, 5)], "tiered")
    load(rs, "short-warm", 8 * GiB, 0, keep_alive=MINUTE)
    load(rs, "x-cold-old", 8 * GiB, 0)
    load(rs, "y-cold-new", 8 * GiB, 0)
    rs.set_host_warm("short-warm", 8 * GiB)
    use(rs, "x-cold-old", S)
    use(rs, "y-cold-new", 2 * S)
    # The shortest keep-alive goes first, as in Ollama; then, all cold, the least recently used.
    assert load(rs, "n1", 8 * GiB, 3 * S) == ["short-warm"]
    assert load(rs, "n2", 8 * GiB, 4 * S) == ["x-cold-old"]


def test_gdsf_prefers_evicting_cheap_per_byte_and_takes_a_minimal_set() -> None:
    rs = ResidentSet([Device("gpu0", 30 * GiB, 0, 5)], "gdsf")
    # Same use; "big" costs 10 s for 16 GiB, the small ones 10 s for 4 GiB each: per byte, big is
    # cheapest to lose, and it alone frees enough, so neither small one goes with it.
    load(rs, "big", 16 * GiB, 0)
    load(rs, "small1", 4 * GiB, 0)
    load(rs, "small2", 4 * GiB, 0)
    for k in ("big", "small1", "small2"):
        use(rs, k, S)
    assert load(rs, "new", 10 * GiB, 2 * S) == ["big"]


def test_gdsf_clock_lets_a_formerly_hot_model_age_out() -> None:
    rs = ResidentSet([Device("gpu0", 16 * GiB, 0, 5)], "gdsf")
    load(rs, "old", 8 * GiB, 0)
    use(rs, "old", S, times=5)  # priority 5 × 10 s / 8 GiB ≈ 6.25
    # A stream of newcomers, each used a little and evicted, raises the clock past "old".
    victims: list[str] = []
    for i in range(12):
        victims += load(rs, f"n{i:02d}", 8 * GiB, (2 + i) * S)
        use(rs, f"n{i:02d}", (2 + i) * S)
    assert "old" in victims


def test_adaptive_learns_short_idle_times_and_keeps_the_model_for_about_their_p99() -> None:
    rs = ResidentSet([Device("gpu0", 20 * GiB)], "gdsf+adaptive")
    load(rs, "m", 4 * GiB, 0)
    now = 0
    expiries = []
    for _ in range(12):
        rs.acquire("m", now)
        rs.release("m", now)
        r = rs.reservation("m")
        assert r is not None
        assert r.expires_at is not None
        expiries.append(r.expires_at - now)
        now += 5 * S  # idle 5 s between requests
    # Until 10 idle times are known, the configured 5 minutes; then ≈ 5 s × bucket × 1.1 + 2 s.
    assert expiries[:10] == [5 * MINUTE] * 10
    assert 5 * S < expiries[-1] < 12 * S
    # The configured keep-alive is still what the reservation says it was asked for.
    r = rs.reservation("m")
    assert r is not None
    assert r.keep_alive == 5 * MINUTE


def test_adaptive_honours_explicit_zero_and_forever_exactly() -> None:
    rs = ResidentSet([Device("gpu0", 20 * GiB)], "ollama+adaptive")
    load(rs, "m", 4 * GiB, 0)
    for i in range(12):
        use(rs, "m", i * S)
    rs.acquire("m", 20 * S)
    rs.release("m", 20 * S, 0)
    r = rs.reservation("m")
    assert r is not None
    assert r.expires_at == 20 * S
    assert rs.expired(20 * S) == ["m"]
    rs.acquire("m", 21 * S)
    rs.release("m", 21 * S, -1)
    r = rs.reservation("m")
    assert r is not None
    assert r.expires_at is None


def test_adaptive_is_bounded_and_does_not_hold_models_for_idle_times_it_cannot_reach() -> None:
    rs = ResidentSet([Device("gpu0", 20 * GiB)], "ollama+adaptive")
    load(rs, "slow", 4 * GiB, 0)
    load(rs, "rare", 4 * GiB, 0)
    t_slow = t_rare = 0
    for _ in range(12):
        use(rs, "slow", t_slow)
        use(rs, "rare", t_rare)
        t_slow += 25 * MINUTE
        t_rare += 5 * 60 * MINUTE
    slow = rs.reservation("slow")
    rare = rs.reservation("rare")
    assert slow is not None
    assert slow.expires_at is not None
    assert rare is not None
    assert rare.expires_at is not None
    # 25 min idle times: the window grows past the configured 5 min, up to the 30 min bound.
    assert 25 * MINUTE < slow.expires_at - (t_slow - 25 * MINUTE) <= ADAPTIVE_MAX
    # 5 h idle times: no window within the bound would catch one, so only the margin is kept.
    assert rare.expires_at - (t_rare - 5 * 60 * MINUTE) <= 3 * S
