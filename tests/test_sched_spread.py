"""sched_spread (OLLAMA_SCHED_SPREAD, issue 18): every GPU becomes one device to the scheduler,
each model is reserved across all of them and its runner sees every GPU (llama.cpp splits the
layers), on two simulated GPUs with fake runner processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from residency.config import load_settings
from residency.errors import ModelTooLargeError
from residency.memory import DeviceInfo, runner_gpu_environment
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, fake_model

pytestmark = pytest.mark.timeout(60)

GIB = 1024 * MIB
GPUS = [DeviceInfo(f"cuda:{i}", i, f"Simulated GPU {i}", GIB, GIB, "simulated") for i in (0, 1)]


def scheduler(tmp_path: Path, spread: bool) -> Scheduler:
    models = [
        fake_model("big", tmp_path, 1536 * MIB),  # more than one GPU holds, less than two
        fake_model("small", tmp_path, 100 * MIB),
    ]
    settings: Any = load_settings(
        models=models, sched_spread=spread, gpu_overhead=64 * MIB, stop_timeout_s=2.0
    )
    return Scheduler(settings, devices=list(GPUS), probe=None)


async def test_spread_reserves_across_every_gpu_and_the_runner_sees_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    async with scheduler(tmp_path, spread=True) as s:
        [dev] = s.core.devices()
        assert dev.id == "cuda:0+cuda:1"
        assert (dev.total_bytes, dev.budget_bytes) == (2 * GIB, 2 * GIB - 128 * MIB)
        assert dev.max_models == 6  # 3 per GPU, as Ollama counts them
        for name in ("big", "small"):
            async with s.session(name) as lease:
                assert lease.device == "cuda:0+cuda:1"
                assert "gpus 0,1" in lease.output_tail()  # CUDA_VISIBLE_DEVICES=0,1
        assert {r.name: r.device for r in s.resident()} == {
            "big": "cuda:0+cuda:1",
            "small": "cuda:0+cuda:1",
        }


async def test_without_spread_a_model_goes_to_one_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    async with scheduler(tmp_path, spread=False) as s:
        assert [d.id for d in s.core.devices()] == ["cuda:0", "cuda:1"]
        async with s.session("small") as lease:
            assert lease.device in ("cuda:0", "cuda:1")
            assert f"gpus {lease.device[-1]}" in lease.output_tail()
        with pytest.raises(ModelTooLargeError):  # 1.5 GiB fits on neither GPU alone
            async with s.session("big"):
                pass


def test_a_spread_runner_under_a_device_list_gets_its_entries() -> None:
    env = runner_gpu_environment((0, 1), {"CUDA_VISIBLE_DEVICES": "3,5,7"})
    assert env == {"CUDA_VISIBLE_DEVICES": "3,5"}
    assert runner_gpu_environment((1, 0), {})["CUDA_VISIBLE_DEVICES"] == "1,0"
