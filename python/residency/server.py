"""``residency serve``: the HTTP facade under uvicorn.

Settings come from ``--config`` (or ``$RESIDENCY_CONFIG``), the environment (``RESIDENCY_*`` and
Ollama's ``OLLAMA_*`` names, ``OLLAMA_HOST`` included) and the flags, in rising priority. SIGINT or
SIGTERM stop accepting connections, let requests in flight finish (up to a deadline), then the
lifespan stops the scheduler, which stops every runner process group.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_arguments", "run", "serve"]

log = logging.getLogger("residency.server")

#: Seconds that requests in flight get to finish after SIGTERM before their connections close.
GRACEFUL_SHUTDOWN_S = 10
#: Seconds an idle client connection stays open. uvicorn's 5 s default races clients that reuse
#: a connection after a pause (a reset instead of an answer); Ollama never closes idle ones.
#: A minute and a bit: longer than the 60 s that reverse proxies usually keep theirs idle.
IDLE_CONNECTION_S = 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        help="address to listen on, optionally host:port (default 127.0.0.1, or $OLLAMA_HOST)",
    )
    parser.add_argument("--port", type=int, help="port to listen on (default 11434)")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (default $RESIDENCY_CONFIG)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log verbosity (default info: one line per request)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help='serve on a Ray cluster (pip install "residency[ray]"): connect to ADDRESS, or '
        "$RAY_ADDRESS, or start a local one; one model-server replica per node",
    )
    parser.add_argument(
        "--replicas", type=int, help="with --ray: model-server replicas (default: one per node)"
    )


def run(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand's handler."""
    from residency.config import load_settings
    from residency.errors import ConfigError, ResidencyError

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    _configure_logging(args.log_level)
    try:
        settings = load_settings(args.config, **overrides)
        if args.ray is not None:
            from residency.ray.cli import serve_on_ray

            return serve_on_ray(settings, args.config, args.ray or None, args.replicas)
        if args.replicas is not None:
            raise ConfigError("--replicas needs --ray")
        return serve(
            settings,
            log_level=args.log_level,
            reload_settings=lambda: load_settings(args.config, **overrides),
        )
    except ResidencyError as err:
        print(f"residency: error: {err}", file=sys.stderr)
        return 2


def serve(
    settings: Any, *, log_level: str = "info", reload_settings: Callable[[], Any] | None = None
) -> int:
    """Serves until SIGINT/SIGTERM (SIGHUP: re-reads the configuration with `reload_settings`);
    returns the process exit status."""
    import uvicorn

    from residency.api import create_app
    from residency.api.protocol import protocol_with
    from residency.runners.choice import start_build_if_missing
    from residency.scheduler import Scheduler

    # Built here, not in the lifespan: a bad model file fails with a clear message before
    # uvicorn binds the port. Constructing it starts nothing.
    scheduler = Scheduler(settings)
    app = create_app(settings, scheduler=scheduler, reload_settings=reload_settings)
    # runner "auto" and no llama-server yet: build it meanwhile (runners.build).
    start_build_if_missing(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging setup: one format for residency and uvicorn
        log_level=log_level,
        access_log=False,  # residency.access logs one richer line per request
        lifespan="on",
        # httptools, each response's head and body in one write; slow headers cut off
        http=protocol_with(settings.header_timeout_s),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=IDLE_CONNECTION_S,
        server_header=False,
        # X-Forwarded-* would only change the client address in the ASGI scope, which nothing
        # here reads: skip the middleware that rewrites it on every request.
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    # Everything built so far (FastAPI, pydantic schemas, numpy, the registry: ~66k objects) lives
    # as long as the process. Left to the collector, every full collection walks it again: 15-40 ms
    # stalls on the CI machine, landing on whichever request is running. Freeze it once instead.
    gc.collect()
    gc.freeze()
    log.info(
        "residency serving %d model(s) on http://%s:%d",
        len(scheduler.models()),
        settings.host,
        settings.port,
    )
    server.run()
    # uvicorn leaves started False when binding or the lifespan's start failed.
    return 0 if server.started else 1


def _configure_logging(level: str) -> None:
    # The format names none of these; not gathering them makes each record cheaper (the access
    # line is one per request). See "Optimization" in the logging HOWTO.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
