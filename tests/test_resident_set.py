"""Unit tests of the core through the binding: deterministic, clock injected."""

from __future__ import annotations

import threading

import pytest

from residency import (
    AdmitOutcome,
    BudgetExceededError,
    Device,
    InvalidArgumentError,
    InvalidStateError,
    ModelBusyError,
    NotAcquiredError,
    ReservationState,
    ResidencyError,
    ResidentSet,
    UnknownDeviceError,
    UnknownModelError,
)

GiB = 1 << 30
S = 1_000_000_000  # one second in ns
MIN5 = 300 * S


def make(*devices: Device, policy: str = "ollama") -> ResidentSet:
    return ResidentSet(list(devices) or [Device("gpu0", 24 * GiB, 1 * GiB, 3)], policy)


def load(rs: ResidentSet, key: str, nbytes: int, now: int = 0, keep_alive: int = MIN5) -> None:
    """Admit and finish loading a model that must fit without waiting."""
    decision = rs.admit(key, nbytes, now, keep_alive)
    assert decision.outcome is AdmitOutcome.LOAD, decision
    for victim in decision.victims:
        rs.unloaded(victim)
    rs.loaded(key, now, 1.0)


def state_of(rs: ResidentSet) -> list[tuple[object, ...]]:
    return [
        (r.key, r.device, r.state, r.bytes, r.refcount, r.expires_at) for r in rs.snapshot()
    ] + [(d.id, d.reserved_bytes, d.unloading_bytes, d.models) for d in rs.devices()]


# --- admit outcomes ----------------------------------------------------------------------------


def test_load_into_empty_device_reserves_at_once() -> None:
    rs = make()
    d = rs.admit("a", 4 * GiB, 10, MIN5)
    assert d.outcome is AdmitOutcome.LOAD
    assert d.device == "gpu0"
    assert d.victims == []
    assert d.freed_bytes == 0
    r = rs.reservation("a")
    assert r is not None
    assert r.state is ReservationState.LOADING
    assert r.bytes == 4 * GiB
    assert r.refcount == 0
    assert rs.devices()[0].reserved_bytes == 4 * GiB


def test_hit_for_loading_and_ready_models() -> None:
    rs = make()
    rs.admit("a", GiB, 0, MIN5)
    assert rs.admit("a", GiB, 1, MIN5).outcome is AdmitOutcome.HIT
    rs.loaded("a", 2, 0.5)
    d = rs.admit("a", GiB, 3, MIN5)
    assert d.outcome is AdmitOutcome.HIT
    assert d.device == "gpu0"


def test_load_evicts_idle_models_by_shortest_keep_alive_then_name() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 8))
    load(rs, "long", 3 * GiB, keep_alive=3600 * S)
    load(rs, "b-short", 3 * GiB, keep_alive=60 * S)
    load(rs, "a-short", 3 * GiB, keep_alive=60 * S)
    d = rs.admit("new", 4 * GiB, 5, MIN5)
    assert d.outcome is AdmitOutcome.LOAD
    # 9 GiB reserved of 10: 3 GiB must go; ties on keep-alive are broken by name.
    assert d.victims == ["a-short"]
    assert d.freed_bytes == 3 * GiB
    assert rs.reservation("a-short").state is ReservationState.UNLOADING  # type: ignore[union-attr]
    usage = rs.devices()[0]
    assert usage.reserved_bytes == 10 * GiB
    assert usage.unloading_bytes == 3 * GiB


def test_forever_keep_alive_is_evicted_last() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 8))
    load(rs, "forever", 5 * GiB, keep_alive=-1)
    load(rs, "five-min", 5 * GiB, keep_alive=MIN5)
    assert rs.admit("new", 5 * GiB, 1, MIN5).victims == ["five-min"]


def test_victims_are_only_as_many_as_needed() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 8))
    for name in "abcde":
        load(rs, name, 2 * GiB, keep_alive=MIN5)
    d = rs.admit("new", 3 * GiB, 1, MIN5)
    assert d.victims == ["a", "b"]  # 4 GiB freed covers 3 GiB; a third would be waste


def test_model_cap_forces_an_eviction_even_with_bytes_free() -> None:
    rs = make(Device("gpu0", 100 * GiB, 0, 2))
    load(rs, "a", GiB)
    load(rs, "b", GiB)
    d = rs.admit("c", GiB, 1, MIN5)
    assert d.outcome is AdmitOutcome.LOAD
    assert d.victims == ["a"]
    assert rs.devices()[0].models == 2


def test_overhead_is_never_handed_out() -> None:
    rs = make(Device("gpu0", 10 * GiB, 2 * GiB, 3))
    assert rs.devices()[0].budget_bytes == 8 * GiB
    assert rs.admit("fits", 8 * GiB, 0, MIN5).outcome is AdmitOutcome.LOAD
    rs2 = make(Device("gpu0", 10 * GiB, 2 * GiB, 3))
    assert rs2.admit("too-big", 8 * GiB + 1, 0, MIN5).outcome is AdmitOutcome.TOO_LARGE


def test_wait_when_only_busy_models_could_make_room() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 3))
    load(rs, "busy", 8 * GiB)
    rs.acquire("busy", 1)
    before = state_of(rs)
    d = rs.admit("new", 4 * GiB, 2, MIN5)
    assert d.outcome is AdmitOutcome.WAIT
    assert "busy models go idle" in d.reason
    assert state_of(rs) == before  # Wait changes nothing
    rs.release("busy", 3)
    assert rs.admit("new", 4 * GiB, 4, MIN5).victims == ["busy"]


def test_wait_while_a_loading_model_holds_the_room() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 3))
    rs.admit("loading", 8 * GiB, 0, MIN5)
    assert rs.admit("new", 4 * GiB, 1, MIN5).outcome is AdmitOutcome.WAIT


def test_too_large_names_the_largest_budget() -> None:
    rs = make(Device("gpu0", 10 * GiB, GiB, 3), Device("gpu1", 20 * GiB, GiB, 3))
    d = rs.admit("huge", 40 * GiB, 0, MIN5)
    assert d.outcome is AdmitOutcome.TOO_LARGE
    assert d.device is None
    assert str(19 * GiB) in d.reason
    assert rs.snapshot() == []


def test_pinned_models_block_with_too_large() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 3))
    load(rs, "pinned", 8 * GiB)
    rs.set_pinned("pinned", True, 1)
    d = rs.admit("new", 4 * GiB, 2, MIN5)
    assert d.outcome is AdmitOutcome.TOO_LARGE
    assert "pinned" in d.reason


def test_picks_the_device_with_most_free_budget_when_no_eviction_is_needed() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 3), Device("gpu1", 16 * GiB, 0, 3))
    assert rs.admit("a", GiB, 0, MIN5).device == "gpu1"
    rs2 = make(Device("gpu0", 10 * GiB, 0, 3), Device("gpu1", 16 * GiB, 0, 3))
    load(rs2, "big", 12 * GiB)
    assert rs2.admit("b", GiB, 1, MIN5).device == "gpu0"


def test_eviction_prefers_the_device_needing_fewer_victims() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 8), Device("gpu1", 10 * GiB, 0, 8))
    for name in ("a1", "a2", "a3", "a4", "a5"):
        load(rs, name, 2 * GiB)  # spreads across both devices by free space
    by_device: dict[str, list[str]] = {}
    for r in rs.snapshot():
        by_device.setdefault(r.device, []).append(r.key)
    d = rs.admit("big", 9 * GiB, 1, MIN5)
    assert d.outcome is AdmitOutcome.LOAD
    assert d.device is not None
    assert len(d.victims) == len(by_device[d.device]) == min(len(v) for v in by_device.values())


def test_unloading_model_must_finish_before_readmission() -> None:
    rs = make()
    load(rs, "a", GiB)
    assert rs.begin_unload("a") == GiB
    d = rs.admit("a", GiB, 1, MIN5)
    assert d.outcome is AdmitOutcome.WAIT
    assert "unloading" in d.reason
    rs.unloaded("a")
    assert rs.admit("a", GiB, 2, MIN5).outcome is AdmitOutcome.LOAD


# --- keep-alive ---------------------------------------------------------------------------------


def test_keep_alive_clock_starts_when_idle() -> None:
    rs = make()
    load(rs, "a", GiB, now=0, keep_alive=10 * S)
    assert rs.reservation("a").expires_at == 10 * S  # type: ignore[union-attr]
    rs.acquire("a", 5 * S)
    assert rs.reservation("a").expires_at is None  # type: ignore[union-attr]
    assert rs.expired(100 * S) == []  # busy models never expire
    rs.release("a", 20 * S)
    assert rs.reservation("a").expires_at == 30 * S  # type: ignore[union-attr]
    assert rs.next_expiry() == 30 * S
    assert rs.expired(30 * S - 1) == []
    assert rs.expired(30 * S) == ["a"]


def test_keep_alive_zero_expires_as_soon_as_idle() -> None:
    rs = make()
    load(rs, "a", GiB, now=0, keep_alive=MIN5)
    rs.acquire("a", 1)
    rs.release("a", 2, keep_alive=0)
    assert rs.expired(2) == ["a"]


def test_keep_alive_forever_never_expires() -> None:
    rs = make()
    load(rs, "a", GiB, now=0, keep_alive=MIN5)
    rs.acquire("a", 1)
    rs.release("a", 2, keep_alive=-1)
    assert rs.reservation("a").expires_at is None  # type: ignore[union-attr]
    assert rs.next_expiry() is None
    assert rs.expired(2**62) == []


def test_release_without_keep_alive_keeps_the_current_value() -> None:
    rs = make()
    load(rs, "a", GiB, now=0, keep_alive=7 * S)
    rs.acquire("a", 1)
    rs.release("a", 10 * S)
    assert rs.reservation("a").keep_alive == 7 * S  # type: ignore[union-attr]
    assert rs.reservation("a").expires_at == 17 * S  # type: ignore[union-attr]


def test_expired_lists_soonest_first_and_survives_huge_keep_alive() -> None:
    rs = make(Device("gpu0", 100 * GiB, 0, 8))
    load(rs, "late", GiB, now=0, keep_alive=20 * S)
    load(rs, "early", GiB, now=0, keep_alive=10 * S)
    load(rs, "huge", GiB, now=0, keep_alive=2**63 - 1)  # saturates instead of overflowing
    assert rs.expired(30 * S) == ["early", "late"]
    assert rs.next_expiry() == 10 * S


def test_pinned_models_never_expire_and_unpinning_restarts_the_clock() -> None:
    rs = make()
    load(rs, "a", GiB, now=0, keep_alive=10 * S)
    rs.set_pinned("a", True, 1)
    assert rs.expired(100 * S) == []
    rs.set_pinned("a", False, 50 * S)
    assert rs.reservation("a").expires_at == 60 * S  # type: ignore[union-attr]


def test_a_loading_model_starts_its_keep_alive_when_loaded_idle() -> None:
    rs = make()
    rs.admit("a", GiB, 0, 10 * S)
    rs.acquire("a", 1)  # a request joined the load
    rs.release("a", 2)  # ... and gave up before it finished
    assert rs.reservation("a").expires_at is None  # type: ignore[union-attr]
    rs.loaded("a", 5 * S, 5.0)
    assert rs.reservation("a").expires_at == 15 * S  # type: ignore[union-attr]


# --- measured bytes, unload lifecycle, stats ------------------------------------------------------


def test_measured_bytes_replace_the_estimate() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 3))
    rs.admit("a", 4 * GiB, 0, MIN5)
    rs.loaded("a", 1, 2.5, measured_bytes=3 * GiB)
    r = rs.reservation("a")
    assert r is not None
    assert (r.bytes, r.estimated_bytes, r.measured) == (3 * GiB, 4 * GiB, True)
    assert rs.devices()[0].reserved_bytes == 3 * GiB
    rs.update_measured_bytes("a", 5 * GiB)
    assert rs.devices()[0].reserved_bytes == 5 * GiB


def test_measured_bytes_beyond_budget_are_refused_unchanged() -> None:
    rs = make(Device("gpu0", 10 * GiB, 0, 3))
    load(rs, "a", 6 * GiB)
    load(rs, "b", 4 * GiB)
    before = state_of(rs)
    with pytest.raises(BudgetExceededError, match="'b' measured"):
        rs.update_measured_bytes("b", 5 * GiB)
    assert state_of(rs) == before


def test_unload_lifecycle() -> None:
    rs = make()
    load(rs, "a", 2 * GiB)
    with pytest.raises(InvalidStateError, match="begin_unload"):
        rs.unloaded("a")
    assert rs.begin_unload("a") == 2 * GiB
    with pytest.raises(InvalidStateError, match="already unloading"):
        rs.begin_unload("a")
    with pytest.raises(InvalidStateError, match="unloading"):
        rs.acquire("a", 1)
    usage = rs.devices()[0]
    assert (usage.reserved_bytes, usage.unloading_bytes, usage.models) == (0, 2 * GiB, 0)
    rs.unloaded("a")
    assert rs.snapshot() == []
    assert rs.devices()[0].unloading_bytes == 0


def test_forced_unload_of_a_busy_model_drops_its_references() -> None:
    rs = make()
    load(rs, "a", GiB)
    rs.acquire("a", 1)
    with pytest.raises(ModelBusyError, match="in use by 1 request"):
        rs.begin_unload("a")
    assert rs.begin_unload("a", force=True) == GiB
    assert rs.reservation("a").refcount == 0  # type: ignore[union-attr]
    rs.unloaded("a")


def test_a_failed_load_is_unloaded_like_any_other() -> None:
    rs = make()
    rs.admit("a", GiB, 0, MIN5)
    rs.begin_unload("a")
    rs.unloaded("a")
    assert rs.devices()[0].reserved_bytes == 0


def test_stats_survive_residencies() -> None:
    rs = make()
    load(rs, "a", GiB)
    for t in range(3):
        rs.acquire("a", t)
        rs.release("a", t)
    rs.begin_unload("a")
    rs.unloaded("a")
    stats = rs.stats("a")
    assert stats is not None
    assert (stats.requests, stats.loads, stats.last_load_seconds) == (3, 1, 1.0)
    assert rs.stats("never-seen") is None


# --- bad input: precise errors, state unchanged ---------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda rs: rs.admit("x", -1, 0, 0), InvalidArgumentError, "must not be negative"),
        (lambda rs: rs.admit("x", 0, 0, 0), InvalidArgumentError, "must be positive"),
        (lambda rs: rs.admit("x", 1 << 61, 0, 0), InvalidArgumentError, "absurd"),
        (lambda rs: rs.admit("x", 1 << 70, 0, 0), InvalidArgumentError, "absurdly large"),
        (lambda rs: rs.admit("", 1, 0, 0), InvalidArgumentError, "must not be empty"),
        (lambda rs: rs.acquire("ghost", 0), UnknownModelError, "'ghost' is not resident"),
        (lambda rs: rs.release("ghost", 0), UnknownModelError, "'ghost'"),
        (lambda rs: rs.release("a", 0), NotAcquiredError, "released more often"),
        (lambda rs: rs.loaded("a", 0, 1.0), InvalidStateError, "not loading"),
        (lambda rs: rs.loaded("a", 0, -1.0), InvalidArgumentError, "load_seconds"),
        (lambda rs: rs.begin_unload("ghost"), UnknownModelError, "'ghost'"),
        (lambda rs: rs.update_measured_bytes("a", -5), InvalidArgumentError, "negative"),
        (lambda rs: rs.add_device(Device("gpu0", GiB)), InvalidArgumentError, "already exists"),
        (lambda rs: rs.add_device(Device("x", GiB, GiB)), InvalidArgumentError, "no budget"),
        (lambda rs: rs.add_device(Device("x", GiB, 0, 0)), InvalidArgumentError, "max_models"),
    ],
)
def test_bad_input_raises_precisely_and_changes_nothing(
    call: object, error: type[ResidencyError], message: str
) -> None:
    rs = make()
    load(rs, "a", GiB)
    before = state_of(rs)
    with pytest.raises(error, match=message):
        call(rs)  # type: ignore[operator]
    assert state_of(rs) == before
    assert issubclass(error, ResidencyError)


def test_double_release_raises_after_one_good_release() -> None:
    rs = make()
    load(rs, "a", GiB)
    rs.acquire("a", 1)
    rs.release("a", 2)
    with pytest.raises(NotAcquiredError):
        rs.release("a", 3)
    assert rs.reservation("a").refcount == 0  # type: ignore[union-attr]


def test_unknown_policy_and_negative_device_sizes() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown eviction policy 'nope'"):
        ResidentSet([Device("gpu0", GiB)], "nope")
    with pytest.raises(InvalidArgumentError, match="negative"):
        Device("gpu0", -1)
    with pytest.raises(InvalidArgumentError, match="must be positive"):
        ResidentSet([Device("gpu0", 0)])


def test_unknown_device_error_is_a_residency_error() -> None:
    assert issubclass(UnknownDeviceError, ResidencyError)
    assert issubclass(ModelBusyError, InvalidStateError)


def test_no_devices_means_too_large_with_a_reason() -> None:
    rs = ResidentSet([])
    d = rs.admit("a", GiB, 0, MIN5)
    assert d.outcome is AdmitOutcome.TOO_LARGE
    assert "no devices" in d.reason


# --- threads --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_acquire_release_from_threads_keeps_refcounts_exact() -> None:
    rs = make()
    load(rs, "a", GiB)
    n_threads, n_iter = 4, 5_000

    def worker() -> None:
        for i in range(n_iter):
            rs.acquire("a", i)
            rs.release("a", i)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = rs.reservation("a")
    assert r is not None
    assert r.refcount == 0
    assert r.hits == n_threads * n_iter
