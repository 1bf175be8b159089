"""The request router's policy, on replica stats alone (residency.ray.stats): no Ray needed."""

from __future__ import annotations

from typing import Any

from residency.ray.stats import rank, tier_of

MIB = 1 << 20


def replica(
    *,
    models: dict[str, str] | None = None,
    budget: int = 1000 * MIB,
    reserved: int = 0,
    idle: int = 0,
    held: int = 0,
    max_models: int = 3,
    warm: tuple[str, ...] = (),
    need: dict[str, int] | None = None,
    cannot_fit: tuple[str, ...] = (),
    queued: int = 0,
) -> dict[str, Any]:
    return {
        "queued": queued,
        "in_flight": 0,
        "models": {
            m: {"state": s, "device": "gpu0", "bytes": 1, "refcount": 0}
            for m, s in (models or {}).items()
        },
        "devices": [
            {
                "id": "gpu0",
                "budget": budget,
                "reserved": reserved,
                "idle": idle,
                "models": held,
                "max_models": max_models,
            }
        ],
        "warm": list(warm),
        "need": need if need is not None else {"m": 100 * MIB},
        "cannot_fit": list(cannot_fit),
    }


def test_ready_then_loading_then_warm_then_free_budget() -> None:
    stats = {
        "fits": replica(),
        "warm": replica(warm=("m",)),
        "loading": replica(models={"m": "loading"}),
        "ready": replica(models={"m": "ready"}),
    }
    assert rank("m", stats) == [["ready"], ["loading"], ["warm"], ["fits"]]


def test_never_a_replica_that_reported_the_model_cannot_fit() -> None:
    stats = {"small": replica(cannot_fit=("m",)), "big": replica()}
    assert rank("m", stats) == [["big"]]
    assert tier_of("m", stats["small"]) is None
    assert rank("m", {"small": replica(cannot_fit=("m",))}) == []
    # A replica that has not reported yet (a roll) is tried only when no known one takes it.
    assert rank("m", {"new": None, "big": replica()}) == [["big"]]
    assert rank("m", {"new": None, "small": replica(cannot_fit=("m",))}) == [["new"]]


def test_more_free_budget_first_and_never_past_a_busy_model() -> None:
    stats = {
        "roomy": replica(reserved=100 * MIB),
        "roomier": replica(reserved=0),
        # Room only once idle models are unloaded: after those that fit as they are.
        "evicts": replica(reserved=950 * MIB, idle=500 * MIB),
        # Room only once busy models finish: last, it would queue there.
        "busy": replica(reserved=950 * MIB, idle=0),
    }
    assert rank("m", stats) == [["roomier"], ["roomy"], ["evicts"], ["busy"]]
    # The device's model cap counts as room too: a full slot list means evicting.
    full = {"capped": replica(held=3, reserved=300 * MIB, idle=300 * MIB), "open": replica()}
    assert rank("m", full) == [["open"], ["capped"]]


def test_ties_go_to_the_shorter_queue() -> None:
    stats = {
        "a": replica(models={"m": "ready"}, queued=5),
        "b": replica(models={"m": "ready"}, queued=1),
    }
    assert rank("m", stats) == [["b", "a"]]  # one rank: Serve takes the shortest queue in it
    cold = {"a": replica(queued=3), "b": replica(queued=0)}
    assert rank("m", cold) == [["b"], ["a"]]  # one load, on the idle replica
    assert rank("m", cold, queue={"a": 0, "b": 4}) == [["a"], ["b"]]  # the router's live count


def test_a_model_just_sent_somewhere_counts_as_loading_there() -> None:
    stats = {"a": replica(), "b": replica(reserved=10 * MIB)}
    assert rank("m", stats) == [["a"], ["b"]]
    assert rank("m", stats, placed="b") == [["b"], ["a"]]
    # ...but never above a replica where it is ready, nor onto one where it cannot fit.
    ready = {"a": replica(models={"m": "ready"}), "b": replica()}
    assert rank("m", ready, placed="b")[0] == ["a"]
    assert rank("m", {"b": replica(cannot_fit=("m",))}, placed="b") == []


def test_replicas_without_stats_are_tried_only_when_no_known_one_takes_the_model() -> None:
    assert rank("m", {"new": {}, "known": replica()}) == [["known"]]
    assert rank("m", {"new": {}, "full": replica(cannot_fit=("m",))}) == [["new"]]
