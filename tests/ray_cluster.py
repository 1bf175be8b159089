"""A two-node Ray cluster on one machine, running residency's Serve application, for the tests.

Two raylets (``ray.cluster_utils.Cluster``) with distinct custom resources: ``node_a`` and
``node_b`` each carry one ``residency_replica``, so the model-server deployment's two replicas
land one per node, and ``node_settings`` gives each node its own memory budget.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from residency.runners import free_port

APP = "residency"


@dataclass
class RayServe:
    url: str
    handle: Any  # the model-server deployment's handle, from this (driver) process
    config: Path
    node_settings: Mapping[str, Mapping[str, Any]]

    def deploy(self, node_settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """(Re)deploys the application; new node settings roll the model-server replicas."""
        from ray import serve

        from residency.ray.app import build

        if node_settings is not None:
            self.node_settings = node_settings
        app = build(
            str(self.config),
            node_settings=self.node_settings,
            replicas=2,
            replica_resources={"residency_replica": 1},
            replica_cpus=0.5,
        )
        serve.run(app, name=APP, route_prefix="/")

    def ps(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = httpx.get(self.url + "/api/ps", timeout=30).json()["models"]
        return models

    def holders(self, model: str) -> set[str]:
        """Replica ids (from /api/ps's device column, device@replica/node) holding `model`."""
        return {
            m["device"].split("@", 1)[1].split("/", 1)[0]
            for m in self.ps()
            if m["name"] in (model, f"{model}:latest")
        }


def replica_stats(handle: Any) -> dict[str, dict[str, Any]]:
    """Each replica's last routing stats, by replica id, as the driver's router sees them."""
    router = handle._router._asyncio_router._request_router
    return {s["replica"]: s for _, s in router.view() if s}


def wait_for(check: Callable[[], object], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def two_node_serve(
    config: Path, node_settings: Mapping[str, Mapping[str, Any]], *, head_cpus: int = 3
) -> Iterator[RayServe]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "resources": {"node_a": 1, "residency_replica": 1},
            "include_dashboard": False,
        },
    )
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1, "residency_replica": 1})
        ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        served = RayServe(f"http://127.0.0.1:{port}", None, config, node_settings)
        served.deploy()
        served.handle = serve.get_deployment_handle("ModelServer", APP)
        served.handle.ping.remote().result(timeout_s=60)
        wait_for(lambda: len(replica_stats(served.handle)) == 2, 60, "both replicas' stats")
        yield served
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
