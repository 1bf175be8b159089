"""Helpers for the scheduler tests: fake-runner model configs, a manual clock, process checks."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from residency.config import ModelConfig

FAKE_RUNNER = Path(__file__).with_name("fake_runner.py")
MIB = 1024 * 1024


def fake_model(
    name: str,
    tmp_path: Path,
    mem: int = 100 * MIB,
    *flags: str,
    sim: Path | None = None,
    ctx: int | None = 512,
    **config: object,
) -> ModelConfig:
    """A model served by tests/fake_runner.py through the `command` runner kind."""
    model_file = tmp_path / f"{name.replace(':', '_')}.bin"
    model_file.write_bytes(b"fake model")
    command = [
        sys.executable,
        str(FAKE_RUNNER),
        "--port",
        "{port}",
        "--name",
        "{name}",
        "--bytes",
        str(mem),
        "--ctx",
        "{ctx}",
        *flags,
    ]
    if sim is not None:
        command += ["--sim", str(sim)]
    config.setdefault("memory", mem)
    return ModelConfig(
        name=name,
        path=model_file,
        runner="command",
        command=command,
        ctx=ctx,
        **config,  # type: ignore[arg-type]
    )


class ManualClock:
    """A monotonic clock that moves only when the test says so; sleepers wake on advance()."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.t = start_ns
        self._changed = asyncio.Event()

    def now_ns(self) -> int:
        return self.t

    async def sleep_until(self, deadline_ns: int) -> None:
        while self.t < deadline_ns:
            await self._changed.wait()

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1e9)
        self._changed.set()
        self._changed = asyncio.Event()


def alive(pid: int) -> bool:
    """Whether `pid` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (scans /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0, what: str = "") -> float:
    """Waits until `check()` holds (tests only); returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or check}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def require_llama_cpp(what: str = "llama-cpp-python (extra 'llama')") -> None:
    """Skips the caller unless llama-cpp-python is installed, without importing it here: its
    import opens two /dev/null files it never closes, a ResourceWarning when pytest exits."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(f"needs {what}")
