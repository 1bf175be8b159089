"""Metrics on prometheus-client: the scheduler's events move their families, with real (fake)
runner processes — a cold load, an eviction to make room, a crash, a failed load, an unload —
and /metrics serves them beside the request families."""

from __future__ import annotations

import gc
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from residency.api import create_app
from residency.errors import RunnerError
from residency.metrics import ResidencyMetrics
from residency.scheduler import Scheduler
from scheduler_helpers import MIB, eventually, fake_model
from test_scheduler import make_settings

pytestmark = pytest.mark.timeout(60)


def value(metrics: ResidencyMetrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else float(v)


async def test_scheduler_events_move_their_families(tmp_path: Path) -> None:
    registry = CollectorRegistry()  # an embedder's own: the families register into it
    models = [
        fake_model("a", tmp_path, 150 * MIB),
        fake_model("b", tmp_path, 150 * MIB),  # a and b do not fit together in 250 MiB
        fake_model("c", tmp_path, 50 * MIB, "--crash-after-s", "0.5"),
        fake_model("bad", tmp_path, 50 * MIB, "--fail-load"),
    ]
    s = Scheduler(make_settings(models), metrics=ResidencyMetrics(registry))
    m = s.metrics
    assert m.registry is registry
    await s.start()
    try:
        await s.load("a")
        assert value(m, "residency_model_loads_total", model="a") == 1
        assert value(m, "residency_model_load_seconds_count", model="a") == 1
        assert value(m, "residency_model_reserved_bytes", model="a", device="host") > 0
        assert value(m, "residency_device_budget_bytes", device="host") == 250 * MIB
        assert value(m, "residency_device_reserved_bytes", device="host") > 0
        assert value(m, "residency_device_free_bytes", device="host") > 0  # as probed

        await s.load("b")  # evicts a to make room
        await eventually(
            lambda: value(m, "residency_evictions_total", model="a", reason="make_room") == 1,
            what="the eviction counted",
        )
        assert value(m, "residency_model_resident", model="a", device="host", state="ready") == 0

        await s.load("c")
        await eventually(
            lambda: value(m, "residency_runner_crashes_total", model="c") == 1, what="the crash"
        )
        assert value(m, "residency_evictions_total", model="c", reason="crash") == 1

        with pytest.raises(RunnerError):
            await s.load("bad")
        assert value(m, "residency_model_load_failures_total", model="bad") == 1
        assert value(m, "residency_model_loads_total", model="bad") == 0

        await s.unload("b")
        assert value(m, "residency_evictions_total", model="b", reason="unload_request") == 1
    finally:
        await s.stop()
        gc.collect()


async def test_metrics_endpoint_serves_the_schedulers_registry(tmp_path: Path) -> None:
    s = Scheduler(make_settings([fake_model("a", tmp_path)]))
    app = create_app(s.settings, scheduler=s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            r = await client.post("/api/generate", json={"model": "a", "prompt": "hi"})
            assert r.status_code == 200, r.text
            text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "residency_model_loads",
        "residency_evictions",
        "residency_runner_crashes",
        "residency_model_load_failures",
        "residency_load_duration_seconds",
        "residency_queue_duration_seconds",
        "residency_time_to_first_token_seconds",
        "residency_device_total_bytes",
        "residency_model_estimated_bytes",
        "residency_model_warm_bytes",
    ):
        assert name in families, name
    # The fake model's file was just written and its runner maps it: mincore finds it in RAM.
    warm = families["residency_model_warm_bytes"].samples
    assert [x.labels["model"] for x in warm] == ["a"]
    assert warm[0].value > 0
    loads = [x for x in families["residency_model_loads"].samples if x.name.endswith("_total")]
    assert [(x.labels, x.value) for x in loads] == [({"model": "a"}, 1.0)]
    ttft = families["residency_time_to_first_token_seconds"].samples
    assert any(x.name.endswith("_count") and x.value == 1 for x in ttft)
