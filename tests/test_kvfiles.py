"""The saved-slot directory without a runner: sidecars and their checksums, stale files."""

from __future__ import annotations

import json
from pathlib import Path

from residency.runners.kvfiles import SlotFiles, cache_key


def _saved(files: SlotFiles, prompt: str, data: bytes) -> str:
    """A file as llama-server leaves it, and its sidecar as residency records it."""
    name = files.name_for(prompt)
    (files.directory / name).write_bytes(data)
    assert files.record(name, prompt, tokens=3) == len(data)
    return name


def test_a_file_that_changed_after_its_save_is_not_intact(tmp_path: Path) -> None:
    files = SlotFiles(tmp_path, "m", "0" * 16)
    name = _saved(files, "<bos>hello", b"ggsq" + bytes(range(256)) * 64)
    [saved] = files.candidates()
    assert saved.file == name
    assert files.intact(saved)
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: a valid header, half the state
    assert not files.intact(saved)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert not files.intact(saved)
    path.unlink()
    assert not files.intact(saved)


def test_only_current_complete_sidecars_are_candidates(tmp_path: Path) -> None:
    files = SlotFiles(tmp_path, "m", "1" * 16)
    _saved(files, "kept", b"data")
    # A sidecar of the old format (no checksum): never trusted, removed with its data.
    old = files.name_for("old")
    (tmp_path / old).write_bytes(b"x")
    (tmp_path / old).with_suffix(".json").write_text(json.dumps({"prompt": "old", "bytes": 1}))
    # A save cut short: data without a sidecar is not a candidate.
    (tmp_path / files.name_for("partial")).write_bytes(b"half")
    # The same model with another key (its file or options changed): stale, removed.
    other = SlotFiles(tmp_path, "m", "2" * 16)
    stale = _saved(other, "stale", b"data")
    assert [c.prompt for c in files.candidates()] == ["kept"]
    assert not (tmp_path / old).exists()
    assert not (tmp_path / stale).exists()


def test_the_cache_key_follows_the_llama_server_binary(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"v1")
    first = cache_key(model, ctx=1024, kv_type="f16", args=(), binary=binary)
    assert first == cache_key(model, ctx=1024, kv_type="f16", args=(), binary=binary)
    binary.write_bytes(b"version 2")  # a rebuilt llama-server may write another format
    assert cache_key(model, ctx=1024, kv_type="f16", args=(), binary=binary) != first
    assert cache_key(model, ctx=2048, kv_type="f16", args=(), binary=binary) != first
