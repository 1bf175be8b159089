"""Waiting for a `residency serve` process started by an end-to-end test to answer."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

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
