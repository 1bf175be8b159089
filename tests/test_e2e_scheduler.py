"""End to end: the scheduler driving the real llama-cpp-python runner with the real Gemma 3 270M.

Two entries share the GGUF with different contexts; the budget holds one of them at a time, so
asking for A, then B, then A swaps for real: processes stop, memory is re-measured, models reload.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from residency.config import ModelConfig, load_settings
from residency.embedded import default_model_path
from residency.estimate import estimate
from residency.scheduler import Lease, Scheduler
from scheduler_helpers import alive, eventually, require_llama_cpp

require_llama_cpp()
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MIB = 1024 * 1024
#: Gemma 3 270M takes about 1 GiB on the CPU (most of it llama.cpp's logits buffers); the estimate
#: is in the same range. One fits in the budget, two never do.
BUDGET = 1536 * MIB


async def _post(lease: Lease, path: str, body: dict[str, Any]) -> Any:
    headers = {"content-type": "application/json"}
    r = await lease.client.request(
        "POST", path, body=json.dumps(body).encode(), headers=headers, timeout_s=60
    )
    assert r.status == 200, r.content
    return json.loads(r.content)


async def _generate(lease: Lease) -> str:
    body = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}
    return str(
        (await _post(lease, "/v1/chat/completions", body))["choices"][0]["message"]["content"]
    )


def _pid(lease: Lease) -> int:
    assert lease.runner.pid is not None
    return lease.runner.pid


async def test_swap_two_real_models_through_the_budget(tmp_path: Path) -> None:
    gguf = default_model_path()
    models = [
        ModelConfig(name="gemma-a", path=gguf, ctx=512, runner="llama-cpp-python"),
        ModelConfig(name="gemma-b", path=gguf, ctx=1024, runner="llama-cpp-python"),
    ]
    settings: Any = load_settings(models=models, memory_limit=BUDGET, stop_timeout_s=10)
    async with Scheduler(settings) as s:
        async with s.session("gemma-a") as a:
            assert a.cold
            assert await _generate(a)  # the model really generates
            pid_a = _pid(a)
            # Embeddings are on by default, beside generation.
            assert (await _post(a, "/v1/embeddings", {"input": "hello"}))["data"]
            buffers = a.runner.buffer_report()
            report = sum(buffers.values())
        [row] = s.resident()
        assert row.name == "gemma-a"
        # Reserved from the estimator's prediction until the runner reported its own numbers.
        # (llama-cpp-python with --embedding: 256 sequences over one unified cache, n_batch 512.)
        expected = estimate(
            gguf, ctx=512, parallel=256, kv_unified=True, swa_full=True, embeddings=True, batch=512
        )
        assert row.estimated_bytes == expected.total_bytes
        # ... and that prediction is what the real runner allocated, within the estimator's target.
        assert abs(row.estimated_bytes - report) <= max(0.05 * report, 16 * MIB)
        assert 400 * MIB < row.estimated_bytes < BUDGET
        assert row.context_length == 512
        # The runner's own report (llama.cpp's buffer lines) replaces the estimate.
        assert row.measured_bytes == report
        assert set(buffers) >= {"CPU_Mapped/model", "CPU/KV", "CPU/compute", "CPU/output"}
        assert 200 * MIB < buffers["CPU_Mapped/model"] <= gguf.stat().st_size
        assert row.size_vram == 0  # the host is no GPU

        async with s.session("gemma-b") as b:
            assert b.cold
            assert not alive(pid_a), "A was evicted to make room for B"
            assert await _generate(b)
            pid_b = _pid(b)
        assert [r.name for r in s.resident()] == ["gemma-b"]

        async with s.session("gemma-a", keep_alive=0) as a2:
            assert a2.cold
            assert _pid(a2) != pid_a
            assert not alive(pid_b), "B was evicted to reload A"
            assert await _generate(a2)
            pid_a2 = _pid(a2)
        # keep_alive 0: unloaded as soon as the request ended.
        await eventually(lambda: not alive(pid_a2) and s.resident() == [], 15, "unload")
        assert s.core.devices()[0].reserved_bytes == 0


async def test_too_large_for_the_gpu_loads_partially_offloaded(tmp_path: Path) -> None:
    from residency.estimate import fit_layers
    from residency.memory import SimulatedDevice

    # A (simulated) GPU smaller than the model: the estimator's layer fit decides how many layers
    # go to it; the rest stay on the host.
    sim = tmp_path / "gpu.sim"
    # ~1.45 GiB: the output layer (first to go, with Gemma's 262k-row logits) and the overhead fit,
    # not every layer.
    SimulatedDevice.create(sim, 1490 * MIB)
    gguf = default_model_path()
    settings: Any = load_settings(
        models=[ModelConfig(name="g", path=gguf, ctx=512, runner="llama-cpp-python")],
        simulated_device=sim,
        gpu_overhead=0,
    )
    fit = fit_layers(gguf, 1490 * MIB, ctx=512, parallel=1, kv_type="f16", embeddings=True)
    assert fit.layers > 0
    async with Scheduler(settings) as s:
        async with s.session("g") as lease:
            assert await _generate(lease)
        [row] = s.resident()
        assert row.estimated_bytes == fit.gpu_bytes
        assert row.device == "sim:0"
