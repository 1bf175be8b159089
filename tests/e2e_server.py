"""`residency serve` as a real process for end-to-end tests: started on a free port with a
config of the test's choosing, waited for, and stopped (with every runner it started)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from residency.runners import free_port
from serve_process import wait_until_serving


@dataclass
class ServeProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextmanager
def serving(tmp: Path, config: str, *, start_timeout_s: float = 180) -> Iterator[ServeProcess]:
    """`residency serve` with `config` (TOML text) and the embedded Gemma, until the block ends."""
    (tmp / "residency.toml").write_text(config)
    port = free_port()
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
        wait_until_serving(proc, srv.url, srv.log, timeout_s=start_timeout_s)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
