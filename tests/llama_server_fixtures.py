"""`residency serve` as a real process over the real llama-server (the one "auto" finds: PATH or
residency's own build, scripts/build-llama-server.sh) and real GGUFs, for the e2e tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.runners import free_port
from residency.runners.build import find_llama_server
from serve_process import runner_pids as _runner_pids_of
from serve_process import wait_until, wait_until_serving


def require_llama_server() -> Path:
    """The llama-server binary, or a skip saying how to build it (a failure in CI, which builds it:
    the default runner's tests must never be skipped there unnoticed)."""
    found = find_llama_server(os.environ.get("RESIDENCY_LLAMA_SERVER"))
    if found is None:
        why = "no llama-server (build it: residency build-runner)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    kv_dir: Path

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def ps(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/api/ps", timeout=10).json()
        return data

    def chat(self, model: str, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
        body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}
        r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=180)
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        return answer

    def unload(self, model: str) -> None:
        r = httpx.post(
            self.url + "/api/generate", json={"model": model, "keep_alive": 0}, timeout=60
        )
        assert r.status_code == 200, r.text
        wait_until(lambda: model not in {m["name"] for m in self.ps()["models"]}, 60, "unload")


def start_server(tmp: Path, config_text: str) -> Iterator[Server]:
    """Starts `residency serve` with `config_text` (plus a kv_dir in `tmp`); stops it after."""
    kv_dir = tmp / "kv"
    config = tmp / "residency.toml"
    config.write_text(f'kv_dir = "{kv_dir}"\n' + config_text)
    port = free_port()
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "RESIDENCY_"))}
    for keep in ("RESIDENCY_CACHE_DIR", "RESIDENCY_LLAMA_SERVER"):
        if os.environ.get(keep):
            env[keep] = os.environ[keep]
    env["RESIDENCY_BUILD_RUNNER"] = "0"
    argv = [
        sys.executable,
        "-m",
        "residency",
        "serve",
        "--port",
        str(port),
        "--config",
        str(config),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path, kv_dir)
    wait_until_serving(proc, srv.url, srv.log, timeout_s=120)
    try:
        yield srv
    finally:
        runners = runner_pids(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in runners:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def runner_pids(parent: int) -> set[int]:
    """The llama-server processes `parent` started."""
    return _runner_pids_of(parent, b"llama-server")
