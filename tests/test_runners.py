"""Runner kinds: their command lines, and the process lifecycle they share (on the fake runner)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from residency.config import load_settings
from residency.errors import ConfigError, RunnerError
from residency.runners import (
    CommandRunner,
    LaunchSpec,
    LlamaCppPythonRunner,
    LlamaServerRunner,
    Runner,
    runner_class,
)
from residency.runners.kvcache import KvPersistence
from scheduler_helpers import FAKE_RUNNER, alive, eventually, group_members


def spec(**kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "name": "m",
        "model_path": Path("/models/m.gguf"),
        "ctx": 2048,
        "parallel": 2,
        "kv_type": "f16",
        "gpu_layers": -1,
    }
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


async def test_llama_cpp_python_command_line() -> None:
    r = LlamaCppPythonRunner(
        spec(
            device="cuda:1",
            device_index=1,
            details={"family": "gemma3", "has_chat_template": False},
        )
    )
    argv = r.argv()
    assert argv[:3] == [sys.executable, "-m", "llama_cpp.server"]
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == str(r.port)
    assert flag(argv, "--n_ctx") == "2048"
    assert flag(argv, "--n_gpu_layers") == "-1"
    assert flag(argv, "--embedding") == "true"
    assert flag(argv, "--chat_format") == "gemma"  # the GGUF ships no template
    assert "--type_k" not in argv
    assert r.environment()["CUDA_VISIBLE_DEVICES"] == "1"
    q8 = LlamaCppPythonRunner(spec(kv_type="q8_0", device="host", embedding=False))
    argv = q8.argv()
    assert flag(argv, "--type_k") == flag(argv, "--type_v") == "8"  # ggml's Q8_0
    assert flag(argv, "--flash_attn") == "true"
    assert flag(argv, "--n_gpu_layers") == "0"  # on the host
    assert flag(argv, "--embedding") == "false"
    assert "CUDA_VISIBLE_DEVICES" not in q8.environment() or q8.spec.device == "host"
    with pytest.raises(ConfigError, match="unknown KV cache type 'q9'"):
        LlamaCppPythonRunner(spec(kv_type="q9")).argv()
    for r in (q8,):
        await r.client.aclose()


async def test_llama_server_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESIDENCY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    kv = KvPersistence(directory=tmp_path / "kv")
    r = LlamaServerRunner(spec(device="cuda:0", binary=str(binary), kv=kv))
    argv = r.argv()
    assert argv[0] == str(binary)
    assert flag(argv, "--ctx-size") == "4096"  # shared by 2 slots of 2048
    assert flag(argv, "--parallel") == "2"
    assert flag(argv, "--n-gpu-layers") == "999"
    assert flag(argv, "--cache-type-k") == "f16"
    assert flag(argv, "--verbosity") == "4"  # the buffer lines are logged at "trace"
    assert flag(argv, "--cache-ram") == "0"  # no host prompt cache beside the budgeted memory
    assert flag(argv, "--slot-save-path") == str(tmp_path / "kv")
    assert (tmp_path / "kv").is_dir()
    assert "--embeddings" in argv  # it serves completions alongside, so /api/embed works
    assert r.health_path == "/health"
    missing = LlamaServerRunner(spec(binary=None))
    with pytest.raises(ConfigError, match="none is configured, on PATH or built"):
        missing.argv()
    plain = LlamaServerRunner(spec(binary=str(binary)))  # no kv: persistence off
    assert "--slot-save-path" not in plain.argv()
    assert "--swa-full" not in plain.argv()
    await plain.client.aclose()
    await r.client.aclose()
    await missing.client.aclose()


def test_kv_settings_reach_each_launch_spec(tmp_path: Path) -> None:
    """The settings decide a launch's KV persistence per model; two Settings never mix."""
    from residency.config_model import ModelConfig
    from residency.runners.choice import kv_persistence

    on = ModelConfig(name="a", path=tmp_path / "a.gguf")
    off = ModelConfig(name="b", path=tmp_path / "b.gguf", kv_persist=False)
    settings = load_settings(kv_dir=tmp_path / "kv", kv_budget=1 << 20, kv_save_timeout_s=2)
    assert kv_persistence(settings, on) == KvPersistence(tmp_path / "kv", 1 << 20, 2.0)
    assert kv_persistence(settings, off) is None
    assert kv_persistence(load_settings(kv_persist=False), on) is None
    assert kv_persistence(settings, on) == KvPersistence(tmp_path / "kv", 1 << 20, 2.0)
    # The estimate follows the same choice: --swa-full only where slots are saved.
    for persist in (True, False):
        opts = LlamaServerRunner.estimate_options(
            ctx=1024, parallel=1, kv_type="f16", embedding=None, kv_persist=persist
        )
        assert opts["swa_full"] is persist


async def test_command_template_placeholders() -> None:
    template = [
        "serve",
        "{model}",
        "--port={port}",
        "--ctx",
        "{ctx}",
        "-np",
        "{parallel}",
        "--ngl",
        "{gpu_layers}",
        "--kv",
        "{kv_type}",
        "--name",
        "{name}",
        "{device}",
    ]
    r = CommandRunner(spec(device="cuda:0", command=template))
    assert r.argv() == [
        "serve",
        "/models/m.gguf",
        f"--port={r.port}",
        "--ctx",
        "2048",
        "-np",
        "2",
        "--ngl",
        "-1",
        "--kv",
        "f16",
        "--name",
        "m",
        "cuda:0",
    ]
    bad = CommandRunner(spec(command=["serve", "{modle}"]))
    with pytest.raises(ConfigError, match=r"unknown placeholder \{modle\}"):
        bad.argv()
    assert runner_class("command") is CommandRunner
    with pytest.raises(ConfigError, match="unknown runner kind 'vllm'"):
        runner_class("vllm")
    await r.client.aclose()
    await bad.client.aclose()


def fake(*flags: str, **kw: object) -> CommandRunner:
    command = [sys.executable, str(FAKE_RUNNER), "--port", "{port}", "--name", "{name}", *flags]
    return CommandRunner(spec(device="host", command=command), **kw)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
async def test_start_ready_report_and_graceful_stop() -> None:
    r = fake("--bytes", str(64 << 20))
    await r.start()
    seconds = await r.wait_ready(10)
    assert 0 < seconds < 10
    assert r.reported_bytes() == 64 << 20
    assert r.buffer_report() == {"CPU/model": 64 << 20}
    assert await r.ping(2)
    assert "listening on" in r.output_tail()
    assert await r.stop(5) == 0  # SIGTERM handled: clean exit
    assert r.exited
    assert not alive(r.pid or 0)
    assert not await r.ping(1)
    assert await r.stop(5) == 0  # idempotent


@pytest.mark.timeout(30)
async def test_a_crash_is_noticed_at_once_with_its_last_words() -> None:
    seen: list[tuple[Runner, float]] = []
    r = fake("--crash-after-s", "0.3", on_exit=lambda run: seen.append((run, time.monotonic())))
    await r.start()
    await r.wait_ready(10)
    rc = await r.wait_exit()
    assert rc == 7
    assert seen
    assert seen[0][0] is r
    assert "simulated crash" in r.output_tail()
    err = r.error("died")
    assert "(pid" in str(err)
    assert "simulated crash" in err.output_tail
    await r.stop(1)


@pytest.mark.timeout(30)
async def test_failing_load_raises_with_the_output() -> None:
    r = fake("--fail-load")
    await r.start()
    with pytest.raises(RunnerError, match="exited with exit code 3 while loading") as info:
        await r.wait_ready(10)
    assert "invalid magic number" in info.value.output_tail
    await r.stop(1)


@pytest.mark.timeout(30)
async def test_stall_timeout_only_without_progress() -> None:
    hang = fake("--hang-health")
    await hang.start()
    start = time.monotonic()
    with pytest.raises(RunnerError, match=r"made no progress for 0.5 s"):
        await hang.wait_ready(0.5)
    assert time.monotonic() - start < 5
    await hang.stop(2)
    busy = fake("--load-s", "1.5")  # prints while loading: progress, so no timeout
    await busy.start()
    assert await busy.wait_ready(0.5) >= 1.5
    await busy.stop(2)


@pytest.mark.timeout(30)
async def test_stop_kills_the_whole_group_even_when_it_ignores_sigterm() -> None:
    r = fake("--child", "--ignore-term")
    await r.start()
    await r.wait_ready(10)
    pgid = r.pid or 0
    await eventually(lambda: len(group_members(pgid)) == 2, 5, "the child process")
    start = time.monotonic()
    rc = await r.stop(0.5)
    assert rc == -9  # SIGKILL after the deadline
    assert 0.5 <= time.monotonic() - start < 3
    assert group_members(pgid) == []


@pytest.mark.timeout(30)
async def test_a_missing_program_is_a_runner_error() -> None:
    r = CommandRunner(spec(command=["/nonexistent/server", "{port}"]))
    with pytest.raises(RunnerError, match="cannot start the command runner for 'm'"):
        await r.start()


@pytest.mark.timeout(30)
async def test_runners_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    # A server killed without a chance to stop its runners must not leave them holding memory.
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_runners import fake
async def main():
    r = fake()
    await r.start()
    await r.wait_ready(10)
    print(r.pid, flush=True)
    os._exit(1)  # no stop(), no clean-up: as if SIGKILLed
asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    runner_pid = int(out.split()[-1])
    await eventually(lambda: not alive(runner_pid), 5, "the orphaned runner to die")


@pytest.mark.timeout(30)
async def test_output_is_read_in_batches_without_losing_or_blocking() -> None:
    # 200k lines (~3 MB) as fast as the process can print, the last one without an end: the
    # runner never waits on a full pipe, and the ring buffer ends with exactly its last lines.
    script = (
        "import sys\n"
        "for i in range(200_000): sys.stdout.write('line %d\\n' % i)\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    r = CommandRunner(spec(command=[sys.executable, "-c", script]), tail_lines=64)
    t0 = time.monotonic()
    await r.start()
    assert await asyncio.wait_for(r.wait_exit(), 20) == 0
    assert r.output_tail(3).splitlines() == ["line 199998", "line 199999", "no newline at the end"]
    assert len(r.output_tail(0).splitlines()) == 64
    assert time.monotonic() - t0 < 15
    await r.stop()


def test_auto_prefers_configured_then_path_then_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from residency.runners.build import cache_dir
    from residency.runners.choice import resolve_kind, start_build_if_missing

    monkeypatch.setenv("RESIDENCY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    settings = load_settings(build_runner=False)
    assert resolve_kind("auto", settings) == "llama-cpp-python"
    with caplog.at_level("WARNING"):
        assert start_build_if_missing(settings) is False  # `serve` says how to get one
    assert "no llama-server found" in caplog.text
    assert "residency build-runner" in caplog.text

    def executable(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return path

    built = executable(cache_dir() / "bin" / "llama-server")
    assert resolve_kind("auto", settings) == "llama-server"
    on_path = executable(tmp_path / "bin" / "llama-server")
    configured = executable(tmp_path / "mine" / "llama-server")
    from residency.runners.build import find_llama_server

    assert find_llama_server() == on_path
    assert find_llama_server(str(configured)) == configured
    on_path.unlink()
    assert find_llama_server() == built
    # A forced kind wins over what is found; a model's own kind over the settings'.
    forced = load_settings(runner="llama-cpp-python")
    assert resolve_kind("auto", forced) == "llama-cpp-python"
    assert resolve_kind("llama-server", forced) == "llama-server"
    assert runner_class(resolve_kind("auto", settings)) is LlamaServerRunner
    with pytest.raises(ConfigError, match="not an executable file"):
        find_llama_server(str(tmp_path / "nope"))
