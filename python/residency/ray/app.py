"""The Serve application: residency's FastAPI app as the ingress, model-server replicas behind it.

    serve run residency.ray.app:app_builder config=/etc/residency.toml replicas=2
    serve deploy serve-residency.yaml          # import_path: residency.ray.app:app_builder

or from Python, ``serve.run(build(...), route_prefix="/")``. Both APIs (Ollama's and OpenAI's)
are the single-node server's code; its scheduler is a :class:`~residency.ray.remote.RayScheduler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from residency.config import load_settings
from residency.ray.model_server import ModelServer
from residency.ray.remote import RayScheduler
from residency.ray.router import ResidencyRouter

__all__ = ["Ingress", "app_builder", "build"]

#: How often each replica reports its state to the routers (seconds). Routing between reports
#: uses the router's own record of where it just sent each model (see router.py).
STATS_PERIOD_S = 0.5
#: Requests one replica accepts at once: its own scheduler queues them (bounded by max_queue),
#: so Serve's per-replica cap only has to be above what the runners serve in parallel.
MAX_ONGOING = 256
DEPLOYMENT = "ModelServer"
#: Seconds a stopping replica gives its requests in flight before its runners are stopped.
GRACEFUL_SHUTDOWN_S = 30.0


@serve.ingress()
class Ingress:
    """The HTTP ingress: residency's app, forwarding each runner call to the model servers."""

    def __init__(
        self,
        model_server: DeploymentHandle[Any],
        config: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = load_settings(config, **(overrides or {}))
        self.scheduler = RayScheduler(self.settings, model_server, deployment=DEPLOYMENT)

    def __serve_build_asgi_app__(self) -> Any:
        from residency.api import create_app

        return create_app(self.settings, scheduler=self.scheduler)


def build(
    config: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    node_settings: Mapping[str, Mapping[str, Any]] | None = None,
    replicas: int = 1,
    replica_resources: Mapping[str, float] | None = None,
    replica_cpus: float = 1.0,
    max_replicas_per_node: int | None = None,
    router: type | str = ResidencyRouter,
    stats_period_s: float = STATS_PERIOD_S,
) -> Any:
    """The Serve application (``serve.run(build(...), route_prefix="/")``).

    `config`: the TOML file every replica and the ingress read; `overrides`: settings over it
    everywhere; `node_settings`: settings per custom node resource (model_server.node_overrides);
    `replica_resources`: custom resources each model-server replica needs (one per node, say);
    `max_replicas_per_node`: 1 spreads the replicas one per node (each node's devices are its own).
    """
    router_config: dict[str, Any] = {
        "request_router_class": router,
        "request_routing_stats_period_s": stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 10 * stats_period_s),
    }
    placement: dict[str, Any] = {}
    if max_replicas_per_node is not None:
        placement["max_replicas_per_node"] = max_replicas_per_node
    # Any: Serve's stubs type neither the decorator's result nor the config's fields.
    server: Any = serve.deployment(
        ModelServer,
        name=DEPLOYMENT,
        num_replicas=replicas,
        max_ongoing_requests=MAX_ONGOING,
        # A replica stopping (scale-down, a config change) lets its requests finish first.
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        ray_actor_options={"num_cpus": replica_cpus, "resources": dict(replica_resources or {})},
        request_router_config=RequestRouterConfig(**router_config),
        **placement,
    )
    ingress: Any = serve.deployment(
        Ingress, name="ResidencyIngress", ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(
        server.bind(config, dict(overrides or {}), dict(node_settings or {})),
        config,
        dict(overrides or {}),
    )


def app_builder(args: Mapping[str, Any]) -> Any:
    """``serve run``/``serve deploy``'s builder: ``config``, ``replicas``, ``node_settings``,
    ``replica_resources`` and ``overrides`` from the Serve config file's ``args``."""
    known = {
        "config",
        "replicas",
        "node_settings",
        "replica_resources",
        "overrides",
        "replica_cpus",
        "max_replicas_per_node",
    }
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown residency args {sorted(unknown)}; known: {sorted(known)}")
    return build(
        args.get("config"),
        overrides=args.get("overrides"),
        node_settings=args.get("node_settings"),
        replicas=int(args.get("replicas", 1)),
        replica_resources=args.get("replica_resources"),
        replica_cpus=float(args.get("replica_cpus", 1.0)),
        max_replicas_per_node=args.get("max_replicas_per_node"),
    )
