"""End to end, as a person switching from Ollama meets residency: `residency serve` with no model
configured, pointed at an Ollama store laid out as `ollama pull` leaves it and at a Hugging Face
cache, with Ollama's variables; then Ollama's CLI verbs against it — `run` through a terminal.

One server for the module (tests run in file order); the real runner and the real Gemma 3 270M.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from estimate_models import write_llama
from model_stores import write_hf_repo, write_ollama_model
from residency.runners import free_port
from scheduler_helpers import require_llama_cpp
from serve_process import wait_until, wait_until_serving

require_llama_cpp()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MODEL = "gemma3:270m"
TINY = "hf.co/test-org/tiny-GGUF:Q8_0"
NUM_CTX = 1536  # the params layer's num_ctx
CONTEXT_LENGTH = 768  # OLLAMA_CONTEXT_LENGTH, for models that set none
PARAMS = {"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    store: Path
    gemma: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from residency.embedded import default_model_path

    tmp = tmp_path_factory.mktemp("migration")
    gemma = default_model_path()
    store = tmp / "ollama" / "models"
    write_ollama_model(
        store,
        MODEL,
        gemma,
        params={**PARAMS, "num_ctx": NUM_CTX},
        template="{{ .Prompt }}",
        system="You are a helpful assistant.",
        license="Gemma Terms of Use",
    )
    tiny = write_llama(tmp / "tiny-Q8_0.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1)
    write_hf_repo(tmp / "hf" / "hub", "test-org/tiny-GGUF", {"tiny-Q8_0.gguf": tiny})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "RESIDENCY_"))}
    if os.environ.get("RESIDENCY_CACHE_DIR"):
        env["RESIDENCY_CACHE_DIR"] = os.environ["RESIDENCY_CACHE_DIR"]
    env |= {
        "RESIDENCY_DISCOVER": "1",
        "RESIDENCY_DISCOVER_INTERVAL_S": "0.2",
        "OLLAMA_MODELS": str(store),
        "HF_HUB_CACHE": str(tmp / "hf" / "hub"),
        "OLLAMA_CONTEXT_LENGTH": str(CONTEXT_LENGTH),
        "OLLAMA_KV_CACHE_TYPE": "q8_0",
        "OLLAMA_FLASH_ATTENTION": "1",
        "OLLAMA_HOST": f"127.0.0.1:{port}",
    }
    log_path = tmp / "server.log"
    with log_path.open("wb") as log:
        # No --config, no --port: everything comes from the store and Ollama's variables.
        proc = subprocess.Popen(
            [sys.executable, "-m", "residency", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path, store, gemma, env)
    wait_until_serving(proc, srv.url, srv.log, timeout_s=180)
    yield srv
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cli(server: Server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`residency ARGS` as a user's shell runs it (OLLAMA_HOST says where the server is)."""
    return subprocess.run(
        [sys.executable, "-m", "residency", *args],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ps(server: Server) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
    return models


def test_the_store_is_served_with_ollamas_names(server: Server) -> None:
    def tags_now() -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = httpx.get(server.url + "/api/tags", timeout=10).json()[
            "models"
        ]
        return models

    # Digests (the files' SHA-256) are hashed in the background after start-up.
    wait_until(lambda: all(m["digest"] for m in tags_now()), 60, "the models' digests")
    tags = tags_now()
    assert sorted(m["name"] for m in tags) == [MODEL, TINY]
    listed = cli(server, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    gemma = next(line for line in lines if line.startswith(MODEL + " "))
    assert re.search(r"\b\d+ MB\b", gemma)  # 253 MB, as Ollama prints sizes
    as_json = json.loads(cli(server, "list", "--json").stdout)
    assert as_json == {"models": tags}


def test_generate_uses_the_params_layers_context(server: Server) -> None:
    r = httpx.post(
        server.url + "/api/generate",
        json={"model": MODEL, "prompt": "Say hi.", "stream": False, "options": {"num_predict": 8}},
        timeout=180,
    )
    assert r.status_code == 200, r.text
    assert r.json()["response"]
    (row,) = _ps(server)
    assert row["name"] == MODEL
    assert row["context_length"] == NUM_CTX


def test_ps_prints_ollamas_columns_plus_device_warm_and_state(server: Server) -> None:
    out = cli(server, "ps")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == [
        "NAME",
        "ID",
        "SIZE",
        "PROCESSOR",
        "CONTEXT",
        "UNTIL",
        "DEVICE",
        "WARM",
        "STATE",
    ]
    assert row.startswith(MODEL)
    assert "100% CPU" in row  # no GPU here: the host device
    assert f" {NUM_CTX} " in row
    assert re.search(r"\d+ minutes from now|About a minute from now|seconds from now", row)
    # DEVICE, WARM (its file's bytes in host RAM: the runner just read it), STATE
    assert re.search(r" host +[\d.]+ [KMG]?B +ready$", row), row
    (as_json,) = json.loads(cli(server, "ps", "--json").stdout)["models"]
    assert as_json["name"] == MODEL


def test_ollamas_variables_reach_the_runner(server: Server) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": MODEL}, timeout=180)
    assert r.status_code == 200, r.text
    store = str(server.store).encode()
    runners = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(store) for a in argv):  # its --model is the store's blob
            runners.append(argv)
    (argv,) = runners
    text = " ".join(a.decode() for a in argv)
    # OLLAMA_KV_CACHE_TYPE=q8_0 and OLLAMA_FLASH_ATTENTION=1, in either runner's spelling.
    assert re.search(r"--cache-type-k q8_0|--type_k 8\b", text), text
    assert re.search(r"--flash-attn on|--flash_attn true", text), text


def test_show(server: Server) -> None:
    out = cli(server, "show", MODEL)
    assert out.returncode == 0, out.stderr
    assert re.search(r"architecture\s+gemma3", out.stdout)
    assert re.search(r"quantization\s+Q4_K_M", out.stdout)
    data = json.loads(cli(server, "show", MODEL, "--json").stdout)
    assert data["details"]["family"] == "gemma3"
    missing = cli(server, "show", "nope:1b")
    assert missing.returncode == 1
    assert "nope:1b" in missing.stderr
    assert "not found" in missing.stderr


def test_stop_unloads(server: Server) -> None:
    out = cli(server, "stop", MODEL)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not _ps(server), 30, "the model to unload")
    table, *below = cli(server, "ps").stdout.split("\n\n")
    assert table.splitlines()[1:] == []  # nothing loaded
    # What stays: its file, warm in host RAM (the host tier keeps it), listed below the table.
    (warm,) = below
    assert warm.startswith("Warm in host RAM, not loaded")
    assert [line.split()[0] for line in warm.splitlines()[2:]] == [MODEL]


def test_a_model_without_num_ctx_gets_ollama_context_length(server: Server) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": TINY}, timeout=180)
    assert r.status_code == 200, r.text
    (row,) = _ps(server)
    assert row["context_length"] == CONTEXT_LENGTH  # min(768, its trained 8192)
    assert cli(server, "stop", TINY).returncode == 0
    wait_until(lambda: not _ps(server), 30, "the tiny model to unload")


def test_pulled_and_removed_models_are_noticed_without_a_restart(server: Server) -> None:
    manifest = write_ollama_model(server.store, "someone/copy:v1", server.gemma)

    def names() -> list[str]:
        return [m["name"] for m in httpx.get(server.url + "/api/tags", timeout=10).json()["models"]]

    wait_until(lambda: "someone/copy:v1" in names(), 10, "the pulled model to appear")
    manifest.unlink()
    wait_until(lambda: "someone/copy:v1" not in names(), 10, "the removed model to go")


def test_run_one_prompt(server: Server) -> None:
    out = cli(server, "run", MODEL, "Reply", "with", "one", "word.", "--parameter", "num_predict=8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    piped = subprocess.run(
        [sys.executable, "-m", "residency", "run", MODEL, "--json", "--parameter=num_predict=8"],
        input="Reply with one word.",
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    answer = json.loads(piped.stdout)
    assert answer["done"] is True
    assert answer["eval_count"] <= 8


class Terminal:
    """A process on a pseudo-terminal that is its controlling terminal (so ^C is SIGINT)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        take_tty = "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        take_tty += "os.execvp(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", take_tty, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} on the terminal; it shows:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process exited
                    raise AssertionError(f"exited before {pattern!r}:\n{self.seen}") from None
        return self.seen

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


def test_run_interactively_through_a_terminal(server: Server) -> None:
    assert cli(server, "stop", MODEL).returncode == 0  # so `run` shows its loading line
    wait_until(lambda: not _ps(server), 30, "the model to unload")
    term = Terminal([sys.executable, "-m", "residency", "run", MODEL], server.env)
    try:
        term.expect(r"loading gemma3:270m")
        term.expect(r">>> ")
        term.send("/set parameter num_predict 12\n")
        term.expect(r"Set parameter 'num_predict' to '12'")
        term.send("Reply with one short word.\n")
        term.expect(r"one short word\.[\s\S]*\S[\s\S]*>>> ", timeout=120)  # answer, new prompt
        # A long answer (4,000 tokens: a minute or more here), cancelled after it started.
        term.send("/set parameter num_predict 4000\n")
        term.expect(r"to '4000'")
        mark = len(term.seen)
        term.send("Write a very long story about the sea, in many chapters.\n")
        wait_until(lambda: any(m["refcount"] for m in _ps(server)), 60, "the generation")
        term.send("\x03")  # Ctrl-C: cancels the answer, not the chat
        term.expect(r">>> $", timeout=30)
        assert "Traceback" not in term.seen[mark:]
        wait_until(lambda: not any(m["refcount"] for m in _ps(server)), 10, "the cancel")
        term.send("/set parameter num_predict 4\n")
        term.send("Say hi.\n")  # the chat goes on after a cancel
        term.expect(r"Say hi\.[\s\S]*\S[\s\S]*>>> $", timeout=60)
        term.send("/bye\n")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()


def test_pull_and_rm_say_models_are_managed_on_disk(server: Server) -> None:
    for verb in ("pull", "rm"):
        out = cli(server, verb, MODEL)
        assert out.returncode == 1
        assert "on disk" in out.stderr
        assert f"ollama {verb}" in out.stderr
    assert [m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]] == [
        MODEL,
        TINY,
    ]


def test_no_server_is_a_clear_error(server: Server) -> None:
    out = cli(server, "ps", "--host", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "could not connect to residency" in out.stderr
