"""What a runner's OS process needs below the Runner class: its output pipe, read in batches,
dying with its parent, and whether any of its process group is still alive."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CAN_DIE_WITH_PARENT",
    "LOOPBACK",
    "ExitWatch",
    "OutputPipe",
    "die_with_parent",
    "exit_text",
    "free_port",
    "group_has_live_members",
    "spawn_with_parent_death",
]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel considers free now (the runner binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class OutputPipe:
    """The runner's stdout and stderr (one pipe), read in batches off the event loop's hot path.

    llama.cpp-based runners print a few lines around every request. Waking a reader task per
    line cost 0.7 ms of CPU per request; instead the first byte of a burst schedules one read of
    everything pending a moment later (:data:`BATCH_DELAY_S`). Lines feed the ring buffer and the
    buffer report as before; the pipe is enlarged so a chatty load never waits for that read.
    """

    BATCH_DELAY_S = 0.02

    def __init__(self, fd: int, on_lines: Callable[[list[str]], None]) -> None:
        self._fd = fd
        self._on_lines = on_lines
        self._pending = b""
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: Read each burst at once, not a moment later: while a load waits for the line that
        #: says the runner is ready (Runner.ready_marker), no request is being served.
        self.eager = False
        os.set_blocking(fd, False)
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # Linux; capped by pipe-max-size
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        if self.eager:
            if not self._read_available():
                self.close()
            return
        self._loop.remove_reader(self._fd)
        self._timer = self._loop.call_later(self.BATCH_DELAY_S, self._drain)

    def _drain(self) -> None:
        self._timer = None
        if self._read_available():
            self._loop.add_reader(self._fd, self._readable)
        else:
            self.close()

    def flush(self) -> None:
        """Takes what the runner printed so far now, not a moment later."""
        if not self._closed and not self._read_available():
            self.close()

    def _read_available(self) -> bool:
        """Reads what the pipe holds; False at its end (every writer exited)."""
        lines: list[str] = []
        open_ = True
        while True:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                open_ = False
                break
            if not chunk:
                open_ = False
                break
            self._pending += chunk
            *complete, self._pending = re.split(rb"\r?\n|\r", self._pending)
            lines += (raw.decode("utf-8", "replace") for raw in complete)
            if len(self._pending) > 65536:  # a line without end: keep its head
                lines.append(self._pending[:4096].decode("utf-8", "replace"))
                self._pending = b""
        if not open_ and self._pending:
            lines.append(self._pending.decode("utf-8", "replace"))
            self._pending = b""
        if lines:
            self._on_lines(lines)
        return open_

    def close(self) -> None:
        """Takes what is left in the pipe, then stops reading it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._fd)
        self._read_available()
        if self._pending:
            self._on_lines([self._pending.decode("utf-8", "replace")])
            self._pending = b""
        os.close(self._fd)


# prctl, looked up before any fork: the child may only make a plain C call between fork and exec.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


#: Whether die_with_parent can work here (Linux).
CAN_DIE_WITH_PARENT = _PRCTL is not None


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies, so a crashed
    or killed server never leaves a runner holding memory with nobody to stop it."""
    assert _PRCTL is not None
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


@functools.cache
def _setpriv() -> str | None:
    """util-linux's `setpriv`, if it can set the parent-death signal here (checked once)."""
    found = shutil.which("setpriv")
    if found is None:
        return None
    probe = [found, "--pdeathsig", "KILL", "--", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if done.returncode == 0 else None


def spawn_with_parent_death(
    argv: list[str], path: str | None
) -> tuple[list[str], Callable[[], None] | None]:
    """The argv and preexec_fn that start `argv` so it dies with this process (die_with_parent).

    `setpriv --pdeathsig KILL --` sets the signal and execs the runner in place (same pid, same
    group); without a preexec_fn, Python spawns with vfork instead of fork, which does not copy
    this process's page tables: 1-2 ms instead of 10-40 ms for a serving residency process, on
    every runner start. Where setpriv cannot do it, the preexec_fn does the same. A program not
    found (on `path`, the child's PATH) raises FileNotFoundError here, as a direct spawn would.
    """
    if not CAN_DIE_WITH_PARENT:
        return argv, None
    setpriv = _setpriv()
    if setpriv is None:
        return argv, die_with_parent
    program = shutil.which(argv[0], path=path)
    if program is None:
        raise FileNotFoundError(f"no such executable: {argv[0]!r}")
    return [setpriv, "--pdeathsig", "KILL", "--", program, *argv[1:]], None


def group_has_live_members(pgid: int) -> bool:
    """Whether any non-zombie process is in group `pgid` (scans /proc; used only while stopping)."""
    with os.scandir("/proc") as entries:  # closed on the early return too
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if len(stat) > 2 and int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False


class ExitWatch:
    """Whether a child has exited, reaped or not, asked before every request it serves: a pidfd
    polled without waiting (1 µs), else a read of its /proc stat (50 µs on a busy core)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._poll: select.poll | None = None
        self._fd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # Linux 5.3+
            self._fd = os.pidfd_open(pid)
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)

    def exited(self) -> bool:
        if self._poll is not None:
            return bool(self._poll.poll(0))
        try:
            stat = Path(f"/proc/{self._pid}/stat").read_bytes()
        except OSError:
            return True
        return stat.rsplit(b")", 1)[1].split(None, 1)[0] in (b"Z", b"X")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._poll = None


def exit_text(returncode: int | None) -> str:
    """How a process ended, for people: "exit code 1", "signal SIGKILL"."""
    if returncode is None:
        return "no exit code"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
