"""End to end: a client that leaves stops its generation on the runner — streamed or not, on
Ollama's API and OpenAI's — as the real llama-server itself reports it.

A long generation (temperature 0, thousands of tokens) is asked for over a raw socket, which is
closed once the runner's ``/slots`` shows tokens being decoded: a client that disconnects, or
times out, exactly then. The runner's own slot then says whether it stopped mid-generation
(still had tokens to go: neither its end-of-text nor the limit stopped it), and a small request
after it is served on the one slot the model has. Nothing here asserts a duration: how fast
this happens is measured by ``benchmarks/bench_cancel.py``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_server_fixtures import Server, require_llama_server, runner_pids, start_server
from residency.embedded import default_model_path
from serve_process import wait_until

require_llama_server()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = "gemma"
LONG = 3000
PROMPT = "Count from 1 to 10000, one number per line."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cancel")
    # One slot: a generation left running would hold up every request after it.
    config = f"""
runner = "auto"
kv_persist = false
[[models]]
name = "{MODEL}"
path = "{default_model_path()}"
parallel = 1
ctx = 4096
"""
    yield from start_server(tmp, config)


def runner_url(server: Server) -> str:
    """The model's llama-server (loaded first if need be), by the port on its command line."""
    r = httpx.post(server.url + "/api/generate", json={"model": MODEL}, timeout=180)
    assert r.status_code == 200, r.text
    [pid] = runner_pids(server.proc.pid)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return f"http://127.0.0.1:{int(argv[argv.index(b'--port') + 1])}"


def slot(runner: str) -> dict[str, Any]:
    (only,) = httpx.get(runner + "/slots", timeout=10).json()
    data: dict[str, Any] = only
    return data


def decoded(s: dict[str, Any]) -> int:
    return int(s.get("next_token", [{}])[0].get("n_decoded", 0))


def long_request(path: str, *, stream: bool) -> dict[str, Any]:
    if path.startswith("/api/"):
        options = {"num_predict": LONG, "temperature": 0}
        body: dict[str, Any] = {"model": MODEL, "stream": stream, "options": options}
    else:
        body = {"model": MODEL, "stream": stream, "max_tokens": LONG, "temperature": 0}
    if path.endswith(("chat", "chat/completions")):
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return body


def send(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """The request, written on a raw socket the test closes when it chooses."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize(
    ("path", "stream"),
    [
        ("/api/chat", True),
        ("/api/generate", False),
        ("/v1/chat/completions", True),
        ("/v1/chat/completions", False),
        ("/v1/completions", False),
    ],
)
def test_a_client_that_leaves_stops_its_generation(server: Server, path: str, stream: bool) -> None:
    runner = runner_url(server)
    before = slot(runner).get("id_task")
    sock = send(server.url, path, long_request(path, stream=stream))
    try:
        # The runner took the request and is generating (a few tokens decoded).
        wait_until(
            lambda: (
                (s := slot(runner))["is_processing"]
                and s.get("id_task") != before
                and decoded(s) >= 5
            ),
            120,
            "the runner to start generating",
        )
        task = slot(runner)["id_task"]
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the answer had begun
    finally:
        sock.close()  # the client disconnects (or its timeout fires) mid-generation

    wait_until(lambda: not slot(runner)["is_processing"], 120, "the runner's slot to go idle")
    s = slot(runner)
    assert s["id_task"] == task  # nothing else ran on the slot meanwhile
    # Stopped from outside, mid-generation: its end-of-text, a stop word, the limit or the
    # context would each have ended it with no next token to come (llama-server resets the
    # counts of a released slot, so this flag is what tells the two apart).
    assert s["next_token"][0]["has_next_token"] is True, s
    assert all(m["refcount"] == 0 for m in server.ps()["models"])

    # The next request gets the one slot and is served in full.
    small = {"model": MODEL, "prompt": "Say hi.", "stream": False}
    small["options"] = {"num_predict": 4, "temperature": 0}
    r = httpx.post(server.url + "/api/generate", json=small, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["done"] is True
    assert 1 <= answer["eval_count"] <= 4
    after = slot(runner)
    assert after["id_task"] != task
    assert not after["is_processing"]
    assert after["next_token"][0]["has_next_token"] is False  # it ended by itself


def test_leaving_clients_are_counted_as_499(server: Server) -> None:
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    gone = [
        line
        for line in metrics.splitlines()
        if line.startswith("residency_http_requests_total") and 'status="499"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in gone) >= 5, gone
