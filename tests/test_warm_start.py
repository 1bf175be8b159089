"""A warm file makes a real runner start read nothing from storage, and the server's prefetch warms
the file during a real wait, before the runner starts.

What the runner read is the kernel's own count for the runner process (``/proc/PID/io``
``read_bytes``: bytes it caused to be fetched from storage; page-cache hits are not counted),
sampled when the runner is ready and before it stops — never a timing. Every file state is
verified with ``mincore`` first. The model is a private copy of the embedded Gemma 3 270M beside
the models (a disk: a tmpfs file can never be dropped; a shared file may be mapped by others).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llama_server_fixtures import require_llama_server
from residency import pagecache, proc_io
from residency.config import ModelConfig, load_settings
from residency.embedded import cache_dir, default_model_path
from residency.runners import LaunchSpec, LlamaServerRunner, Runner
from residency.scheduler import Scheduler
from residency.scheduler.executor import default_runner
from scheduler_helpers import MIB, eventually, fake_model

require_llama_server()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

#: A file counts as dropped / warm when mincore sees at most / at least this share of it in RAM.
DROPPED_MAX, WARM_MIN = 0.05, 0.95


@pytest.fixture(scope="module")
def gguf() -> Iterator[Path]:
    folder = cache_dir() / "test-warm-start"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gemma-{os.getpid()}.gguf"
    shutil.copyfile(default_model_path(), path)
    with path.open("rb+") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    yield path
    path.unlink(missing_ok=True)


def in_ram(path: Path) -> float:
    return pagecache.resident_bytes(path) / path.stat().st_size


def file_size(path: Path) -> int:
    return path.stat().st_size


#: Major faults a dropped start must show for them to stand in for read_bytes (4 KiB pages).
MIN_FAULTS = 1000


async def start_and_count(path: Path) -> proc_io.StorageReads:
    """Starts llama-server on ``path`` as it is now; the runner's storage counters at ready."""
    spec = LaunchSpec(
        name="warm-start", model_path=path, ctx=512, parallel=1, kv_type="f16", gpu_layers=0
    )
    runner = LlamaServerRunner(spec)
    try:
        await runner.start()
        await runner.wait_ready(120)
        assert runner.pid is not None
        return proc_io.storage_reads(runner.pid)  # while it is alive
    finally:
        await runner.stop()


async def test_a_start_after_a_warm_file_reads_far_less_from_storage(gguf: Path) -> None:
    size = file_size(gguf)
    pagecache.drop(gguf)
    assert in_ram(gguf) <= DROPPED_MAX
    dropped = await start_and_count(gguf)
    pagecache.warm(gguf)
    assert in_ram(gguf) >= WARM_MIN
    warm = await start_and_count(gguf)
    if dropped.read_bytes:  # the kernel counts this process's storage reads here
        # The dropped start really came from storage: the counter saw (nearly) the whole file.
        assert dropped.read_bytes >= size // 2, dropped
        assert warm.read_bytes is not None
        assert warm.read_bytes < dropped.read_bytes // 10, (warm, dropped)
    elif dropped.major_faults >= MIN_FAULTS:  # no I/O accounting: the faults that paged it in
        assert warm.major_faults < dropped.major_faults // 10, (warm, dropped)
    else:
        pytest.skip(
            f"no counter saw the dropped start read its file: read_bytes {dropped.read_bytes} "
            "(no per-process I/O accounting, or a filesystem it does not cover) and "
            f"{dropped.major_faults} major faults (llama-server reads the file ahead: its faults "
            "are minor)"
        )


async def test_the_servers_prefetch_warms_the_file_during_the_wait(
    gguf: Path, tmp_path: Path
) -> None:
    """A request for "gemma" waits (the only room is held by "busy", in use); the host tier
    prefetches its file meanwhile. When the runner is made the file is already warm (mincore),
    and the real llama-server then reads (nearly) nothing from storage."""
    pagecache.drop(gguf)
    assert in_ram(gguf) <= DROPPED_MAX
    busy = fake_model("busy", tmp_path, 100 * MIB)
    gemma = ModelConfig(name="gemma", path=gguf, runner="llama-server", ctx=512, memory=300 * MIB)
    settings = load_settings(
        models=[busy, gemma],
        memory_limit=350 * MIB,  # one of them at a time
        stop_timeout_s=5.0,
        probe="host",
        host_cache_bytes=4 << 30,
        kv_persist=False,
    )
    made: dict[str, tuple[Runner, float]] = {}

    def recording(kind: str, spec: LaunchSpec, on_exit: Callable[[Runner], None]) -> Runner:
        runner = default_runner(kind, spec, on_exit)
        made[spec.name] = (runner, in_ram(spec.model_path))  # before the runner exists
        return runner

    s = Scheduler(settings, runner_factory=recording)
    await s.start()
    load: asyncio.Task[object] | None = None
    try:
        async with s.session("busy"):
            load = asyncio.create_task(s.load("gemma"))
            # Warmed while it waits (prefetch), by mincore — no runner for it yet.
            await eventually(lambda: in_ram(gguf) >= WARM_MIN, 60, "the prefetch")
            assert "gemma" not in made
            assert not load.done()
        await asyncio.wait_for(load, 120)
        runner, share_at_spawn = made["gemma"]
        assert share_at_spawn >= WARM_MIN
        assert runner.pid is not None
        reads = proc_io.storage_reads(runner.pid)
        if reads.read_bytes is not None:  # None: the kernel keeps no per-process I/O accounting
            assert reads.read_bytes < file_size(gguf) // 10, reads
    finally:
        await s.stop()
        if load is not None and not load.done():
            load.cancel()
        if load is not None:
            await asyncio.gather(load, return_exceptions=True)  # retrieved, whatever it was
        gc.collect()
