"""The fault suite against the real thing: `residency serve` over the real llama-server and the
real Gemma 3 270M, and GGUFs broken the ways files break (random bytes, cut in half).

One server for the module; tests run in file order, and the last one SIGKILLs it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_server_fixtures import Server, require_llama_server, runner_pids, start_server
from residency.embedded import default_model_path
from scheduler_helpers import alive
from serve_process import wait_until

BINARY = require_llama_server()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FAST = {"num_predict": 4, "temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("faults")
    gemma = default_model_path()
    corrupt = tmp / "corrupt.gguf"
    corrupt.write_bytes(os.urandom(1 << 16))
    truncated = tmp / "truncated.gguf"
    with gemma.open("rb") as f:
        truncated.write_bytes(f.read(gemma.stat().st_size // 2))
    config = f"""
runner = "llama-server"
default_ctx = 1024
upstream_stall_timeout_s = 2
failure_backoff_s = 0.2
circuit_failures = 3
circuit_cooldown_s = 60
[[models]]
name = "gemma"
path = "{gemma}"
[[models]]
name = "gemma-slow"
path = "{gemma}"
args = ["--threads", "1", "--threads-batch", "1"]
[[models]]
name = "corrupt"
path = "{corrupt}"
[[models]]
name = "truncated"
path = "{truncated}"
[[models]]
name = "truncated-sized"
path = "{truncated}"
memory = {300 << 20}
"""
    yield from start_server(tmp, config)


def generate(server: Server, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Say hi.", "stream": False, "options": FAST}
    return httpx.post(server.url + "/api/generate", json=body, timeout=180)


def the_runner(server: Server, model: str = "gemma") -> int:
    """The live llama-server serving `model`."""
    alias = f"--alias\0{model}\0".encode()
    [pid] = [
        p
        for p in runner_pids(server.proc.pid)
        if alive(p) and alias in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    return pid


def figure(what: str, seconds: float) -> None:
    print(f"\nFAULT FIGURE (llama-server) {what}: {seconds * 1000:.0f} ms")


def test_the_request_right_after_a_sigkill_is_served_by_a_fresh_runner(server: Server) -> None:
    assert generate(server, "gemma").status_code == 200
    pid = the_runner(server)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    r = generate(server, "gemma")  # at once: the exit may not even be reaped yet
    figure("SIGKILL idle -> next request served (reload included)", time.monotonic() - start)
    assert r.status_code == 200, r.text
    figure("  of which the reload (load_duration)", r.json()["load_duration"] / 1e9)
    assert r.json()["load_duration"] > 0  # loaded again for it
    assert the_runner(server) != pid


def test_a_runner_stopped_mid_stream_ends_it_with_a_stall_error_and_is_replaced(
    server: Server,
) -> None:
    body = {
        "model": "gemma",
        "messages": [{"role": "user", "content": "Count from one to one hundred."}],
        "options": {"num_predict": 400, "temperature": 0},
    }
    pid = the_runner(server)
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
        os.kill(pid, signal.SIGSTOP)  # hung: alive, silent, doing nothing
        stopped = time.monotonic()
        rest = [json.loads(line) for line in lines if line.strip()]
    figure("SIGSTOP mid-stream -> error line (stall timeout 2 s)", time.monotonic() - stopped)
    assert "stalled" in rest[-1].get("error", ""), rest[-1]
    wait_until(lambda: not alive(pid), 30, "the stopped runner killed")
    figure("SIGSTOP mid-stream -> runner gone", time.monotonic() - stopped)
    r = generate(server, "gemma")
    assert r.status_code == 200, r.text
    assert r.json()["load_duration"] > 0


def test_a_long_prefill_is_not_a_stall(server: Server) -> None:
    # One thread prefilling ~800 tokens sends nothing for longer than the 2 s stall timeout, but
    # its CPU is busy all along: it is served, never cut short.
    prompt = " ".join(["alpha"] * 800) + ". Say hi."
    body = {"model": "gemma-slow", "prompt": prompt, "stream": False, "options": FAST}
    r = httpx.post(server.url + "/api/generate", json=body, timeout=180)
    assert r.status_code == 200, r.text
    prefill_s = r.json()["prompt_eval_duration"] / 1e9
    figure("prefill served without a byte sent (stall timeout 2 s)", prefill_s)
    assert prefill_s > 2, "the prefill was too fast to show anything about the stall timeout"
    server.unload("gemma-slow")


def test_a_corrupt_gguf_fails_with_a_clear_message(server: Server) -> None:
    r = generate(server, "corrupt")
    assert r.status_code >= 500, r.text
    assert "corrupt.gguf" in r.json()["error"]
    assert not runner_pids(server.proc.pid) - {the_runner(server)}  # no runner was left behind
    assert generate(server, "gemma").status_code == 200


def test_a_truncated_gguf_fails_its_requests_and_then_opens_its_circuit(server: Server) -> None:
    r = generate(server, "truncated")  # the estimator sees the file end before its tensors
    assert r.status_code >= 500, r.text
    assert "truncated.gguf" in r.json()["error"]
    reasons = []
    for _ in range(3):  # given a size, the runner itself refuses it, three times in a row
        r = generate(server, "truncated-sized")
        assert r.status_code == 502, r.text
        reasons.append(r.json()["error"])
    assert all("while loading" in reason for reason in reasons), reasons
    start = time.monotonic()
    r = generate(server, "truncated-sized")
    figure("open circuit -> 503", time.monotonic() - start)
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 1
    assert "failed 3 times in a row" in r.json()["error"]
    ps: dict[str, Any] = server.ps()
    assert [m["name"] for m in ps["models"]] == ["gemma:latest"]  # nothing else reserved
    [failing] = ps["failing"]
    assert (failing["name"], failing["state"]) == ("truncated-sized:latest", "open")
    assert "while loading" in failing["last_error"]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'residency_model_circuit_opens_total{model="truncated-sized"} 1.0' in metrics
    assert generate(server, "gemma").status_code == 200


def test_zz_a_sigkilled_server_leaves_no_runner(server: Server) -> None:
    pid = the_runner(server)
    server.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    server.proc.wait(30)
    wait_until(lambda: not alive(pid), 10, "the runner to die with its server")
    figure("server SIGKILL -> runner gone", time.monotonic() - killed)
