"""The runner interface and the process lifecycle every kind shares.

A runner is one OS process serving one model over the OpenAI API on a loopback port. This module
owns what is common: a free port, a process in its own group (never a shell), an output ring
buffer, readiness with a stall-based timeout, a health ping, graceful stop with a SIGKILL deadline
for the whole group, and noticing an exit the moment it happens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from residency.errors import RunnerError
from residency.llamacpp import is_gpu_buffer, parse_buffer_line, parse_offload_line
from residency.memory import runner_gpu_environment
from residency.runners._process import (
    LOOPBACK,
    ExitWatch,
    OutputPipe,
    exit_text,
    free_port,
    group_has_live_members,
    spawn_with_parent_death,
)
from residency.runners.http import RunnerClient, TransportError
from residency.runners.protocol import RunnerApi
from residency.runners.spec import LaunchSpec
from residency.runners.upstream import UpstreamWatch, tree_progress

__all__ = ["LOOPBACK", "LaunchSpec", "Runner", "free_port"]

log = logging.getLogger(__name__)


class Runner(ABC):
    """One runner process. Use: start() → wait_ready() → serve through `client` → stop()."""

    kind: ClassVar[str]
    #: Whether the kind can run part of a model on the GPU and the rest on the CPU.
    supports_offload: ClassVar[bool] = False
    default_health_path: ClassVar[str] = "/v1/models"
    #: Whether it serves embeddings when the model's config does not say (LaunchSpec.embedding).
    default_embedding: ClassVar[bool] = False
    #: Text of the output line the kind prints once its health endpoint answers 200: wait_ready
    #: polls at once instead of at its next tick (a false match costs one poll). None: ticks only.
    ready_marker: ClassVar[str | None] = None

    def __init__(
        self,
        spec: LaunchSpec,
        *,
        port: int | None = None,
        tail_lines: int = 256,
        on_exit: Callable[[Runner], None] | None = None,
    ) -> None:
        self.spec = spec
        self.port = port if port is not None else free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.health_path = spec.health_path or self.default_health_path
        # One pooled client per runner, shared by every request it serves. Generation can take long:
        # only connecting is bounded here; health checks bound their own reads.
        self.client = RunnerClient(LOOPBACK, self.port)
        #: The runner's protocol, for the requests it serves (the client above is for health).
        # Its slots busy, and as many requests more ready to start the moment one frees (the
        # runner reads and parses the next while a slot works): one at a time doubled the median
        # of 32 concurrent tiny requests through llama-cpp-python (bench_facade c32).
        self.api = RunnerApi(
            self.client, name=spec.name, output_tail=self.output_tail, in_flight=2 * spec.parallel
        )
        self.upstream = UpstreamWatch(
            spec.timeouts, lambda: tree_progress(self.pid), spec.name, self._stopped_answering
        )
        #: Why it stopped answering a request (then `on_exit` is called as for an exit).
        self.stalled: str | None = None
        self.client.on_busy = self.upstream.busy
        self._on_exit = on_exit
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._buffers: dict[str, int] = {}
        self._offloaded: tuple[int, int] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pgid: int | None = None
        self._output: OutputPipe | None = None
        self._waiter: asyncio.Task[None] | None = None
        self._exit_watch: ExitWatch | None = None
        self._exited = asyncio.Event()
        #: Set by an exit or the ready marker: wait_ready polls now.
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_output_s = 0.0
        self.started_at_s = 0.0
        self.ready_at_s = 0.0

    # ---- what each kind defines -------------------------------------------------------------
    @abstractmethod
    def argv(self) -> list[str]:
        """The command line; element 0 is the program. Never run through a shell."""

    @classmethod
    def estimate_options(
        cls,
        *,
        ctx: int,
        parallel: int,
        kv_type: str,
        embedding: bool | None,
        flash_attention: bool | None = None,
        kv_persist: bool = False,
    ) -> dict[str, Any]:
        """residency.estimate's options for the memory this kind's process will allocate
        (`kv_persist`: its LaunchSpec will carry a ``kv``).

        A kind that does not run llama.cpp in a known way (the command kind) is estimated as
        llama-cpp-python would load the file; give such a model a `memory` to reserve instead.
        """
        from residency.runners.llama import LlamaCppPythonRunner

        return LlamaCppPythonRunner.estimate_options(
            ctx=ctx,
            parallel=parallel,
            kv_type=kv_type,
            embedding=embedding,
            flash_attention=flash_attention,
        )

    @property
    def embedding(self) -> bool:
        """Whether this runner serves embeddings (the spec's choice, else the kind's default)."""
        e = self.spec.embedding
        return self.default_embedding if e is None else e

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # Python runners: output lines reach the ring buffer at once
        if self.spec.on_gpu:
            indices = self.spec.device_indices or (self.spec.device_index,)
            env.update(runner_gpu_environment(indices, os.environ))
        env["RESIDENCY_DEVICE"] = self.spec.device
        env.update(self.spec.env)
        return env

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def vanished(self) -> bool:
        """Whether the process has exited, even before the event loop reaped it: a request about
        to be sent checks this, so one sent right after a crash goes to a fresh runner."""
        if self.exited:
            return True
        return self._exit_watch is not None and self._exit_watch.exited()

    @property
    def stopping(self) -> bool:
        """True once stop() was called: an exit after this is not a crash."""
        return self._stopping

    async def start(self) -> None:
        """Spawns the process in its own process group. Raises RunnerError if it cannot start."""
        if self._proc is not None:
            raise RuntimeError("runner already started")
        argv = self.argv()
        log.info("starting %s runner for %s: %s", self.kind, self.spec.name, argv)
        self.started_at_s = time.monotonic()
        self._last_output_s = self.started_at_s
        env = self.environment()
        read_fd, write_fd = os.pipe()
        try:
            command, preexec = spawn_with_parent_death(argv, env.get("PATH"))
            self._proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                env=env,
                start_new_session=True,  # its own group: stop() signals every child too
                preexec_fn=preexec,
            )
        except OSError as err:
            os.close(read_fd)
            await self.client.aclose()
            raise RunnerError(
                f"cannot start the {self.kind} runner for {self.spec.name!r} ({argv[0]}): {err}"
            ) from None
        except BaseException:  # cancelled while spawning: no descriptor may leak
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._pgid = self._proc.pid  # session leader: pgid == pid
        self._exit_watch = ExitWatch(self._proc.pid)
        self._output = OutputPipe(read_fd, self._take_lines)
        self._output.eager = self.ready_marker is not None  # until ready: see wait_ready
        self._waiter = asyncio.create_task(self._wait_exit(), name=f"runner-wait-{self.pid}")

    async def wait_ready(self, stall_timeout_s: float, *, interval_s: float = 0.01) -> float:
        """Returns once the health endpoint answers 200, in seconds since start().

        Fails with RunnerError when the process exits, or when it shows no progress (no output, no
        CPU time, no I/O) for `stall_timeout_s` — a slow but busy load is never cut short.
        """
        if self._proc is None:
            raise RuntimeError("runner not started")
        progress = tree_progress(self.pid)
        last_progress = time.monotonic()
        while True:
            if self.exited:
                raise self.error(f"exited with {self._exit_text()} while loading")
            try:
                r = await self.client.get(self.health_path, timeout_s=max(interval_s * 50, 1.0))
                if r.status == 200:
                    self.ready_at_s = time.monotonic()
                    if self._output is not None:
                        self._output.eager = False  # serving: read output in batches again
                    return self.ready_at_s - self.started_at_s
            except TransportError:
                pass  # not listening yet
            now = time.monotonic()
            marker = tree_progress(self.pid)
            if marker != progress or self._last_output_s > last_progress:
                progress, last_progress = marker, now
            elif now - last_progress > stall_timeout_s:
                raise self.error(
                    f"made no progress for {stall_timeout_s:g} s while loading "
                    f"(health {self.health_path} never answered)"
                )
            # Wake at once if the process dies or says it is ready meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s)
            self._wake.clear()

    async def ping(self, timeout_s: float = 10.0) -> bool:
        """Whether the runner answers its health endpoint within `timeout_s`."""
        if self.exited:
            return False
        try:
            r = await self.client.get(self.health_path, timeout_s=timeout_s)
        except TransportError:
            return False
        return r.status == 200

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM to the group, SIGKILL after `timeout_s`; idempotent. Returns the exit status."""
        self._stopping = True
        if self._proc is None:
            await self.client.aclose()
            return None
        try:
            if not self.exited:
                self._signal_group(signal.SIGTERM if timeout_s > 0 else signal.SIGKILL)
            deadline = time.monotonic() + timeout_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), timeout_s)
            # The leader is gone (or ignored SIGTERM); children that outlive it keep memory.
            # Grandchildren cannot be awaited (they are not our children): poll the group.
            while self._group_alive() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            if self._group_alive():
                if timeout_s > 0:
                    log.warning("%s (pid %s) ignored SIGTERM: SIGKILL", self.spec.name, self.pid)
                self._signal_group(signal.SIGKILL)
                # A child whose leader is gone is not ours to await: poll until SIGKILL took it
                # (on a busy machine that takes a scheduling round), so nothing outlives stop().
                gone_by = time.monotonic() + 2.0
                while self._group_alive() and time.monotonic() < gone_by:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            if not self.exited:
                await self._exited.wait()
        except asyncio.CancelledError:
            self._signal_group(signal.SIGKILL)  # cancelled mid-stop: leave nothing running
            raise
        finally:
            self.upstream.close()
            await asyncio.shield(self.client.aclose())
        return self.returncode

    async def wait_exit(self) -> int | None:
        await self._exited.wait()
        return self.returncode

    # ---- what it said -------------------------------------------------------------------------
    def output_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the runner printed (stdout and stderr together)."""
        if self._output is not None:
            self._output.flush()
        kept = list(self._tail)
        return "\n".join(kept[-lines:] if lines > 0 else kept)

    def buffer_report(self) -> dict[str, int]:
        """Every buffer llama.cpp reported, as {"CPU_Mapped/model": bytes, "CUDA0/KV": …}."""
        if self._output is not None:
            self._output.flush()
        return dict(self._buffers)

    def reported_bytes(self) -> int | None:
        """The memory the runner reported allocating on its device (llama.cpp's buffer lines):
        GPU buffers when it runs on a GPU, host buffers otherwise; None if it reported none."""
        buffers = self.buffer_report()
        if not buffers:
            return None
        gpu = self.spec.on_gpu
        total = sum(b for k, b in buffers.items() if is_gpu_buffer(k.split("/")[0]) == gpu)
        return total or None

    def offloaded_layers(self) -> tuple[int, int] | None:
        """(layers on the GPU, layers) as llama.cpp reported them; None if it did not."""
        return self._offloaded

    def error(self, what: str) -> RunnerError:
        """A RunnerError naming this runner, with its last output lines."""
        return RunnerError(
            f"{self.kind} runner for {self.spec.name!r} (pid {self.pid}) {what}", self.output_tail()
        )

    def exit_description(self) -> str:
        return self._exit_text()

    # ---- internals ----------------------------------------------------------------------------
    def _stopped_answering(self, why: str) -> None:
        if self.stalled is None and not self.exited and not self._stopping:
            self.stalled = f"stopped answering: {why}"
            if self._on_exit is not None:
                self._on_exit(self)  # replaced like a runner that exited

    def _exit_text(self) -> str:
        return exit_text(self.returncode)

    def _take_lines(self, lines: list[str]) -> None:
        self._last_output_s = time.monotonic()
        marker = self.ready_marker
        if marker is not None and not self.ready_at_s and any(marker in x for x in lines):
            self._wake.set()
        for line in lines:
            self._tail.append(line)
            # A substring test first: a runner's per-request lines cost next to nothing.
            buffer = parse_buffer_line(line) if "buffer size" in line else None
            if buffer is not None:
                key = f"{buffer.device}/{buffer.kind}"
                self._buffers[key] = self._buffers.get(key, 0) + int(buffer.size_bytes)
            elif "layers to GPU" in line:
                self._offloaded = parse_offload_line(line) or self._offloaded

    async def _wait_exit(self) -> None:
        assert self._proc is not None
        rc = await self._proc.wait()
        if self._exit_watch is not None:
            self._exit_watch.close()
        # Its last words are in the pipe already: take them before anyone asks why it exited.
        if self._output is not None:
            self._output.close()
        if not self._stopping:
            log.warning("%s runner for %s exited: %s", self.kind, self.spec.name, self._exit_text())
            # A dead leader's children must not keep the memory.
            self._signal_group(signal.SIGKILL)
        else:
            log.info("%s runner for %s stopped (rc %s)", self.kind, self.spec.name, rc)
        self._exited.set()
        self._wake.set()
        if self._on_exit is not None:
            try:
                self._on_exit(self)
            except Exception:
                log.exception("runner exit callback failed")

    def _group_alive(self) -> bool:
        if self._pgid is None:
            return False
        try:
            os.killpg(self._pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A group that holds only zombies (children not yet reaped by us) is dead for our purpose.
        return not (self.exited and not group_has_live_members(self._pgid))

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._pgid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pgid, sig)
