"""Helpers shared by the benchmarks that need a real NVIDIA GPU (``bench_gpu_*.py``).

- :class:`Holder` — a child process that ``cudaMalloc``s some bytes through libcudart (ctypes, no
  framework) and holds them until it is told to exit or is killed: a stand-in for a runner's VRAM.
- :class:`Sentinel` — a child process that polls NVML and cudaMemGetInfo every ~0.2 ms and the
  holder's pidfd, and reports (CLOCK_MONOTONIC, comparable across processes) when the holder exited
  and when each probe first showed its memory back. It lives in its own process so its busy loop
  never holds the benchmark's GIL.
- :func:`nvidia_smi` — the driver's own view (``nvidia-smi --query-gpu``), in MiB.

Run as ``python benchmarks/gpu_common.py sentinel`` or ``... hold BYTES`` (the two children).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MIB = 1 << 20
GIB = 1 << 30


def cudart_path() -> str:
    """The libcudart residency's cuda probe would load first (must load here)."""
    import ctypes

    from residency.memory import cudart_candidates

    for path in cudart_candidates():
        try:
            ctypes.CDLL(path)
        except OSError:
            continue
        return path
    raise RuntimeError("no libcudart loads here")


def nvidia_smi() -> dict[str, Any]:
    """GPU 0 as nvidia-smi reports it (MiB, as printed)."""
    fields = "name,driver_version,memory.total,memory.reserved,memory.used,memory.free"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    values = [v.strip() for v in out.split(",")]
    row: dict[str, Any] = dict(zip(fields.split(","), values, strict=True))
    for key in fields.split(",")[2:]:
        with contextlib.suppress(ValueError):
            row[key] = int(row[key])
    return row


# ---- the holder ---------------------------------------------------------------------------------


class Holder:
    """A child holding ``nbytes`` of device memory (one cudaMalloc, written once)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "hold", str(nbytes), cudart_path()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"holder failed: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def exit(self) -> None:
        """A clean exit: the CUDA runtime tears its context down at exit, as a stopped runner's."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()

    def reap(self) -> int:
        return self.proc.wait(timeout=30)


def _hold(nbytes: int, library: str) -> int:
    import ctypes

    cudart = ctypes.CDLL(library)
    ptr = ctypes.c_void_p()
    size = ctypes.c_size_t(nbytes)
    for rc in (
        cudart.cudaMalloc(ctypes.byref(ptr), size),
        cudart.cudaMemset(ptr, 1, size),  # touch it: the memory is really in use
        cudart.cudaDeviceSynchronize(),
    ):
        if rc != 0:
            print(f"cuda error {rc}", flush=True)
            return 1
    print("ready", flush=True)
    sys.stdin.readline()  # "exit", or EOF when the parent goes
    return 0  # normal interpreter exit: cudart's exit handler destroys the context


# ---- the sentinel -------------------------------------------------------------------------------


class Sentinel:
    """The child that timestamps a holder's exit and its memory's return, per probe."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "sentinel"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        assert ready.get("ready"), ready

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the sentinel died")
        out: dict[str, Any] = json.loads(line)
        return out

    def arm(self, pid: int, expected: int, timeout_s: float = 10.0) -> dict[str, int]:
        """Starts watching ``pid``; returns each probe's free bytes now (before the free)."""
        assert self.proc.stdin is not None
        msg = {"pid": pid, "expected": expected, "timeout_s": timeout_s}
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        armed = self._read()
        free: dict[str, int] = armed["free_before"]
        return free

    def result(self) -> dict[str, Any]:
        """{"exit_ns", "seen75_ns": {probe: ns}, "seen99_ns": {...}, "steps": {...}}."""
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


def _sentinel() -> int:
    from residency.memory import open_probe

    probes = {"nvml": open_probe("nvml"), "cuda": open_probe("cuda")}
    for p in probes.values():
        p.query(0)  # the cuda probe creates its context now, not while a recovery is timed
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pidfd = os.pidfd_open(int(cmd["pid"]))
        expected = int(cmd["expected"])
        free_before = {n: p.query(0).free_bytes for n, p in probes.items()}
        print(json.dumps({"free_before": free_before}), flush=True)
        deadline = time.monotonic_ns() + int(float(cmd["timeout_s"]) * 1e9)
        exit_ns: int | None = None
        seen75: dict[str, int] = {}
        seen99: dict[str, int] = {}
        last: dict[str, int] = dict(free_before)
        steps = dict.fromkeys(probes, 0)
        while time.monotonic_ns() < deadline:
            if exit_ns is None and select.select([pidfd], [], [], 0)[0]:
                exit_ns = time.monotonic_ns()
            for name, probe in probes.items():
                if name in seen99:
                    continue
                free = probe.query(0).free_bytes
                now = time.monotonic_ns()
                if free != last[name]:
                    steps[name] += 1
                    last[name] = free
                gained = free - free_before[name]
                if name not in seen75 and gained >= 0.75 * expected:
                    seen75[name] = now
                if gained >= 0.99 * expected:
                    seen99[name] = now
            if exit_ns is not None and len(seen99) == len(probes):
                break
            time.sleep(0.0002)
        os.close(pidfd)
        print(
            json.dumps(
                {"exit_ns": exit_ns, "seen75_ns": seen75, "seen99_ns": seen99, "steps": steps}
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        raise SystemExit(_hold(int(sys.argv[2]), sys.argv[3]))
    if sys.argv[1] == "sentinel":
        raise SystemExit(_sentinel())
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
