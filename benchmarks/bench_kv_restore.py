"""The next turn of a long conversation after its model was evicted: KV restore vs prefill.

A conversation of several thousand tokens (Gemma 3 270M, the embedded model) is served once by a
llama-server runner, which is then stopped — residency saves its slot on the way (the same stop
path an eviction takes). Each repetition then starts two fresh runners of the same model, in
alternating order, and sends the same next turn to each:

- restore: KV persistence on — the saved slot is restored before the request (runners.kvcache);
- prefill: KV persistence off — the whole conversation is evaluated again (what Ollama does).

Time to first token is measured from the request, on a ready runner (the load is the same in
both). Each repetition asks a different next question, so what it restores is always the saved
conversation, never a slot saved by the previous repetition (whose stop is timed as a save).

    python benchmarks/bench_kv_restore.py [--repetitions 5] [--quick]

Last stdout line, one JSON object (medians): context_tokens, ttft_restore_p50_ms,
ttft_prefill_p50_ms, ratio (restore / prefill; target ≤ 0.2 at ≥ 4,000 tokens), save_ms_p50,
restore_ms_p50 (llama-server's own timings of the file write and read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from residency.embedded import default_model_path
from residency.runners import LaunchSpec, LlamaServerRunner
from residency.runners.build import find_llama_server
from residency.runners.kvcache import KV_STATS, KvPersistence

MODEL = "bench-kv"
TOPICS = ["rivers", "mountains", "deserts", "forests", "oceans", "glaciers", "islands", "caves"]


def conversation(target_tokens: int) -> list[dict[str, str]]:
    """A chat of about `target_tokens` tokens (≈ 1.3 tokens per word of this text)."""
    messages = [{"role": "system", "content": "You are a geography tutor. Answer briefly."}]
    words = 0
    i = 0
    while words * 1.3 < target_tokens:
        topic = TOPICS[i % len(TOPICS)]
        question = f"Lesson {i}: tell me about {topic} number {i} and why they matter."
        answer = " ".join(
            f"Fact {i}.{j}: {topic} shape the land, hold water and shelter life in region {j}."
            for j in range(6)
        )
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        words += len(question.split()) + len(answer.split())
        i += 1
    return messages


def spec(ctx: int, kv: KvPersistence | None) -> LaunchSpec:
    path = default_model_path()
    return LaunchSpec(
        name=MODEL, model_path=path, ctx=ctx, parallel=1, kv_type="f16", gpu_layers=0, kv=kv
    )


async def started(ctx: int, kv: KvPersistence | None) -> LlamaServerRunner:
    runner = LlamaServerRunner(spec(ctx, kv))
    await runner.start()
    await runner.wait_ready(300)
    return runner


async def ttft(runner: LlamaServerRunner, messages: list[dict[str, str]]) -> tuple[float, int]:
    """(ms from the request to the first token, prompt tokens it found cached)."""
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter_ns()
    stream = await runner.api.stream("/v1/chat/completions", body)
    cached = 0
    try:
        first = stream.first_at
        async for event, _ in stream:
            usage: dict[str, Any] = event.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            cached = int(details.get("cached_tokens") or cached)
    finally:
        await stream.aclose()
    assert first is not None, "the runner streamed nothing"
    return (first - t0) / 1e6, cached


async def prompt_tokens(runner: LlamaServerRunner, messages: list[dict[str, str]]) -> int:
    body = {"messages": messages, "max_tokens": 1, "temperature": 0}
    answer = json.loads(await runner.api.complete("/v1/chat/completions", body))
    return int(answer["usage"]["prompt_tokens"])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4500, help="conversation length to build")
    ap.add_argument("--quick", action="store_true", help="2 repetitions of a 500-token chat")
    args = ap.parse_args()
    if args.quick:
        args.repetitions, args.tokens = 2, 500
    if find_llama_server() is None:
        sys.exit("no llama-server: build it with scripts/build-llama-server.sh")
    ctx = max(2048, int(args.tokens * 1.5))
    history = conversation(args.tokens)
    with tempfile.TemporaryDirectory() as kv_dir:
        on = KvPersistence(directory=Path(kv_dir), budget_bytes=8 << 30)
        first = await started(ctx, on)
        # The chat up to its last question, as it was served: what the saved slot holds. The
        # next turns add the answer (given here) and a new question.
        context_tokens = await prompt_tokens(first, history[:-1])
        await first.stop()  # saves the conversation's slot
        assert KV_STATS.of(MODEL).saved == 1, "the conversation's slot was not saved"
        restore_ms, prefill_ms, save_ms, restore_file_ms = [], [], [], []
        for rep in range(args.repetitions):
            turn = [*history, {"role": "user", "content": f"Question {rep}: which was lesson 0?"}]
            order = ("restore", "prefill") if rep % 2 == 0 else ("prefill", "restore")
            for mode in order:
                runner = await started(ctx, on if mode == "restore" else None)
                try:
                    took, cached = await ttft(runner, turn)
                finally:
                    await runner.stop()  # with KV on: saves this turn's slot (timed below)
                if mode == "restore":
                    assert cached >= 0.9 * context_tokens, f"restored only {cached} tokens"
                    restore_ms.append(took)
                    restore_file_ms.append(KV_STATS.of(MODEL).last_restore_ms)
                    save_ms.append(KV_STATS.of(MODEL).last_save_ms)
                else:
                    assert cached == 0, "the prefill runner must start empty"
                    prefill_ms.append(took)
            print(f"repetition {rep}: ttft restore {restore_ms[-1]:.0f} ms, prefill "
                  f"{prefill_ms[-1]:.0f} ms, save {save_ms[-1]:.1f} ms, restore file "
                  f"{restore_file_ms[-1]:.1f} ms", flush=True)  # fmt: skip
    restore, prefill = statistics.median(restore_ms), statistics.median(prefill_ms)
    result = {
        "context_tokens": context_tokens,
        "ttft_restore_p50_ms": round(restore, 1),
        "ttft_prefill_p50_ms": round(prefill, 1),
        "ratio": round(restore / prefill, 3),
        "save_ms_p50": round(statistics.median(save_ms), 1),
        "restore_ms_p50": round(statistics.median(restore_file_ms), 1),
        "repetitions": args.repetitions,
        "target_ratio": 0.2,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
