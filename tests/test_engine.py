"""The scheduling engine through its binding: events in, actions out, on an injected clock."""

from __future__ import annotations

import pytest

from residency import (
    Action,
    ActionKind,
    Device,
    Discipline,
    Engine,
    InvalidArgumentError,
    LoadShape,
    RejectCode,
    ReservationState,
)

GiB = 1 << 30
S = 1_000_000_000
SHAPE = LoadShape(ctx=2048)
KA = 300 * S


def kinds(actions: list[Action]) -> list[tuple[str, int | str]]:
    """(kind, request) for grants/rejects/estimates, (kind, key) for loads and stops."""
    out: list[tuple[str, int | str]] = []
    for a in actions:
        name = a.kind.name.lower()
        out.append((name, a.key if a.kind in (ActionKind.LOAD, ActionKind.STOP) else a.request))
    return out


def one_slot(queue: str = "affinity", **kw: int) -> Engine:
    """Room for one 6 GiB model at a time."""
    return Engine([Device("gpu0", 8 * GiB, 0, 3)], "ollama", queue, **kw)


def test_arrival_loads_then_grants_joining_requests_as_cold() -> None:
    e = one_slot()
    first = e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    assert kinds(first) == [("load", "a"), ("grant", 1)]
    assert first[0].device == "gpu0"
    assert first[0].bytes == 6 * GiB
    assert first[1].joined_load
    joined = e.arrive(2, "a", SHAPE, 6 * GiB, KA, S)
    assert kinds(joined) == [("grant", 2)]
    assert joined[0].joined_load
    assert e.ready("a", 2 * S, 2.0) == []
    warm = e.arrive(3, "a", SHAPE, 6 * GiB, KA, 3 * S)
    assert kinds(warm) == [("grant", 3)]
    assert not warm[0].joined_load
    assert e.resident_set.reservation("a").refcount == 3  # type: ignore[union-attr]


def test_request_for_an_unloading_model_waits_and_reloads() -> None:
    """The race: `a` is chosen as a victim, and a request for `a` arrives in the same instant."""
    e = one_slot()
    e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    e.ready("a", S, 1.0)
    e.done(1, 2 * S)
    e.arrive(2, "b", SHAPE, 6 * GiB, KA, 3 * S)  # evicts idle a
    assert e.resident_set.reservation("a").state == ReservationState.UNLOADING  # type: ignore[union-attr]
    racing = e.arrive(3, "a", SHAPE, 6 * GiB, KA, 3 * S)
    assert kinds(racing) == [("prefetch", 3)]  # queued, not an error; its file read ahead
    e.ready("b", 4 * S, 1.0)
    assert e.gone("a", 4 * S) == []  # b still holds the room
    after = e.done(2, 5 * S)
    assert kinds(after) == [("stop", "b"), ("load", "a"), ("grant", 3)]
    assert after[2].joined_load


def test_request_at_the_instant_of_expiry_is_served_or_reloads() -> None:
    e = one_slot()
    e.arrive(1, "a", SHAPE, 6 * GiB, 10 * S, 0)
    e.ready("a", S, 1.0)
    e.done(1, 2 * S)
    assert e.next_deadline() == 12 * S
    # Arrival before the timer ran: the idle model is still ready and serves it.
    assert kinds(e.arrive(2, "a", SHAPE, 6 * GiB, 10 * S, 12 * S)) == [("grant", 2)]
    e.done(2, 13 * S)
    # The timer runs first: the request after it waits for the stop and reloads.
    assert kinds(e.tick(23 * S)) == [("stop", "a")]
    assert kinds(e.arrive(3, "a", SHAPE, 6 * GiB, 10 * S, 23 * S)) == [("prefetch", 3)]
    assert kinds(e.gone("a", 24 * S)) == [("load", "a"), ("grant", 3)]


def test_affinity_does_not_let_a_later_load_barge_ahead() -> None:
    """a busy 0..1 s; big asks at 0.3 s, c at 0.5 s: big loads first, c after it."""
    e = Engine([Device("gpu0", 10 * GiB, 0, 3)], "ollama", "affinity")
    e.arrive(1, "a", SHAPE, 3 * GiB, KA, 0)
    e.ready("a", S // 10, 0.1)
    assert kinds(e.arrive(2, "big", SHAPE, 9 * GiB, KA, 3 * S // 10)) == [("prefetch", 2)]
    # c fits, but big is older: c waits too (and its file is read ahead meanwhile).
    assert kinds(e.arrive(3, "c", SHAPE, 2 * GiB, KA, 5 * S // 10)) == [("prefetch", 3)]
    after = e.done(1, S)
    assert kinds(after) == [("stop", "a"), ("load", "big"), ("grant", 2)]
    e.ready("big", 2 * S, 1.0)
    assert kinds(e.done(2, 3 * S)) == [("stop", "big"), ("load", "c"), ("grant", 3)]


def test_ollama_loads_one_at_a_time_affinity_in_parallel() -> None:
    devices = [Device("gpu0", 8 * GiB, 0, 3), Device("gpu1", 8 * GiB, 0, 3)]
    for queue, expected in (("ollama", [("load", "a"), ("grant", 1)]), ("affinity", None)):
        e = Engine(devices, "ollama", queue)
        e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
        second = e.arrive(2, "b", SHAPE, 6 * GiB, KA, 1)
        if queue == "ollama":
            assert kinds(second) == [("prefetch", 2)]  # waits for a's load; b's file read ahead
            assert e.loads_in_flight() == 1
            assert kinds(e.ready("a", S, 1.0)) == [("load", "b"), ("grant", 2)]
        else:
            assert kinds(second) == [("load", "b"), ("grant", 2)]
            assert second[0].device == "gpu1"
            assert e.loads_in_flight() == 2
        assert expected is None or e.discipline == Discipline.OLLAMA


def test_ollama_followers_of_a_load_wait_for_it_affinity_riders_join() -> None:
    for queue, joined in (("ollama", False), ("affinity", True)):
        e = one_slot(queue)
        e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
        follower = e.arrive(2, "a", SHAPE, 6 * GiB, KA, 1)
        if joined:
            assert kinds(follower) == [("grant", 2)]
            assert follower[0].joined_load
        else:
            assert follower == []
            assert kinds(e.ready("a", S, 1.0)) == [("grant", 2)]


def test_starvation_deadline_stops_pass_through() -> None:
    """A steady stream for ready `a` keeps it busy; past the deadline they queue behind big."""
    e = Engine([Device("gpu0", 10 * GiB, 0, 3)], "ollama", "affinity", starvation_ns=5 * S)
    e.arrive(0, "a", SHAPE, 3 * GiB, KA, 0)
    e.ready("a", S, 1.0)
    assert kinds(e.arrive(1000, "big", SHAPE, 9 * GiB, KA, S)) == [("prefetch", 1000)]
    granted_big = None
    request = 1
    for t in range(2, 30):  # a new request every second, each lasting 1.5 s
        now = t * S
        for a in e.arrive(request, "a", SHAPE, 3 * GiB, KA, now):
            if a.kind == ActionKind.GRANT and a.request == 1000:
                granted_big = now
        for a in e.done(request - 1, now + S // 2):
            if a.kind == ActionKind.GRANT and a.request == 1000:
                granted_big = now + S // 2
        request += 1
        if granted_big is not None:
            break
    assert granted_big is not None
    # Overdue at 6 s; the last pass-through request (5 s) is done by 6.5 s.
    assert granted_big - S <= 5 * S + 2 * S


def test_options_that_need_more_memory_reload_once_idle() -> None:
    e = one_slot()
    e.arrive(1, "a", SHAPE, 3 * GiB, KA, 0)
    e.ready("a", S, 1.0)
    bigger = LoadShape(ctx=8192)
    assert e.arrive(2, "a", bigger, 6 * GiB, KA, 2 * S) == []
    assert kinds(e.done(1, 3 * S)) == [("stop", "a")]
    assert kinds(e.gone("a", 4 * S)) == [("load", "a"), ("grant", 2)]
    assert e.shape("a").ctx == 8192  # type: ignore[union-attr]
    # A smaller request rides on the larger runner.
    assert kinds(e.arrive(3, "a", SHAPE, 3 * GiB, KA, 5 * S)) == [("grant", 3)]


def test_failed_load_rejects_its_requests_and_frees_the_room() -> None:
    e = one_slot()
    e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    e.arrive(2, "a", SHAPE, 6 * GiB, KA, 1)
    out = e.failed("a", "runner exited", S)
    assert kinds(out) == [("reject", 1), ("reject", 2), ("stop", "a")]
    assert all(a.code == RejectCode.FAILED for a in out[:2])
    assert e.done(1, 2 * S) == []  # a voided grant gives nothing back
    e.gone("a", 2 * S)
    assert e.resident_set.devices()[0].reserved_bytes == 0
    assert kinds(e.arrive(3, "a", SHAPE, 6 * GiB, KA, 3 * S)) == [("load", "a"), ("grant", 3)]


def test_too_large_busy_estimate_cancel_and_unload() -> None:
    e = one_slot(max_queue=2)  # a request joining a load counts as waiting
    big = e.arrive(1, "huge", SHAPE, 9 * GiB, KA, 0)
    assert kinds(big) == [("reject", 1)]
    assert big[0].code == RejectCode.TOO_LARGE
    e.arrive(2, "a", SHAPE, 6 * GiB, KA, 0)
    assert kinds(e.arrive(3, "b", SHAPE, 0, KA, 1)) == [("estimate", 3)]
    assert e.queued() == 2
    busy = e.arrive(4, "c", SHAPE, 6 * GiB, KA, 2)
    assert busy[0].code == RejectCode.BUSY
    e.ready("a", S, 1.0)
    assert e.queued() == 1
    assert kinds(e.done(2, 2 * S)) == []  # b's bytes are not known yet
    assert kinds(e.sized(3, 6 * GiB, 2 * S)) == [("stop", "a"), ("load", "b"), ("grant", 3)]
    assert kinds(e.unload("b", 3 * S)) == []  # busy: unloads when idle
    assert kinds(e.done(3, 4 * S)) == []  # still loading
    assert kinds(e.ready("b", 5 * S, 1.0)) == [("stop", "b")]
    # Unloading models no longer count against the budget (the driver awaits their memory).
    assert kinds(e.arrive(5, "c", SHAPE, 6 * GiB, KA, 6 * S)) == [("load", "c"), ("grant", 5)]
    assert kinds(e.arrive(7, "d", SHAPE, 6 * GiB, KA, 6 * S)) == [("prefetch", 7)]  # d waits
    assert e.queued() == 2  # d, and 5 joining c's load
    e.cancel(7, 7 * S)
    assert e.queued() == 1
    e.cancel(5, 7 * S)  # a granted request that gives up releases its reference
    assert e.queued() == 0
    assert e.resident_set.reservation("c").refcount == 0  # type: ignore[union-attr]
    e.arrive(6, "c", SHAPE, 6 * GiB, KA, 8 * S)
    with pytest.raises(InvalidArgumentError, match="already in use"):
        e.arrive(6, "c", SHAPE, GiB, KA, 8 * S)


def test_estimate_is_asked_for_only_when_a_load_is_needed() -> None:
    e = one_slot()
    out = e.arrive(1, "a", SHAPE, 0, KA, 0)
    assert kinds(out) == [("estimate", 1)]
    assert kinds(e.sized(1, 6 * GiB, 1)) == [("load", "a"), ("grant", 1)]
    assert kinds(e.arrive(2, "a", SHAPE, 0, KA, 2)) == [("grant", 2)]  # rides, no estimate


def test_a_waiting_load_asks_once_for_its_file_to_be_read_ahead() -> None:
    e = one_slot()
    e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    # b must wait for busy a: the engine says to read b's file into RAM meanwhile, once.
    waiting = e.arrive(2, "b", SHAPE, 6 * GiB, KA, 1)
    assert kinds(waiting) == [("prefetch", 2)]
    assert waiting[0].key == "b"
    assert waiting[0].bytes == 6 * GiB
    assert e.arrive(3, "b", SHAPE, 6 * GiB, KA, 2) == []  # asked for already
    # Bytes unknown: the prefetch comes once the request is sized and still has to wait.
    assert kinds(e.arrive(4, "c", SHAPE, 0, KA, 3)) == [("estimate", 4)]
    assert kinds(e.sized(4, 6 * GiB, 4)) == [("prefetch", 4)]
    # A loading or ready model's runner reads its own file: riders ask for nothing.
    assert kinds(e.arrive(5, "a", SHAPE, 6 * GiB, KA, 5)) == [("grant", 5)]


def test_journal_and_adaptive_deadline() -> None:
    e = Engine([Device("gpu0", 8 * GiB)], journal=True)
    assert e.starvation_ns > 0
    e.arrive(1, "a", SHAPE, GiB, KA, 0)
    e.ready("a", 4 * S, 4.0)
    assert e.starvation_ns == 4 * S  # the mean load time
    assert e.journal() == [
        "0 load r1 a on gpu0 (1073741824 bytes)",
        "0 grant r1 a joining its load",
    ]
    with pytest.raises(InvalidArgumentError):
        Engine([Device("gpu0", GiB)], queue="lifo")


def test_a_queued_request_times_out_at_its_deadline() -> None:
    """The core owns the queue's deadline: next_deadline() names it, and a tick at that instant
    rejects exactly the requests queued that long (TimedOut), leaving the rest queued."""
    e = one_slot(queue_timeout_ns=10 * S)
    e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    e.ready("a", S, 1.0)  # request 1 holds a: b cannot load beside it
    assert kinds(e.arrive(2, "b", SHAPE, 6 * GiB, KA, 2 * S)) == [("prefetch", 2)]
    assert e.arrive(3, "b", SHAPE, 6 * GiB, KA, 5 * S) == []
    assert e.oldest_wait(6 * S) == 4 * S
    assert e.next_deadline() == 12 * S
    assert e.tick(12 * S - 1) == []
    timed_out = e.tick(12 * S)
    assert kinds(timed_out) == [("reject", 2)]
    assert timed_out[0].code == RejectCode.TIMED_OUT
    assert "waited 10.0 s in the queue for 'b'" in timed_out[0].reason
    assert e.queued() == 1
    assert e.next_deadline() == 15 * S
    # Once a's request is done, b loads for the one still waiting.
    assert kinds(e.done(1, 13 * S)) == [("stop", "a"), ("load", "b"), ("grant", 3)]
    assert e.oldest_wait(13 * S) == 0


def test_without_a_queue_timeout_requests_wait_as_long_as_it_takes() -> None:
    e = one_slot()
    e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    e.ready("a", S, 1.0)
    e.arrive(2, "b", SHAPE, 6 * GiB, KA, 2 * S)
    assert e.next_deadline() is None  # a is busy: no keep-alive runs, and no queue deadline
    assert e.tick(10_000 * S) == []
    assert e.queued() == 1


def test_a_fresh_unload_lets_requests_in_flight_finish_and_newcomers_wait() -> None:
    """Reload: the model's configuration changed. Its busy runner serves the requests it has;
    a newcomer waits (never joins the old runner) and gets a fresh one once the old one is gone."""
    e = one_slot()
    e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    e.ready("a", S, 1.0)
    assert e.unload("a", 2 * S, fresh=True) == []  # busy: stops after request 1
    assert e.arrive(2, "a", SHAPE, 6 * GiB, KA, 3 * S) == []  # waits
    assert kinds(e.done(1, 4 * S)) == [("stop", "a")]
    assert kinds(e.gone("a", 5 * S)) == [("load", "a"), ("grant", 2)]
    # An idle model stops at once.
    e.ready("a", 6 * S, 1.0)
    e.done(2, 7 * S)
    assert kinds(e.unload("a", 8 * S, fresh=True)) == [("stop", "a")]


def test_one_load_at_a_time_while_riders_and_hits_pass() -> None:
    """max_loads=1: a second load waits for the first; its riders and ready models never do."""
    e = Engine([Device("gpu0", 20 * GiB, 0, 3)], "ollama", "affinity", max_loads=1)
    assert kinds(e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)) == [("load", "a"), ("grant", 1)]
    # b fits beside a, but a second load would share the disk with a's: it waits (read ahead).
    assert kinds(e.arrive(2, "b", SHAPE, 6 * GiB, KA, 1)) == [("prefetch", 2)]
    assert kinds(e.arrive(3, "a", SHAPE, 6 * GiB, KA, 2)) == [("grant", 3)]  # rides a's load
    assert e.loads_in_flight() == 1
    assert kinds(e.ready("a", 2 * S, 2.0)) == [("load", "b"), ("grant", 2)]
    assert kinds(e.arrive(4, "a", SHAPE, 6 * GiB, KA, 3 * S)) == [("grant", 4)]  # a hit
    assert e.loads_in_flight() == 1


def test_without_a_limit_loads_run_side_by_side() -> None:
    e = Engine([Device("gpu0", 20 * GiB, 0, 3)], "ollama", "affinity")
    e.arrive(1, "a", SHAPE, 6 * GiB, KA, 0)
    assert kinds(e.arrive(2, "b", SHAPE, 6 * GiB, KA, 1)) == [("load", "b"), ("grant", 2)]
    assert e.loads_in_flight() == 2
