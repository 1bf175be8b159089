"""Random admit/loaded/acquire/release/expire/unload sequences over several devices, checked after
every step against a plain-Python model of what the core promised. Runs once per eviction policy.

Normal run: 150 sequences of up to 100 steps, ≥ 10,000 steps per policy (counted).
``--run-slow``: ≥ 1,000,000 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from residency import (
    AdmitOutcome,
    BudgetExceededError,
    Device,
    InvalidStateError,
    ModelBusyError,
    NotAcquiredError,
    ReservationState,
    ResidentSet,
    UnknownModelError,
    policy_names,
)

GiB = 1 << 30
S = 1_000_000_000
KEYS = [f"m{i}" for i in range(10)]
DEVICES = [
    Device("gpu0", 8 * GiB, GiB, 3),
    Device("gpu1", 16 * GiB, 2 * GiB, 2),
    Device("host", 4 * GiB),
]
SIZES = st.sampled_from([GiB // 2, GiB, 2 * GiB, 3 * GiB, 5 * GiB, 9 * GiB, 15 * GiB])
KEEP_ALIVES = st.sampled_from([-1, 0, S, 10 * S, 60 * S])
LOADING, READY, UNLOADING = (
    ReservationState.LOADING,
    ReservationState.READY,
    ReservationState.UNLOADING,
)
NEVER = None
# AdaptiveKeepAliveOptions::max_keep_alive: the longest window an adaptive policy may choose.
ADAPTIVE_MAX_KEEP_ALIVE = 30 * 60 * S


@dataclass
class Model:
    """What the test expects of one reservation."""

    device: str
    state: ReservationState
    bytes: int
    keep_alive: int
    refcount: int = 0
    pinned: bool = False
    expires_at: int | None = NEVER


class ResidentSetMachine(RuleBasedStateMachine):
    policy = "ollama"
    steps = 0  # counted across all sequences, to prove the run was as long as promised

    def __init__(self) -> None:
        super().__init__()
        self.rs = ResidentSet(list(DEVICES), self.policy)
        self.budget = {d.id: d.total_bytes - d.overhead_bytes for d in DEVICES}
        self.cap = {d.id: d.max_models for d in DEVICES}
        self.models: dict[str, Model] = {}
        self.now = 0

    # --- helpers -------------------------------------------------------------------------------

    def keys_in(self, *states: ReservationState) -> list[str]:
        return sorted(k for k, m in self.models.items() if m.state in states)

    def reserved(self, device: str) -> int:
        return sum(
            m.bytes for m in self.models.values() if m.device == device and m.state != UNLOADING
        )

    def count(self, device: str) -> int:
        return sum(1 for m in self.models.values() if m.device == device and m.state != UNLOADING)

    def start_keep_alive(self, key: str) -> None:
        m = self.models[key]
        if m.pinned or m.keep_alive < 0:
            m.expires_at = NEVER
        elif m.keep_alive == 0 or not self.policy.endswith("+adaptive"):
            m.expires_at = self.now + m.keep_alive
        else:
            # Adaptive keep-alive chooses its own window for a positive keep-alive: the configured
            # one until it has learnt enough, then one within its bound; never zero, never forever.
            r = self.rs.reservation(key)
            assert r is not None
            assert r.expires_at is not None
            assert self.now < r.expires_at <= self.now + max(m.keep_alive, ADAPTIVE_MAX_KEEP_ALIVE)
            m.expires_at = r.expires_at

    def tick(self, dt: int) -> None:
        self.now += dt

    # --- rules ---------------------------------------------------------------------------------

    @rule(dt=st.integers(0, 30 * S))
    def advance(self, dt: int) -> None:
        self.tick(dt)

    @rule(key=st.sampled_from(KEYS), nbytes=SIZES, keep_alive=KEEP_ALIVES)
    def admit(self, key: str, nbytes: int, keep_alive: int) -> None:
        before = {k: (m.state, m.refcount) for k, m in self.models.items()}
        d = self.rs.admit(key, nbytes, self.now, keep_alive)
        existing = self.models.get(key)
        if existing is not None:
            expected = AdmitOutcome.WAIT if existing.state == UNLOADING else AdmitOutcome.HIT
            assert d.outcome is expected
            assert d.device == existing.device
            return
        if d.outcome is AdmitOutcome.LOAD:
            assert d.device is not None
            freed = 0
            for v in d.victims:
                victim = self.models[v]
                # Victims are only idle, unpinned, ready models on the chosen device.
                assert victim.device == d.device
                assert (victim.state, victim.refcount, victim.pinned) == (READY, 0, False), v
                victim.state = UNLOADING
                victim.expires_at = NEVER
                freed += victim.bytes
            assert d.freed_bytes == freed
            self.models[key] = Model(d.device, LOADING, nbytes, keep_alive)
            assert self.reserved(d.device) <= self.budget[d.device]
            assert self.count(d.device) <= self.cap[d.device]
            # No more victims than needed: without the last one it would not fit.
            if d.victims:
                last = self.models[d.victims[-1]]
                assert (
                    self.reserved(d.device) + last.bytes > self.budget[d.device]
                    or self.count(d.device) + 1 > self.cap[d.device]
                )
        else:
            assert {k: (m.state, m.refcount) for k, m in self.models.items()} == before
            # Wait and TooLarge only when no device can make room from idle models.
            for dev in self.budget:
                idle = [
                    m
                    for m in self.models.values()
                    if m.device == dev and m.state == READY and m.refcount == 0 and not m.pinned
                ]
                fits_bytes = (
                    self.reserved(dev) - sum(m.bytes for m in idle) + nbytes <= self.budget[dev]
                )
                fits_count = self.count(dev) - len(idle) + 1 <= self.cap[dev]
                assert not (fits_bytes and fits_count), (d, dev)
            if d.outcome is AdmitOutcome.TOO_LARGE:
                assert d.reason

    @precondition(lambda self: self.keys_in(LOADING))
    @rule(data=st.data(), load_seconds=st.floats(0, 120), measure=st.booleans())
    def loaded(self, data: st.DataObject, load_seconds: float, measure: bool) -> None:
        key = data.draw(st.sampled_from(self.keys_in(LOADING)))
        m = self.models[key]
        measured = data.draw(st.integers(GiB // 4, 2 * m.bytes)) if measure else None
        try:
            self.rs.loaded(key, self.now, load_seconds, measured)
        except BudgetExceededError:
            assert measured is not None
            assert self.reserved(m.device) - m.bytes + measured > self.budget[m.device]
            return
        if measured is not None:
            m.bytes = measured
        m.state = READY
        if m.refcount == 0:
            self.start_keep_alive(key)

    @precondition(lambda self: self.keys_in(LOADING, READY))
    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.keys_in(LOADING, READY)))
        self.rs.acquire(key, self.now)
        m = self.models[key]
        m.refcount += 1
        m.expires_at = NEVER

    @precondition(lambda self: self.models)
    @rule(data=st.data(), keep_alive=st.one_of(st.none(), KEEP_ALIVES))
    def release(self, data: st.DataObject, keep_alive: int | None) -> None:
        key = data.draw(st.sampled_from(sorted(self.models)))
        m = self.models[key]
        if m.refcount == 0:
            with pytest.raises(NotAcquiredError):
                self.rs.release(key, self.now, keep_alive)
            return
        self.rs.release(key, self.now, keep_alive)
        m.refcount -= 1
        if keep_alive is not None:
            m.keep_alive = keep_alive
        if m.refcount == 0 and m.state == READY:
            self.start_keep_alive(key)

    @rule()
    def expire(self) -> None:
        due = self.rs.expired(self.now)
        expected = sorted(
            (m.expires_at, k)
            for k, m in self.models.items()
            if m.state == READY
            and m.refcount == 0
            and m.expires_at is not None
            and m.expires_at <= self.now
        )
        assert due == [k for _, k in expected]
        for key in due:
            self.rs.begin_unload(key)
            self.models[key].state = UNLOADING
            self.models[key].expires_at = NEVER

    @precondition(lambda self: self.keys_in(LOADING, READY))
    @rule(data=st.data(), force=st.booleans())
    def begin_unload(self, data: st.DataObject, force: bool) -> None:
        key = data.draw(st.sampled_from(self.keys_in(LOADING, READY)))
        m = self.models[key]
        if m.refcount > 0 and not force:
            with pytest.raises(ModelBusyError):
                self.rs.begin_unload(key)
            return
        assert self.rs.begin_unload(key, force) == m.bytes
        m.state, m.refcount, m.expires_at = UNLOADING, 0, NEVER

    @precondition(lambda self: self.keys_in(UNLOADING))
    @rule(data=st.data())
    def unloaded(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.keys_in(UNLOADING)))
        self.rs.unloaded(key)
        del self.models[key]

    @precondition(lambda self: self.keys_in(LOADING, READY))
    @rule(data=st.data(), nbytes=SIZES)
    def measure(self, data: st.DataObject, nbytes: int) -> None:
        key = data.draw(st.sampled_from(self.keys_in(LOADING, READY)))
        m = self.models[key]
        if self.reserved(m.device) - m.bytes + nbytes > self.budget[m.device]:
            with pytest.raises(BudgetExceededError):
                self.rs.update_measured_bytes(key, nbytes)
            return
        self.rs.update_measured_bytes(key, nbytes)
        m.bytes = nbytes

    @precondition(lambda self: self.models)
    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data: st.DataObject, pinned: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.models)))
        self.rs.set_pinned(key, pinned, self.now)
        m = self.models[key]
        m.pinned = pinned
        if m.state == READY and m.refcount == 0:
            self.start_keep_alive(key)

    @rule(key=st.sampled_from(KEYS))
    def misuse_is_refused_without_change(self, key: str) -> None:
        m = self.models.get(key)
        if m is None:
            with pytest.raises(UnknownModelError):
                self.rs.acquire(key, self.now)
        elif m.state != UNLOADING:
            with pytest.raises(InvalidStateError):
                self.rs.unloaded(key)
        else:
            with pytest.raises(InvalidStateError):
                self.rs.acquire(key, self.now)

    # --- invariants, checked after every step ---------------------------------------------------

    @invariant()
    def budgets_and_caps_hold(self) -> None:
        type(self).steps += 1
        for usage in self.rs.devices():
            assert usage.reserved_bytes <= usage.budget_bytes
            assert usage.models <= usage.max_models
            assert usage.reserved_bytes == self.reserved(usage.id)
            assert usage.models == self.count(usage.id)
            assert usage.unloading_bytes == sum(
                m.bytes
                for m in self.models.values()
                if m.device == usage.id and m.state == UNLOADING
            )

    @invariant()
    def snapshot_agrees(self) -> None:
        got = {
            r.key: (r.device, r.state, r.bytes, r.refcount, r.pinned, r.keep_alive, r.expires_at)
            for r in self.rs.snapshot()
        }
        want = {
            k: (m.device, m.state, m.bytes, m.refcount, m.pinned, m.keep_alive, m.expires_at)
            for k, m in self.models.items()
        }
        assert got == want


def _machine_for(policy: str) -> type[ResidentSetMachine]:
    return type(f"ResidentSetMachine_{policy}", (ResidentSetMachine,), {"policy": policy})


_COMMON = {"deadline": None, "suppress_health_check": list(HealthCheck), "derandomize": False}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy", policy_names())
def test_stateful_10k_steps(policy: str) -> None:
    machine = _machine_for(policy)
    machine.TestCase.settings = settings(max_examples=150, stateful_step_count=100, **_COMMON)
    machine.TestCase().runTest()
    assert machine.steps >= 10_000


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("policy", policy_names())
def test_stateful_1m_steps(policy: str) -> None:
    machine = _machine_for(policy)
    machine.TestCase.settings = settings(max_examples=7_500, stateful_step_count=200, **_COMMON)
    machine.TestCase().runTest()
    assert machine.steps >= 1_000_000
