"""Conversations in the simulator: traces whose turns carry growing context, and what a cold
runner pays for it — a prefill of the context, or with KV persistence a restore of its saved slot
(hand-computed on a small trace, then compared on a synthetic one)."""

from __future__ import annotations

import numpy as np
import pytest

from residency.sim import ModelSpec, SimConfig, Trace, TraceConfig, make_trace, simulate
from residency.sim.conversations import REFERENCE_GB
from residency.sim.trace import GB


def test_turns_carry_the_growing_context_of_their_conversation() -> None:
    cfg = TraceConfig(n_requests=3_000, total_rate=0.2, seed=3, turns_mean=6)
    trace = make_trace(cfg)
    assert trace.conversation is not None
    assert trace.context is not None
    seen: dict[int, tuple[int, int]] = {}  # conversation → (model, last context)
    for conv, ctx, mi in zip(trace.conversation, trace.context, trace.model, strict=True):
        if conv not in seen:
            assert ctx == 0  # a first turn carries nothing
        else:
            model, last = seen[conv]
            assert model == mi  # the same model
            assert ctx > last  # and more context every turn
        assert ctx <= cfg.max_context_tokens
        seen[int(conv)] = (int(mi), int(ctx))
    turns = len(trace) / len(seen)
    assert 4 < turns < 8  # geometric with mean 6
    # The conversations are drawn last: the rest of the trace is what it was without them.
    plain = make_trace(TraceConfig(n_requests=3_000, total_rate=0.2, seed=3))
    assert plain.context is None
    for field in ("times", "model", "service"):
        assert np.array_equal(getattr(plain, field), getattr(trace, field))


def _two_models(context: int) -> Trace:
    """a (turn 1), b evicts a, a (turn 2 carrying `context` tokens): room for one model."""
    size = int(REFERENCE_GB * GB)  # the calibration model: its figures apply unscaled
    return Trace(
        config=TraceConfig(),
        models=[ModelSpec("a", size, 0.0, 1.0), ModelSpec("b", size, 0.0, 1.0)],
        budget_bytes=size,
        times=np.asarray([0.0, 10.0, 20.0]),
        model=np.asarray([0, 1, 0], dtype=np.int64),
        service=np.asarray([1.0, 1.0, 1.0]),
        conversation=np.asarray([0, 1, 0], dtype=np.int64),
        context=np.asarray([0, 0, context], dtype=np.int64),
    )


def test_a_cold_turn_prefills_its_context_or_restores_its_saved_slot() -> None:
    common = {"policy": "ollama", "recovery_lag_s": 0.0, "prefill_tokens_per_s": 500.0,
              "kv_bytes_per_token": 20_000.0, "kv_restore_gb_per_s": 1.0}  # fmt: skip
    trace = _two_models(context=4_000)
    off = simulate(trace, SimConfig(kv_persist=False, **common))
    on = simulate(trace, SimConfig(kv_persist=True, kv_save_gb_per_s=1.0, **common))
    assert off.cold_loads == on.cold_loads == 3
    assert (off.context_prefills, off.context_restores) == (1, 0)
    assert (on.context_prefills, on.context_restores) == (0, 1)
    assert off.context_s == pytest.approx(4_000 / 500.0)  # 8 s of prefill
    assert on.context_s == pytest.approx(4_000 * 20_000 / GB)  # 0.08 s read back
    # TTFTs: loads of 1 s each, then the third turn's context on top of its load.
    assert off.ttft_mean_s == pytest.approx((1 + 1 + 1 + 8.0) / 3)
    assert on.ttft_mean_s == pytest.approx((1 + 1 + 1 + 0.08) / 3)


def test_a_held_conversation_costs_nothing_and_slots_are_lru() -> None:
    size = int(REFERENCE_GB * GB)
    trace = Trace(
        config=TraceConfig(),
        models=[ModelSpec("a", size, 0.0, 1.0)],
        budget_bytes=size,
        times=np.asarray([0.0, 10.0, 20.0, 30.0]),
        model=np.zeros(4, dtype=np.int64),
        service=np.ones(4),
        conversation=np.asarray([0, 1, 0, 1], dtype=np.int64),
        context=np.asarray([0, 0, 1_000, 1_000], dtype=np.int64),
    )
    two = simulate(trace, SimConfig(parallel=2, prefill_tokens_per_s=1000.0))
    assert two.context_s == 0.0  # both conversations stay in the runner's two slots
    one = simulate(trace, SimConfig(parallel=1, prefill_tokens_per_s=1000.0))
    assert one.context_prefills == 2  # one slot: each conversation pushed the other out
    assert one.context_s == pytest.approx(2.0)


def test_kv_persistence_shortens_first_tokens_on_a_conversation_trace() -> None:
    trace = make_trace(
        TraceConfig(
            n_requests=3_000,
            total_rate=0.1,
            cv=2.0,
            seed=5,
            turns_mean=8,
            min_gb=0.25,
            max_gb=4.0,
            engine_start_s=4.0,
        )
    )
    off = simulate(trace, SimConfig(kv_persist=False))
    on = simulate(trace, SimConfig(kv_persist=True))
    assert off.served == on.served == 3_000
    assert off.context_prefills > 0
    assert off.context_restores == 0
    assert on.context_restores > 0
    assert on.context_s < off.context_s
    assert on.ttft_mean_s < off.ttft_mean_s
