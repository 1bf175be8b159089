"""Silent CPU fallback, caught (issue 18, item 5): a model the runner placed partly on the CPU is
flagged — a log warning, metrics, the real split in `residency ps`'s PROCESSOR and /api/ps — on
the simulated GPU with fake runner processes that report their buffers as llama.cpp does; and the
decode-speed detector, unit by unit."""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.api import create_app
from residency.cli_client import cmd_ps, human_bytes
from residency.config import load_settings
from residency.memory import SimulatedDevice
from residency.scheduler import Scheduler
from residency.scheduler.fallback import DecodeSpeed, placement_of
from scheduler_helpers import MIB, fake_model

pytestmark = pytest.mark.timeout(60)


# ---- the decode-speed detector --------------------------------------------------------------
def test_a_drop_against_the_models_own_history_is_flagged_once() -> None:
    d = DecodeSpeed(bound=0.5, recent=3, min_history=5)
    changes = [d.observe("m", 100, 1.0 + i * 0.01) for i in range(8)]  # ~100 tokens/s
    assert changes == [None] * 8
    assert not d.state("m").slow
    # Slower by 10× (a CPU fallback): flagged once the recent median is below half the baseline.
    changes = [d.observe("m", 100, 10.0) for _ in range(4)]
    assert changes == [None, True, None, None]
    state = d.state("m")
    assert state.slow
    assert state.recent_tps == pytest.approx(10.0)
    assert state.baseline_tps == pytest.approx(100 / 1.02, rel=0.05)  # the slow ones stay out
    # Back on the GPU: cleared once the recent median recovers.
    changes = [d.observe("m", 100, 1.0) for _ in range(3)]
    assert changes == [None, False, None]
    assert not d.state("m").slow


def test_noise_short_answers_and_other_models_do_not_count() -> None:
    d = DecodeSpeed()
    for i in range(20):  # ±30 % noise is not a fallback
        assert d.observe("m", 64, 1.0 if i % 2 else 1.4) is None
    assert d.observe("m", 3, 100.0) is None  # 3 tokens say nothing about speed
    assert d.observe("other", 64, 50.0) is None  # a slow model of its own is not slowed down
    assert not d.state("m").slow
    assert not d.state("other").slow
    assert d.state("other").baseline_tps is None  # no history yet: no verdict
    with pytest.raises(ValueError, match="bound"):
        DecodeSpeed(bound=1.5)


# ---- placement from the runner's report -----------------------------------------------------
def test_placement_from_llama_cpps_lines() -> None:
    full = placement_of(
        {"CUDA0/model": 900, "CPU_Mapped/model": 100},
        (25, 25),
        planned_layers=-1,
        reserved_bytes=1000,
    )
    assert full is not None
    assert (full.fallback, full.split) == ("none", False)
    buffers = {"CUDA0/model": 400, "CPU/model": 600}
    part = placement_of(buffers, (10, 25), planned_layers=-1, reserved_bytes=1000)
    assert part is not None
    assert (part.fallback, part.split) == ("partial", True)
    planned = placement_of({"CUDA0/model": 400}, (10, 25), planned_layers=10, reserved_bytes=400)
    assert planned is not None
    assert (planned.fallback, planned.split) == ("none", True)  # asked for: shown, not flagged
    buffers = {"CPU/model": 900, "CPU/KV": 50}
    cpu_only = placement_of(buffers, None, planned_layers=-1, reserved_bytes=1000)
    assert cpu_only is not None
    assert (cpu_only.fallback, cpu_only.gpu_bytes) == ("cpu", 0)
    assert placement_of({}, None, planned_layers=-1, reserved_bytes=1) is None


# ---- end to end on the simulated GPU --------------------------------------------------------
class _AppClient:
    """cli_client.Client's call(), answered by the app in process."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        assert (method, path) == ("GET", "/api/ps")
        return self.data


async def test_a_partial_offload_is_flagged_in_ps_api_ps_metrics_and_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = tmp_path / "gpu.sim"
    SimulatedDevice.create(sim, 2048 * MIB)
    partial = ("--offloaded", "10/25", "--host-bytes", str(600 * MIB))
    models = [
        # Asked for all layers; the runner put 10 of 25 on the GPU (400 MiB), 600 MiB on the CPU.
        fake_model("partial", tmp_path, 400 * MIB, *partial, sim=sim),
        fake_model("whole", tmp_path, 300 * MIB, "--offloaded", "25/25", sim=sim),
    ]
    settings: Any = load_settings(models=models, simulated_device=sim, stop_timeout_s=2.0)
    s = Scheduler(settings)
    app = create_app(settings, scheduler=s)
    caplog.set_level(logging.WARNING, "residency.scheduler")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            for name in ("partial", "whole"):
                r = await c.post("/api/generate", json={"model": name, "prompt": "hi"})
                assert r.status_code == 200, r.text
            ps = (await c.get("/api/ps")).json()
            metrics = (await c.get("/metrics")).text
    rows = {m["name"]: m for m in ps["models"]}
    part, whole = rows["partial:latest"], rows["whole:latest"]
    assert part["placement"] == {
        "gpu_bytes": 400 * MIB,
        "host_bytes": 600 * MIB,
        "layers_on_gpu": 10,
        "layers": 25,
        "cpu_fallback": "partial",
    }
    assert (part["size"], part["size_vram"]) == (1000 * MIB, 400 * MIB)  # the real split
    assert whole["placement"]["cpu_fallback"] == "none"
    assert whole["size_vram"] == whole["size"]

    out = io.StringIO()
    cmd_ps(argparse.Namespace(json=False), _AppClient(ps), out)  # type: ignore[arg-type]
    lines = {line.split()[0]: line for line in out.getvalue().splitlines()[1:]}
    assert "60%/40% CPU/GPU" in lines["partial:latest"]
    assert lines["partial:latest"].endswith("ready, CPU fallback (partial)")
    assert "100% GPU" in lines["whole:latest"]
    warm = "-" if whole["warm_bytes"] is None else human_bytes(whole["warm_bytes"])
    tail = ["sim:0", *warm.split(), "ready"]  # DEVICE, WARM, STATE
    assert lines["whole:latest"].split()[-len(tail) :] == tail

    assert 'residency_model_cpu_fallback{model="partial"} 1.0' in metrics
    assert 'residency_model_cpu_fallback{model="whole"} 0.0' in metrics
    assert 'residency_cpu_fallbacks_total{kind="placement",model="partial"} 1.0' in metrics
    assert 'residency_model_gpu_fraction{device="sim:0",model="partial"} 0.4' in metrics
    warnings = [r.getMessage() for r in caplog.records if "on the CPU" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("partial runs partly on the CPU")


async def test_each_generation_feeds_the_detector_and_api_ps_shows_its_speed(
    tmp_path: Path,
) -> None:
    from api_fakes import serving

    async with serving() as f:  # both APIs hand each finished generation's decode to the lease
        chat = [{"role": "user", "content": "hi"}]
        await f.client.post("/api/chat", json={"model": "gemma3:270m", "messages": chat})
        await f.client.post(
            "/v1/chat/completions",
            json={"model": "gemma3:270m", "messages": chat, "stream": True},
        )
        decodes = [rec["lease"].decodes for rec in f.sched.sessions]
    assert [len(d) for d in decodes] == [1, 1]
    assert all(tokens == 3 and ns >= 0 for [(tokens, ns)] in decodes)

    settings: Any = load_settings(models=[fake_model("m", tmp_path)], memory_limit=500 * MIB)
    async with Scheduler(settings) as s:
        for _ in range(9):  # the scheduler keeps each model's history across its requests
            async with s.session("m") as lease:
                lease.decoded(200, 2_000_000_000)  # 100 tokens/s
        [row] = s.resident()
        assert row.decode_speed is not None
        assert (row.decode_speed.recent_tps, row.decode_speed.baseline_tps) == (100.0, 100.0)
        assert not row.decode_speed.slow
