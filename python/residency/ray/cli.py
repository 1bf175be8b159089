"""``residency serve --ray [ADDRESS]``: the Serve application on a Ray cluster, from the CLI.

Connects to the cluster at ADDRESS (``ray://…`` or ``host:port``; without one, ``$RAY_ADDRESS``
or else a new local cluster), starts Serve's HTTP proxy on residency's host and port, deploys
one model-server replica per node (or ``--replicas``) and the ingress, and serves until SIGINT
or SIGTERM, then deletes the application (and stops the cluster if it started it).
"""

from __future__ import annotations

import logging
import signal
import threading

from residency.config import Settings

__all__ = ["serve_on_ray"]

log = logging.getLogger("residency.ray")
APP = "residency"


def serve_on_ray(
    settings: Settings, config: str | None, address: str | None, replicas: int | None
) -> int:
    import ray
    from ray import serve

    from residency.ray.app import build

    started_here = address is None and not ray.is_initialized()
    # SIGTERM stops it as SIGINT does, also while the application is still deploying.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
        nodes = len(alive)
        count = replicas or max(1, nodes)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        app = build(config, replicas=count, max_replicas_per_node=1 if count <= nodes else None)
        serve.run(app, name=APP, route_prefix="/")
        log.info(
            "residency on Ray: %d model-server replica(s) on %d node(s), serving on http://%s:%d",
            count, nodes, settings.host, settings.port,
        )  # fmt: skip
        threading.Event().wait()  # until SIGINT or SIGTERM
    except KeyboardInterrupt:
        log.info("residency on Ray: stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started_here:
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
        else:
            serve.delete(APP)
    return 0
