"""End to end: `residency serve` over the real llama-server (runner "auto": the one on PATH or
residency's own build), the real Gemma 3 270M and a generated tiny model: load, swap, unload,
streaming, embeddings, the measured-bytes report, errors, 8 concurrent requests to one model.

One server for the module; tests run in file order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from estimate_models import write_llama
from llama_server_fixtures import Server, require_llama_server, runner_pids, start_server
from residency.embedded import default_model_path

BINARY = require_llama_server()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("llama-server")
    tiny = write_llama(tmp / "tiny.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    gemma = default_model_path()
    # One model at a time on the host: every request for the other one is a swap.
    config = f"""
runner = "auto"
keep_alive = "5m"
max_loaded_models = 1
default_ctx = 1024
[[models]]
name = "gemma"
path = "{gemma}"
parallel = 8
[[models]]
name = "tiny"
path = "{tiny}"
[[models]]
name = "gemma-embed"
path = "{gemma}"
embedding = true
"""
    yield from start_server(tmp, config)


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=180)


def _resident(server: Server) -> dict[str, dict[str, Any]]:
    """/api/ps by configured name (it lists them as Ollama does, with their `:latest` tag)."""
    return {m["name"].removesuffix(":latest"): m for m in server.ps()["models"]}


def test_load_runs_llama_server_and_reports_measured_bytes(server: Server) -> None:
    r = _post(server, "/api/generate", {"model": "gemma"})  # no prompt: load only
    assert r.status_code == 200, r.text
    assert r.json()["done_reason"] == "load"
    [pid] = runner_pids(server.proc.pid)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0] == str(BINARY).encode()
    assert argv[argv.index(b"--parallel") + 1] == b"8"
    assert argv[argv.index(b"--ctx-size") + 1] == b"8192"  # 8 slots of 1024
    gemma = _resident(server)["gemma"]
    # The runner's own report (its buffer lines) replaced the estimate; they agree within 25 %.
    measured = gemma["measured_bytes"]
    assert measured is not None
    assert measured > 100 << 20
    assert abs(measured - gemma["estimated_bytes"]) < 0.25 * measured
    assert gemma["reserved_bytes"] == measured


def test_chat_and_streaming_with_usage(server: Server) -> None:
    answer = server.chat("gemma", [{"role": "user", "content": "Name a colour."}])
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["completion_tokens"] > 0
    body = {
        "model": "gemma",
        "messages": [{"role": "user", "content": "Name a fruit."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage = "", None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or ():
                text += choice.get("delta", {}).get("content") or ""
            usage = event.get("usage") or usage
    assert text.strip()
    assert usage is not None
    assert usage["completion_tokens"] > 0


def test_eight_concurrent_requests_all_complete_distinctly(server: Server) -> None:
    topics = ["cats", "rivers", "trains", "winter", "music", "bread", "stars", "forests"]

    def ask(topic: str) -> str:
        answer = server.chat(
            "gemma", [{"role": "user", "content": f"Write one sentence about {topic}."}]
        )
        content: str = answer["choices"][0]["message"]["content"]
        return content

    with ThreadPoolExecutor(len(topics)) as pool:
        texts = list(pool.map(ask, topics))
    assert all(t.strip() for t in texts), texts
    assert len(set(texts)) == len(texts), texts  # each slot answered its own prompt


def test_errors_are_precise(server: Server) -> None:
    hi = [{"role": "user", "content": "hi"}]
    r = _post(server, "/v1/chat/completions", {"model": "nope", "messages": hi})
    assert r.status_code == 404
    # A prompt beyond the slot's 1024 tokens: the runner refuses it, residency says 400.
    long = "word " * 3000
    r = _post(
        server,
        "/v1/chat/completions",
        {"model": "gemma", "messages": [{"role": "user", "content": long}], "max_tokens": 4},
    )
    assert r.status_code == 400, r.text
    assert server.chat("gemma", [{"role": "user", "content": "Still there?"}])["choices"]


def test_swap_to_the_other_model_and_back(server: Server) -> None:
    before = runner_pids(server.proc.pid)
    answer = server.chat("tiny", [{"role": "user", "content": "hello"}])
    assert answer["usage"]["completion_tokens"] > 0
    assert set(_resident(server)) == {"tiny"}  # gemma was evicted for it
    assert not (before & runner_pids(server.proc.pid)), "gemma's runner must be gone"
    assert server.chat("gemma", [{"role": "user", "content": "hi"}])["choices"]
    assert set(_resident(server)) == {"gemma"}


def test_embeddings(server: Server) -> None:
    r = _post(server, "/api/embed", {"model": "gemma-embed", "input": ["a cat", "a dog"]})
    assert r.status_code == 200, r.text
    vectors = r.json()["embeddings"]
    assert len(vectors) == 2
    assert len(vectors[0]) == 640
    assert vectors[0] != vectors[1]


def test_unload_stops_the_runner(server: Server) -> None:
    server.chat("gemma", [{"role": "user", "content": "hi"}])
    pids = runner_pids(server.proc.pid)
    assert pids
    server.unload("gemma")
    assert not _resident(server)
    assert not runner_pids(server.proc.pid)


def test_an_unloaded_models_warm_file_shows_in_ps_and_the_cli(server: Server) -> None:
    """After its runner exits, the model's file stays warm in host RAM (the host tier keeps it):
    /api/ps's host_tier lists it though `models` does not, and so does `residency ps`."""
    server.chat("gemma", [{"role": "user", "content": "hi"}])
    server.unload("gemma")
    ps = server.ps()
    assert "gemma:latest" not in {m["name"] for m in ps["models"]}
    tier = ps["host_tier"]
    assert tier["budget_bytes"] > 0
    files = {f["name"]: f for f in tier["files"]}
    size = default_model_path().stat().st_size
    assert files["gemma:latest"]["warm_bytes"] > size // 2  # mincore: the runner read it all
    assert files["gemma:latest"]["kept"]
    assert tier["kept_bytes"] >= size
    shown = subprocess.run(
        [sys.executable, "-m", "residency", "ps", "--host", server.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    head, below = shown.split("\n\n", 1)
    assert "gemma" not in head  # the table: nothing loaded
    assert below.startswith("Warm in host RAM, not loaded")
    assert any(line.split()[0] == "gemma:latest" for line in below.splitlines()[2:])
