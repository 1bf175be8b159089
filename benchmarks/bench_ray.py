"""Ray Serve's stock model multiplexing against residency on Ray, on the same replayed trace.

    python benchmarks/bench_ray.py [--quick] [--requests N] [--seed S]

One local Ray cluster, two deployments side by side, each of 2 replicas with the same memory
budget per replica, serving the same trace of requests over 5 models (sizes below), 4 at a time:

- **stock**: ``@serve.multiplexed(max_num_models_per_replica=3)`` (Ray's LRU by count) and Serve's
  stock router, which sends a request to a replica whose multiplexed ids include the model. Its
  loader takes as long as a residency load; it counts a load that leaves the replica holding more
  bytes than its budget as an over-commit (what would be an OOM on a GPU).
- **residency**: residency.ray's model-server replicas (each a real scheduler starting real fake
  runner processes, tests/fake_runner.py) behind residency's request router.

Per request the replica that served it says whether it held the model on arrival and what it
holds now; a request is "warm" when, by those reports, some replica held its model when it was
sent. holder_hit_rate is the share of warm requests served by a holder. cold_loads_ratio is
residency's loads over stock's. serve_hop_added_p50_ms is the median time of a warm request
through the Serve handle minus the same request to a residency scheduler in this process.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAKE_RUNNER = ROOT / "tests" / "fake_runner.py"
MIB = 1 << 20
#: Two large models and six small ones: 840 MiB, which two 600 MiB replicas hold together, but
#: only if the two large ones are apart, and more models than stock's 3 per replica x 2 hold.
SIZES = {"m0": 300 * MIB, "m1": 300 * MIB} | {f"s{i}": 40 * MIB for i in range(6)}
BUDGET = 600 * MIB
#: Stock's models per replica, by count: 3 lets both large ones share a replica (over-commit);
#: 2, the count that can never over-commit (budget // largest), holds fewer models still.
PER_REPLICA = 3
SAFE_PER_REPLICA = 2
LOAD_S = 0.2  # each load, both systems (the fake runner's --load-s; stock's loader sleeps it)
CONCURRENCY = 4
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def trace(n: int, seed: int) -> list[str]:
    """A Zipf-like mix that drifts: the popular model changes every n/4 requests."""
    rng = random.Random(seed)
    names = list(SIZES)
    out = []
    for i in range(n):
        phase = (i * 4) // max(1, n)
        order = names[phase:] + names[:phase]
        weights = [1 / (k + 1) ** 1.2 for k in range(len(order))]
        out.append(rng.choices(order, weights)[0])
    return out


def config_file(tmp: Path) -> Path:
    # residency's limit is the byte budget: its per-device model cap is set out of the way.
    lines = ["discover = false", "host_cache_bytes = 0", 'keep_alive = "10m"',
             f"max_loaded_models = {len(SIZES)}"]  # fmt: skip
    for name, size in SIZES.items():
        cmd = [sys.executable, str(FAKE_RUNNER), "--port", "{port}", "--name", "{name}",
               "--bytes", str(size), "--load-s", str(LOAD_S)]  # fmt: skip
        lines += ["[[models]]", f'name = "{name}"', f'path = "{FAKE_RUNNER}"', 'runner = "command"',
                  f"memory = {size}", "ctx = 512", f"command = {json.dumps(cmd)}"]  # fmt: skip
    path = tmp / "residency.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def stock_app(per_replica: int) -> Any:
    from ray import serve

    @serve.deployment(num_replicas=2, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    class Stock:
        def __init__(self) -> None:
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.loaded: dict[str, tuple[int, int]] = {}  # model → (bytes, token)
            self.loads = self.overcommits = 0

        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def get_model(self, model: str) -> Any:
            await asyncio.sleep(LOAD_S)
            self.loads += 1
            handle = _Loaded(self.loaded, model)
            self.loaded[model] = (SIZES[model], id(handle))
            if sum(b for b, _ in self.loaded.values()) > BUDGET:
                self.overcommits += 1
            return handle

        async def __call__(self, _body: Any) -> dict[str, Any]:
            model = serve.get_multiplexed_model_id()
            held = model in self.loaded
            await self.get_model(model)
            return {"replica": self.replica, "held": held, "resident": list(self.loaded),
                    "loads": self.loads, "overcommits": self.overcommits}  # fmt: skip

    return Stock.bind()


class _Loaded:
    """A stock model; Serve calls __del__ when its LRU evicts it."""

    def __init__(self, loaded: dict[str, tuple[int, int]], model: str) -> None:
        self._loaded, self._model = loaded, model

    def __del__(self) -> None:
        if self._loaded.get(self._model, (0, 0))[1] == id(self):
            del self._loaded[self._model]


async def replay(models: list[str], call: Any) -> dict[str, Any]:
    """Sends the trace CONCURRENCY at a time; `call(model)` returns the replica's report."""
    holding: dict[str, set[str]] = {}
    warm = hits = 0
    over = 0
    reports: list[dict[str, Any]] = []
    queue = list(enumerate(models))

    async def worker() -> None:
        nonlocal warm, hits, over
        while queue:
            _, model = queue.pop(0)
            eligible = any(model in held for held in holding.values())
            r = await call(model)
            reports.append(r)
            holding[r["replica"]] = set(r["resident"])
            if sum(SIZES[m] for m in r["resident"]) > BUDGET:
                over += 1
            if eligible:
                warm += 1
                hits += bool(r["held"])

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return {"warm": warm, "hits": hits, "hit_rate": hits / warm if warm else 1.0,
            "overcommitted_answers": over, "reports": reports}  # fmt: skip


async def run_stock(models: list[str], per_replica: int) -> dict[str, Any]:
    from ray import serve

    serve.run(stock_app(per_replica), name="stock", route_prefix=None)
    handle = serve.get_deployment_handle("Stock", "stock")

    async def call(model: str) -> dict[str, Any]:
        r: dict[str, Any] = await handle.options(multiplexed_model_id=model).remote(BODY)
        return r

    out = await replay(models, call)
    last: dict[str, dict[str, Any]] = {}
    for r in out.pop("reports"):
        last[r["replica"]] = r
    out["loads"] = sum(r["loads"] for r in last.values())
    out["overcommits"] = sum(r["overcommits"] for r in last.values())
    serve.delete("stock")
    return out


async def run_residency(models: list[str], config: Path, hop_samples: int) -> dict[str, Any]:
    from ray import serve

    from residency.ray.app import build

    app = build(str(config), overrides={"memory_limit": BUDGET}, replicas=2, replica_cpus=0)
    serve.run(app, name="residency", route_prefix=None)
    handle = serve.get_deployment_handle("ModelServer", "residency")
    await handle.ping.remote()
    await _until(lambda: len(_stats(handle)) == 2, 60)

    async def call(model: str) -> dict[str, Any]:
        _, info = await handle.options(multiplexed_model_id=model).complete.remote(
            "/v1/chat/completions", BODY
        )
        return {**info, "held": not info["cold"]}

    out = await replay(models, call)
    out.pop("reports")
    await asyncio.sleep(1.5)  # the replicas' next stats carry their load counts
    stats = _stats(handle)
    out["loads"] = sum(int(s.get("loads", 0)) for s in stats.values())
    out["overcommits"] = sum(
        1 for s in stats.values() for d in s["devices"] if d["reserved"] > d["budget"]
    )
    warm_model = models[-1]
    times = []
    for _ in range(hop_samples):
        t0 = time.perf_counter()
        await handle.options(multiplexed_model_id=warm_model).complete.remote(
            "/v1/chat/completions", BODY
        )
        times.append(time.perf_counter() - t0)
    out["via_serve_p50_ms"] = statistics.median(times) * 1e3
    serve.delete("residency")
    return out


def _stats(handle: Any) -> dict[str, dict[str, Any]]:
    router = handle._router._asyncio_router._request_router
    return {s["replica"]: s for _, s in router.view() if s}


async def _until(check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("replicas did not report their stats")
        await asyncio.sleep(0.1)


async def alone_p50_ms(config: Path, model: str, samples: int) -> float:
    """The same warm request to a residency scheduler in this process (no Serve hop)."""
    from residency.config import load_settings
    from residency.scheduler import Scheduler

    async with Scheduler(load_settings(config, memory_limit=BUDGET)) as scheduler:
        async with scheduler.session(model) as lease:
            await lease.api.complete("/v1/chat/completions", BODY)
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            async with scheduler.session(model) as lease:
                await lease.api.complete("/v1/chat/completions", BODY)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    models = trace(args.requests, args.seed)
    hop_samples = 30 if args.quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        config = config_file(Path(tmp))
        # address="local": always a private instance, never a cluster already running here.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            stock = await run_stock(models, PER_REPLICA)
            safe = await run_stock(models, SAFE_PER_REPLICA)
            res = await run_residency(models, config, hop_samples)
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        alone = await alone_p50_ms(config, models[-1], hop_samples)
    result = {
        "holder_hit_rate": round(res["hit_rate"], 4),
        "cold_loads_ratio": round(res["loads"] / max(1, stock["loads"]), 3),
        "oom_or_overcommit": res["overcommits"] + res["overcommitted_answers"],
        "serve_hop_added_p50_ms": round(res["via_serve_p50_ms"] - alone, 3),
        "stock": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stock.items()},
        "stock_safe_count": {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in safe.items()
        },
        "residency": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()},
        "residency_alone_p50_ms": round(alone, 3),
        "requests": len(models),
        "models": len(SIZES),
        "replicas": 2,
    }
    result["targets_met"] = (
        result["holder_hit_rate"] >= 0.99
        and result["cold_loads_ratio"] <= 0.8
        and result["oom_or_overcommit"] == 0
        and stock["overcommits"] + stock["overcommitted_answers"] > 0
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (CI: it still runs)")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.requests is None:
        args.requests = 80 if args.quick else 400
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
