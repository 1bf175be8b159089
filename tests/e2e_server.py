"""`residency serve` as a real process for end-to-end tests: started on a free port with a
config of the test's choosing, waited for, and stopped (with every runner it started)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass
class ServeProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(tmp: Path, config: str, *, start_timeout_s: float = 180) -> Iterator[ServeProcess]:
    """`residency serve` with `config` (TOML text) and the embedded Gemma, until the block ends."""
    (tmp / "residency.toml").write_text(config)
    port = _free_port()
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "RESIDENCY_"))}
    env["RESIDENCY_DISCOVER"] = "0"  # the embedded Gemma, whatever models this machine holds
    if os.environ.get("RESIDENCY_CACHE_DIR"):
        env["RESIDENCY_CACHE_DIR"] = os.environ["RESIDENCY_CACHE_DIR"]
    argv = [sys.executable, "-m", "residency", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*argv, "--config", str(tmp / "residency.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its runners die with its process group
        )
    srv = ServeProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"residency serve exited with {proc.returncode}:\n{srv.log()}")
            try:
                if httpx.get(srv.url + "/", timeout=1).text == "Ollama is running":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"residency serve did not come up:\n{srv.log()}")
            time.sleep(0.2)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
