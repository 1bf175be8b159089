"""Ollama's metadata as Ollama gives it (fakes): name:tag, the file's SHA-256 as digest (hashed
in the background), /api/show's license/system/parameters, the version, the store's defaults."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from api_fakes import FakeEntry, serving
from residency.api.digests import DIGESTS, BlobDigests

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3:270m"


@dataclass
class StoreConfig:
    parameters: dict[str, Any] = field(
        default_factory=lambda: {"temperature": 0.3, "stop": ["<end>", "<x>"], "top_k": 9}
    )
    system: str | None = "You are terse."
    template: str | None = "{{ .Prompt }}"
    license: str | None = "Gemma Terms of Use"


@dataclass
class StoreEntry(FakeEntry):
    config: StoreConfig = field(default_factory=StoreConfig)


async def test_digest_is_the_files_sha256_hashed_off_the_request_path(tmp_path: Path) -> None:
    blob = tmp_path / "model.gguf"
    blob.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    async with serving() as s:
        s.sched.entries[MODEL] = FakeEntry(MODEL, path=blob)
        first = (await s.client.get("/api/tags")).json()["models"][0]["digest"]
        assert first in ("", hashlib.sha256(blob.read_bytes()).hexdigest())
        assert DIGESTS.wait_idle(10)
        ready = (await s.client.get("/api/tags")).json()["models"][0]["digest"]
        assert ready == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_digests_are_cached_by_file_version(tmp_path: Path) -> None:
    digests = BlobDigests()
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    assert digests.digest(f) == ""
    assert digests.wait_idle(10)
    assert digests.digest(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two!")  # another size (and mtime): another version, hashed again
    assert digests.digest(f) == ""
    assert digests.wait_idle(10)
    assert digests.digest(f) == hashlib.sha256(b"two!").hexdigest()
    # Ollama's blobs are named by their hash: read from the name, never hashed.
    named = tmp_path / ("sha256-" + "c" * 64)
    named.write_bytes(b"x")
    assert digests.digest(named) == "c" * 64


async def test_show_carries_the_stores_metadata_and_requests_get_its_defaults() -> None:
    async with serving(names=("tiny",)) as s:
        s.sched.entries["tiny"] = StoreEntry("tiny")
        show = (await s.client.post("/api/show", json={"model": "tiny"})).json()
        assert show["license"] == "Gemma Terms of Use"
        assert show["system"] == "You are terse."
        assert show["template"] == "{{ .Prompt }}"
        assert 'stop                           "<end>"' in show["parameters"]
        assert 'PARAMETER stop "<x>"' in show["modelfile"]
        assert "temperature                    0.3" in show["parameters"]
        tags = (await s.client.get("/api/tags")).json()["models"]
        assert [m["name"] for m in tags] == ["tiny:latest"]

        await s.client.post(
            "/api/chat",
            json={
                "model": "tiny:latest",
                "stream": False,
                "messages": [{"role": "user", "content": "hi"}],
                "options": {"temperature": 0.9},
            },
        )
        sent = s.runner.requests[-1][1]
        assert sent["temperature"] == 0.9  # the request's own option wins
        assert sent["top_k"] == 9
        assert sent["stop"] == ["<end>", "<x>"]
        assert sent["messages"][0] == {"role": "system", "content": "You are terse."}

        await s.client.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [
                    {"role": "system", "content": "Mine."},
                    {"role": "user", "content": "x"},
                ],
            },
        )
        sent = s.runner.requests[-1][1]
        assert [m["content"] for m in sent["messages"]] == ["Mine.", "x"]
        assert sent["temperature"] == 0.3


async def test_version_says_residency() -> None:
    from residency import __version__

    async with serving() as s:
        body = (await s.client.get("/api/version")).json()
        assert body == {"version": f"{__version__}+residency", "residency": __version__}
