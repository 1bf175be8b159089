"""End to end: KV caches that survive eviction, with the real llama-server and Gemma 3 270M.

A conversation's model is evicted by another model between turns; the next turn is served from
the slot saved before the eviction — proved by llama-server's own count of cached prompt tokens
(`usage.prompt_tokens_details.cached_tokens`), which a fresh runner reports as 0. Restores that
do not match (other options, a changed model file) are not used; a broken file degrades to a
normal prefill; the disk budget holds. A slot still generating at the stop is saved once it
stops, within the save bound; a truncated file (which would abort llama-server) is caught first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from estimate_models import write_llama
from llama_server_fixtures import Server, require_llama_server, start_server
from residency.embedded import default_model_path
from residency.runners import LaunchSpec, LlamaServerRunner
from residency.runners.kvcache import KV_STATS, KvPersistence, enforce_budget
from residency.runners.protocol import EventStream

require_llama_server()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BUDGET = 64 << 20
SYSTEM = "You are a patient assistant. Answer in one short sentence. " * 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("llama-server-kv")
    tiny = write_llama(tmp / "tiny.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    copy = tmp / "gemma-copy.gguf"
    shutil.copyfile(default_model_path(), copy)
    config = f"""
runner = "llama-server"
keep_alive = "5m"
max_loaded_models = 1
default_ctx = 2048
kv_budget = {BUDGET}
[[models]]
name = "chat"
path = "{default_model_path()}"
[[models]]
name = "chat-small"
path = "{default_model_path()}"
ctx = 1024
[[models]]
name = "copy"
path = "{copy}"
[[models]]
name = "tiny"
path = "{tiny}"
kv_persist = false
"""
    yield from start_server(tmp, config)


def _cached(answer: dict[str, object]) -> int:
    usage = answer["usage"]
    assert isinstance(usage, dict)
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def _files(server: Server, model: str) -> list[Path]:
    """`model`'s saved slots (not those of a model whose name starts the same)."""
    pattern = re.compile(rf"{re.escape(model)}-[0-9a-f]{{16}}-[0-9a-f]{{16}}\.bin")
    return [p for p in server.kv_dir.glob("*.bin") if pattern.fullmatch(p.name)]


def _kv(server: Server, model: str) -> dict[str, int]:
    stats: dict[str, int] = server.ps()["kv_cache"].get(model, {})
    return stats


def _turns(server: Server, model: str) -> list[dict[str, str]]:
    """Two turns of a conversation on `model`; the messages so far, ready for a third."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi, I'm Ana."}]
    for follow_up in ("What is a river?", "And a lake?"):
        answer = server.chat(model, messages)
        messages.append(
            {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}
        )
        messages.append({"role": "user", "content": follow_up})
    return messages


def _evict(server: Server, model: str) -> None:
    server.chat("tiny", [{"role": "user", "content": "hello"}])
    assert f"{model}:latest" not in {m["name"] for m in server.ps()["models"]}


def test_next_turn_after_eviction_is_served_from_the_restored_cache(server: Server) -> None:
    messages = _turns(server, "chat")
    _evict(server, "chat")
    saved = _kv(server, "chat")
    assert saved["saved"] >= 1
    assert saved["saved_bytes"] > 0
    assert _files(server, "chat")
    assert not _files(server, "tiny")  # kv_persist = false for tiny

    answer = server.chat("chat", messages)  # a fresh runner for "chat"
    cached = _cached(answer)
    prompt = answer["usage"]["prompt_tokens"]
    # The system prompt and both earlier turns came from the restored slot, not a prefill.
    assert cached > 0.6 * prompt, (cached, prompt, server.log())
    assert _kv(server, "chat")["restored"] == 1


def test_a_restore_for_other_options_is_not_used(server: Server) -> None:
    messages = _turns(server, "chat")
    _evict(server, "chat")
    restored = _kv(server, "chat").get("restored", 0)
    # Same file, another context: another cache layout, so another key — nothing to restore.
    answer = server.chat("chat-small", messages)
    assert _cached(answer) == 0
    assert _kv(server, "chat-small").get("restored", 0) == 0
    assert _kv(server, "chat").get("restored", 0) == restored


def test_a_changed_model_file_drops_its_saved_slots(server: Server) -> None:
    messages = _turns(server, "copy")
    _evict(server, "copy")
    [saved] = _files(server, "copy")
    copy = next(p for p in server.kv_dir.parent.glob("gemma-copy.gguf"))
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    answer = server.chat("copy", messages)
    assert _cached(answer) == 0  # not restored from a file saved for the old model file
    assert not saved.exists()  # and that file is gone


def test_a_broken_saved_file_degrades_to_a_prefill(server: Server) -> None:
    messages = _turns(server, "chat")
    _evict(server, "chat")
    failed = _kv(server, "chat").get("failed", 0)
    newest = max(_files(server, "chat"), key=lambda p: p.stat().st_mtime)
    newest.write_bytes(b"not a llama.cpp slot file")
    answer = server.chat("chat", messages)
    assert answer["choices"][0]["message"]["content"] is not None  # served, by a prefill
    assert _cached(answer) == 0
    assert _kv(server, "chat")["failed"] == failed + 1
    assert "prefilling instead" in server.log(20000)
    assert not newest.exists()  # never tried again


def test_a_truncated_saved_file_is_caught_before_llama_server_reads_it(server: Server) -> None:
    """A slot file cut short keeps a valid header; handed to llama-server it aborts the runner
    (SIGABRT, checked with the vendored build). Its sidecar's size and CRC-32 catch it first."""
    messages = _turns(server, "chat")
    _evict(server, "chat")
    failed = _kv(server, "chat").get("failed", 0)
    newest = max(_files(server, "chat"), key=lambda p: p.stat().st_mtime)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    answer = server.chat("chat", messages)
    assert answer["choices"][0]["message"]["content"] is not None
    assert _cached(answer) == 0  # a prefill
    assert _kv(server, "chat")["failed"] == failed + 1
    assert not newest.exists()
    assert "size or CRC-32 differs" in server.log(20000)
    assert "exited" not in server.log(20000)  # the runner never saw the file


def test_the_disk_budget_holds(server: Server, tmp_path: Path) -> None:
    used = sum(p.stat().st_size for p in server.kv_dir.glob("*.bin"))
    assert 0 < used <= BUDGET
    # And the LRU rule itself: the least recently used files go first.
    for i, age in enumerate((300, 200, 100)):
        f = tmp_path / f"m-{'0' * 16}-{i:016x}.bin"
        f.write_bytes(b"x" * 1000)
        f.with_suffix(".json").write_text("{}")
        os.utime(f, (f.stat().st_atime - age, f.stat().st_mtime - age))
    enforce_budget(tmp_path, 2000)
    assert sorted(p.name[-5:] for p in tmp_path.glob("*.bin")) == ["1.bin", "2.bin"]
    assert not (tmp_path / f"m-{'0' * 16}-{0:016x}.json").exists()


# ---- the stop path, on one runner ---------------------------------------------------------------
def _runner(tmp_path: Path, name: str, save_timeout_s: float) -> LlamaServerRunner:
    kv = KvPersistence(directory=tmp_path / "kv", save_timeout_s=save_timeout_s)
    spec = LaunchSpec(name=name, model_path=default_model_path(), ctx=1024, parallel=1,
                      kv_type="f16", gpu_layers=0, kv=kv)  # fmt: skip
    return LlamaServerRunner(spec)


async def _generating(runner: LlamaServerRunner, max_tokens: int) -> EventStream:
    """A streamed request still generating (EOS ignored) once its first event arrived."""
    await runner.start()
    await runner.wait_ready(120)
    body = {
        "messages": [{"role": "user", "content": "Count to one hundred."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    stream = await runner.api.stream("/v1/chat/completions", body)
    slots = json.loads((await runner.client.get("/slots")).content)
    assert slots[0]["is_processing"], slots
    return stream


async def test_a_slot_still_generating_at_stop_is_saved_when_it_stops(tmp_path: Path) -> None:
    runner = _runner(tmp_path, "kv-generating", save_timeout_s=60)
    stream = await _generating(runner, max_tokens=32)
    try:
        await runner.stop()  # llama-server defers the save until the generation ends
    finally:
        await stream.aclose()
    assert KV_STATS.of("kv-generating").saved == 1
    [meta] = (tmp_path / "kv").glob("*.json")
    saved = json.loads(meta.read_text())
    # The prompt and the 32 generated tokens: the whole conversation so far.
    assert saved["tokens"] >= 32 + 10, saved


async def test_a_slot_generating_past_the_save_bound_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = _runner(tmp_path, "kv-bounded", save_timeout_s=0.5)
    stream = await _generating(runner, max_tokens=900)
    try:
        with caplog.at_level(logging.WARNING):
            await runner.stop(0)  # as an eviction stops it: SIGKILL once the saves are done
    finally:
        await stream.aclose()
    assert "took over 0.5 s: the rest skipped" in caplog.text
    assert KV_STATS.of("kv-bounded").saved == 0
    assert not list((tmp_path / "kv").glob("*.json"))
