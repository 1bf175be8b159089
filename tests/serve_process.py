"""A `residency serve` process started by an end-to-end test: waiting for it to answer, for a
condition, and finding the runners it started."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest


def wait_until_serving(
    proc: subprocess.Popen[bytes], url: str, log: Callable[[], str], timeout_s: float
) -> None:
    """Returns once ``GET /`` answers as Ollama does; fails the test with the server's log if the
    process exits or stays silent past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"residency serve exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(url + "/", timeout=1).text == "Ollama is running":
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"residency serve did not come up:\n{log()}")
        time.sleep(0.2)


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Polls `predicate` until it holds; fails the test naming `what` past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def runner_pids(parent: int, marker: bytes) -> set[int]:
    """The processes `parent` started whose command line names `marker` (its runners)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and marker in cmdline:
            pids.add(int(entry.name))
    return pids
