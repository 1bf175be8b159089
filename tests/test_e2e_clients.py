"""End to end: `residency serve` as a real process, the real llama-cpp-python runner, the real
Gemma 3 270M, driven by the official `ollama` and `openai` clients and by raw HTTP.

One server for the whole module (starting it reads the model's header and imports llama.cpp's
server, which is slow on a busy machine); tests run in file order and the last one stops it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.runners import free_port
from scheduler_helpers import require_llama_cpp
from serve_process import runner_pids, wait_until, wait_until_serving

require_llama_cpp()
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MODEL = "gemma3:270m"
FAST = {"num_predict": 8, "temperature": 0, "seed": 1}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    runner_pids: set[int] = field(default_factory=set)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def note_runners(self) -> set[int]:
        """Remembers every runner process this server started (for the shutdown test)."""
        pids = runner_pids(self.proc.pid, b"llama_cpp.server")
        self.runner_pids |= pids
        return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("e2e")
    config = tmp / "residency.toml"
    # max_queue 1: a second request while the first one loads the model is refused (503).
    config.write_text(
        'runner = "llama-cpp-python"\nkeep_alive = "5m"\ndefault_ctx = 1024\nmax_queue = 1\n'
    )
    port = free_port()
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "RESIDENCY_"))}
    env["RESIDENCY_DISCOVER"] = "0"  # the embedded Gemma, whatever models this machine holds
    env["RESIDENCY_CACHE_DIR"] = os.environ.get("RESIDENCY_CACHE_DIR", "")
    if not env["RESIDENCY_CACHE_DIR"]:
        del env["RESIDENCY_CACHE_DIR"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "residency",
                "serve",
                "--port",
                str(port),
                "--config",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    wait_until_serving(proc, srv.url, srv.log, timeout_s=180)
    yield srv
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in srv.runner_pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def oc(server: Server) -> Iterator[Any]:
    client = ollama.Client(host=server.url, timeout=120)
    yield client
    client._client.close()


@pytest.fixture
def ai(server: Server) -> Iterator[Any]:
    # No retries: a retried 503 or 502 would hide the status under test.
    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    yield client
    client.close()


def _ps(server: Server) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
    return models


def _unload(server: Server) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=60)
    assert r.json()["done_reason"] == "unload"
    wait_until(lambda: not _ps(server), 30, "the model to unload")


# ---- the ollama client ------------------------------------------------------------------------


def test_ollama_generate_cold_then_warm(server: Server, oc: Any) -> None:
    cold = oc.generate(model=MODEL, prompt="The capital of France is", options=FAST)
    server.note_runners()
    assert cold.done is True
    assert cold.model == MODEL
    assert cold.response.strip()
    assert cold.done_reason in ("stop", "length")
    assert cold.load_duration > 100_000_000  # a real process start and model load
    assert 0 < cold.eval_count <= 8
    assert cold.eval_duration > 0
    assert cold.prompt_eval_duration > 0
    assert cold.total_duration >= cold.load_duration + cold.eval_duration

    warm = oc.generate(model=MODEL, prompt="The capital of Spain is", options=FAST)
    assert warm.load_duration < 50_000_000  # near zero: the model was resident
    assert warm.load_duration < cold.load_duration  # the load is what a warm request skips


def test_ollama_chat_and_streaming_chat(oc: Any) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    reply = oc.chat(model=MODEL, messages=messages, options=FAST)
    assert reply.message.role == "assistant"
    assert reply.message.content
    assert reply.done is True

    parts = list(oc.chat(model=MODEL, messages=messages, options=FAST, stream=True))
    assert len(parts) >= 2
    assert all(p.done is False for p in parts[:-1])
    final = parts[-1]
    assert final.done is True
    assert final.eval_count == len([p for p in parts[:-1] if p.message.content])
    assert "".join(p.message.content for p in parts[:-1]).strip()


def test_prompt_count_is_the_rendered_chats(server: Server, oc: Any) -> None:
    # llama-cpp-python streams no usage: residency counts the prompt, and must count what the
    # runner's chat template renders, not the messages' text.
    messages = [{"role": "user", "content": "Say hello."}]
    *_, final = oc.chat(model=MODEL, messages=messages, options=FAST, stream=True)
    [pid] = server.note_runners()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    runner = f"http://127.0.0.1:{int(argv[argv.index(b'--port') + 1])}"
    # The runner's own count, answering the same chat unstreamed.
    own = httpx.post(
        runner + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 1, "temperature": 0},
        timeout=60,
    ).json()["usage"]["prompt_tokens"]
    text_only = httpx.post(
        runner + "/extras/tokenize/count", json={"input": "Say hello."}, timeout=60
    ).json()["count"]
    assert final.prompt_eval_count == own > text_only


def test_ollama_embed(oc: Any) -> None:
    out = oc.embed(model=MODEL, input=["why is the sky blue?", "grass is green"])
    assert len(out.embeddings) == 2
    for vector in out.embeddings:
        assert len(vector) == 640  # Gemma 3 270M's embedding width
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    assert out.embeddings[0] != out.embeddings[1]
    legacy = oc.embeddings(model=MODEL, prompt="why is the sky blue?")
    assert len(legacy.embedding) == 640


def test_ollama_list_show_ps(server: Server, oc: Any) -> None:
    names = [m.model for m in oc.list().models]
    assert MODEL in names
    shown = oc.show(MODEL)
    assert shown.details.family == "gemma3"
    assert shown.details.quantization_level == "Q4_K_M"
    assert shown.modelinfo["gemma3.context_length"] == 32768
    running = oc.ps().models
    assert [m.model for m in running] == [MODEL]
    m = running[0]
    assert m.size > 0
    assert m.size_vram == 0  # no GPU here: the model lives in host memory
    assert m.context_length == 1024
    left = m.expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=4) < left <= timedelta(minutes=5)


def test_raw_ps_fields(server: Server) -> None:
    (m,) = _ps(server)
    assert m["size_vram"] == 0
    assert m["device"] == "host"
    assert m["state"] == "ready"
    assert m["refcount"] == 0
    assert m["measured_bytes"] is None or m["measured_bytes"] > 100_000_000
    # The runner read its GGUF (≈ 250 MB) through the page cache, and the scheduler keeps it warm.
    assert m["warm_bytes"] > 100_000_000
    expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=4) < expires - datetime.now(timezone.utc) <= timedelta(minutes=5)


def test_keep_alive_load_unload_and_forever(server: Server, oc: Any) -> None:
    unloaded = oc.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    wait_until(lambda: not _ps(server), 30, "the model to unload")

    # A short keep-alive lets the model go by itself...
    loaded = oc.generate(model=MODEL, prompt="", keep_alive="1s")
    assert loaded.done_reason == "load"
    server.note_runners()
    assert [m["name"] for m in _ps(server)] == [MODEL]
    wait_until(lambda: not _ps(server), 15, "the 1 s keep-alive to expire")

    # ...keep_alive -1 keeps it past the default (5m) and past that short one.
    forever = oc.chat(model=MODEL, messages=[], keep_alive=-1)
    assert forever.done_reason == "load"
    server.note_runners()
    time.sleep(2)
    (m,) = _ps(server)
    expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
    assert expires - datetime.now(timezone.utc) > timedelta(days=365)

    unload = oc.chat(model=MODEL, messages=[], keep_alive=0)
    assert unload.done_reason == "unload"
    wait_until(lambda: not _ps(server), 30, "the model to unload")


# ---- the openai client ------------------------------------------------------------------------


def test_openai_chat_completions_embeddings_models(server: Server, ai: Any) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    chat = ai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    server.note_runners()
    assert chat.model == MODEL
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0

    stream = ai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks
    assert all(c.model == MODEL for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()

    done = ai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert done.model == MODEL
    assert done.choices[0].text

    # The client asks for base64 by default; residency encodes it, the client decodes it.
    emb = ai.embeddings.create(model=MODEL, input=["hello", "world"])
    assert len(emb.data) == 2
    assert len(emb.data[0].embedding) == 640
    # Same text alone, as floats: equal up to llama.cpp's batch-dependent rounding.
    floats = ai.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(emb.data[0].embedding, abs=1e-4)

    assert MODEL in [m.id for m in ai.models.list().data]


def test_openai_extensions_keep_alive(server: Server, ai: Any) -> None:
    ai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"keep_alive": "1s"},
    )
    wait_until(lambda: not _ps(server), 15, "the 1 s keep-alive to expire")


# ---- errors over real HTTP --------------------------------------------------------------------


def test_errors_unknown_model(oc: Any, ai: Any) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        oc.chat(model="llama9:70b", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert "llama9:70b" in info.value.error
    with pytest.raises(openai.NotFoundError) as err:
        ai.chat.completions.create(model="llama9:70b", messages=[{"role": "user", "content": "x"}])
    assert "llama9:70b" in err.value.message


def test_errors_malformed(server: Server, ai: Any) -> None:
    r = httpx.post(server.url + "/api/chat", content=b'{"model": ', timeout=10)
    assert r.status_code == 400
    assert "invalid JSON" in r.json()["error"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL}, timeout=10)
    assert r.status_code == 400
    assert "messages" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        ai.chat.completions.create(model=MODEL, messages=[])


def test_errors_context_exceeded_is_the_runners_400(server: Server) -> None:
    long_prompt = "hello " * 3000  # more tokens than the 1024 context
    r = httpx.post(
        server.url + "/api/generate",
        json={"model": MODEL, "prompt": long_prompt, "stream": False},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    assert "context" in r.json()["error"]
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": long_prompt, "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    assert "context" in r.json()["error"]["message"]


def test_errors_queue_full_is_503_with_retry_after(server: Server) -> None:
    _unload(server)
    first: dict[str, Any] = {}

    def load() -> None:
        first["r"] = httpx.post(server.url + "/api/generate", json={"model": MODEL}, timeout=120)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: bool(_ps(server)), 30, "the load to start")
        r = httpx.post(server.url + "/api/generate", json={"model": MODEL}, timeout=30)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["error"]
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            timeout=30,
        )
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
    finally:
        loader.join(120)
    assert first["r"].json()["done_reason"] == "load"
    server.note_runners()


def test_runner_killed_mid_stream_ends_with_an_error_line(server: Server) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to one hundred."}],
        "options": {"num_predict": 400, "temperature": 0},
    }
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = json.loads(next(lines))
        assert first["done"] is False
        for pid in server.note_runners():
            os.kill(pid, signal.SIGKILL)
        rest = [json.loads(line) for line in lines if line.strip()]
    assert "error" in rest[-1], rest[-1]
    assert MODEL in rest[-1]["error"]
    # The scheduler noticed; the next request gets a fresh runner.
    again = httpx.post(
        server.url + "/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": FAST},
        timeout=120,
    ).json()
    assert again["done"] is True
    assert again["load_duration"] > 100_000_000
    server.note_runners()


def test_client_disconnect_releases_the_model(server: Server) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "options": {"num_predict": 300},
    }
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(lines)
        (m,) = _ps(server)
        assert m["refcount"] == 1
    # Closing the connection cancelled the request and released its reference.
    wait_until(lambda: _ps(server)[0]["refcount"] == 0, 10, "the reference to be released")
    warm = httpx.post(
        server.url + "/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": FAST},
        timeout=120,
    ).json()
    assert warm["load_duration"] < 50_000_000  # same runner, still resident and free


def test_openapi_schema_is_served(server: Server) -> None:
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for path in ("/api/chat", "/api/generate", "/api/ps", "/v1/chat/completions", "/v1/models"):
        assert path in schema["paths"]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'residency_cold_requests_total{model="gemma3:270m"}' in metrics


def test_an_idle_connection_is_kept_past_uvicorns_default(server: Server) -> None:
    """Idle client connections stay open for a minute (uvicorn's default is 5 s): a client that
    reuses one just as the server closes it gets a reset instead of an answer."""
    request = b"GET /api/version HTTP/1.1\r\nhost: localhost\r\n\r\n"
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        answers = []
        for pause in (0, 6):
            time.sleep(pause)
            sock.sendall(request)
            answer = sock.recv(65536)
            while b"\r\n\r\n" not in answer:  # the head and body come in one write
                more = sock.recv(65536)
                assert more, "the server closed the idle connection"
                answer += more
            answers.append(answer)
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        assert b'"version"' in answer


def test_zz_graceful_shutdown_leaves_no_runner(server: Server) -> None:
    pids = server.note_runners()
    assert pids, "a runner should be resident before shutdown"
    server.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once it has shut down cleanly, so the parent sees SIGTERM.
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    for pid in server.runner_pids:
        assert not _alive(pid), f"runner {pid} outlived the server"
    assert "Application shutdown complete" in server.log()
