"""The core's host tier: which model files stay warm in RAM. Its invariants under random event
sequences (kept bytes never above the budget, a mapped file never dropped, the same events the
same decisions) and its decisions on small hand-computed cases."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from residency._core import HostAction, HostActionKind, HostTier, InvalidArgumentError

NS = 1_000_000_000
HOUR = 3600 * NS
KEYS = [f"m{i}" for i in range(6)]
SIZES = {k: (i + 1) * 10 for i, k in enumerate(KEYS)}


def kinds(actions: list[HostAction]) -> list[tuple[str, str]]:
    return [(a.kind.name, a.key) for a in actions]


def drops(actions: list[HostAction]) -> list[tuple[str, int, int]]:
    """(key, bytes dropped, bytes kept from the start) of each Drop."""
    return [(a.key, a.bytes, a.keep) for a in actions if a.kind == HostActionKind.DROP]


def test_a_file_loaded_often_stays_and_a_rare_one_is_read_around_beyond_the_room() -> None:
    t = HostTier(100, HOUR)
    for i in range(3):
        assert t.loaded("hot", 60, i * NS) == []
    assert t.kept("hot")
    assert t.kept_bytes == 60
    # 60 + 50 > 100, and the newcomer was used less than "hot": it keeps what room is left (its
    # first 40 bytes, as the kernel keeps pages) and its tail is dropped after its load.
    assert drops(t.loaded("rare", 50, 5 * NS)) == [("rare", 10, 40)]
    assert t.kept_of("hot") == 60
    assert t.kept_of("rare") == 40
    assert t.warm_bytes("rare") == 40
    assert t.kept_bytes == 100


def test_a_more_frequent_file_takes_only_the_room_it_needs_from_the_least_valuable() -> None:
    t = HostTier(100, HOUR)
    t.loaded("old", 60, 0)
    t.loaded("old", 60, NS)
    # Used once against twice: "old" keeps all of its 60, the newcomer the 40 left.
    assert drops(t.loaded("new", 50, 10 * NS)) == [("new", 10, 40)]
    assert t.kept_of("old") == 60
    # Twice, and more recently: now "new" is worth more, and "old" gives up only its last 10.
    assert drops(t.loaded("new", 50, 11 * NS)) == [("old", 10, 50)]
    assert t.kept_of("new") == 50
    assert t.kept_of("old") == 50
    assert t.warm_bytes("old") == 50
    assert t.kept_bytes == 100
    # A third file worth more than both takes all of the least valuable one, then part of the next.
    for i in range(3):
        t.loaded("hot", 70, (12 + i) * NS)
    assert t.kept_of("hot") == 70
    assert t.kept_of("old") + t.kept_of("new") == 30
    assert t.kept_bytes == 100


def test_a_mapped_file_is_dropped_only_when_unmapped() -> None:
    t = HostTier(100, HOUR)
    t.loaded("hot", 80, 0)
    t.loaded("hot", 80, NS)
    t.mapped("rare", True, 2 * NS)
    assert t.loaded("rare", 50, 2 * NS) == []  # mapped: nothing dropped although 20 are kept
    assert t.warm_bytes("rare") == 50
    assert drops(t.mapped("rare", False, 3 * NS)) == [("rare", 30, 20)]
    assert t.warm_bytes("rare") == 20
    # A file bigger than the whole budget keeps at most the budget.
    t2 = HostTier(100, HOUR)
    assert drops(t2.loaded("huge", 150, 0)) == [("huge", 50, 100)]
    assert t2.kept_of("huge") == 100


def test_a_waiting_load_is_prefetched_when_admitted() -> None:
    t = HostTier(100, HOUR)
    assert kinds(t.waiting("a", 40, 0)) == [("WARM", "a")]  # room: warm it during the wait
    assert t.waiting("a", 40, NS) == []  # already warm
    t.loaded("b", 60, 2 * NS)
    t.loaded("b", 60, 3 * NS)
    # No room left: the load will read c into RAM anyway, so its prefetch takes the room it needs
    # from the least valuable file (a, used once; b twice), which keeps its first 10 bytes.
    got = t.waiting("c", 30, 4 * NS)
    assert drops(got) == [("a", 30, 10)]
    assert [(x.key, x.bytes) for x in got if x.kind == HostActionKind.WARM] == [("c", 30)]
    assert (t.kept_of("a"), t.kept_of("b"), t.kept_of("c")) == (10, 60, 30)


def test_decay_halves_a_use_per_half_life() -> None:
    t = HostTier(100, HOUR)
    t.loaded("a", 10, 0)
    assert t.frequency("a", HOUR) == pytest.approx(0.5)
    assert t.frequency("a", 2 * HOUR) == pytest.approx(0.25)


def test_bad_half_life_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        HostTier(100, 0)


class TierMachine(RuleBasedStateMachine):
    """Random loads, waits, maps and measurements, replayed on a twin to check determinism."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = 100
        self.tier = HostTier(self.budget, HOUR)
        self.twin = HostTier(self.budget, HOUR)
        self.now = 0
        self.mapped: set[str] = set()

    def both(self, name: str, *args: object) -> list[HostAction]:
        got = getattr(self.tier, name)(*args)
        again = getattr(self.twin, name)(*args)
        assert kinds(got) == kinds(again)
        for a in got:
            assert not (a.kind == HostActionKind.DROP and a.key in self.mapped), a
        return got  # type: ignore[no-any-return]

    @rule(key=st.sampled_from(KEYS), dt=st.integers(0, 2 * HOUR))
    def load(self, key: str, dt: int) -> None:
        self.now += dt
        self.both("loaded", key, SIZES[key], self.now)

    @rule(key=st.sampled_from(KEYS), dt=st.integers(0, HOUR))
    def wait(self, key: str, dt: int) -> None:
        self.now += dt
        self.both("waiting", key, SIZES[key], self.now)

    @rule(key=st.sampled_from(KEYS), on=st.booleans())
    def map(self, key: str, on: bool) -> None:
        if on:
            self.mapped.add(key)
            self.both("mapped", key, True, self.now)
        else:
            self.mapped.discard(key)  # unmapping may drop it: it is no longer mapped
            self.both("mapped", key, False, self.now)

    @rule(key=st.sampled_from(KEYS), warm=st.integers(0, 70))
    def measure(self, key: str, warm: int) -> None:
        self.both("measured", key, warm, self.now)

    @invariant()
    def within_budget(self) -> None:
        assert self.tier.kept_bytes <= self.budget
        assert sum(self.tier.kept_of(k) for k in KEYS) == self.tier.kept_bytes
        for k in KEYS:  # what is not mapped is never warm beyond what the tier keeps of it
            if k not in self.mapped:
                assert self.tier.warm_bytes(k) <= self.tier.kept_of(k)
        unmapped_warm = sum(self.tier.warm_bytes(k) for k in KEYS if k not in self.mapped)
        assert unmapped_warm <= self.budget
        assert self.tier.kept_bytes == self.twin.kept_bytes


TestTierMachine = TierMachine.TestCase
TestTierMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
