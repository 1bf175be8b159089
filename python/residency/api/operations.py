"""Operations endpoints: ``/health`` (the watchdog's verdict) and ``POST /api/residency/reload``.

Reload is a server-wide act, so it is allowed to fewer callers than generation: with API keys
configured, only a key without a model allow-list; without keys, only a client on loopback (the
default bind; a server exposed without keys should not be reconfigurable by anyone who reaches
it). SIGHUP does the same from the machine itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from residency.api.errors import ApiError
from residency.api.proxy import json_response
from residency.api.security import SCOPE_KEY, ApiKey, load_keys
from residency.api.state import State
from residency.config import Settings
from residency.errors import ConfigError
from residency.scheduler.reload import Reloader, on_sighup
from residency.scheduler.watchdog import Health

__all__ = ["reloading", "router"]

log = logging.getLogger("residency.server")

router = APIRouter(tags=["residency"])


@contextlib.asynccontextmanager
async def reloading(
    app: Any, settings: Settings, load: Callable[[], Settings] | None, scheduler: Any
) -> AsyncIterator[None]:
    """While the server runs: reloads on SIGHUP and POST /api/residency/reload (when `load` can
    re-read the configuration and the scheduler can replace its models)."""
    if load is None or not hasattr(scheduler, "replace_models"):
        yield
        return

    def check_keys(new: Settings) -> Callable[[], None]:
        keys = load_keys(new)  # a bad key file refuses the whole reload

        def apply() -> None:
            if app.guard is not None:
                app.guard.keys = keys

        return apply

    app.state.reloader = reloader = Reloader(settings, load, scheduler, check_keys)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup(reloader.reload))
        hooked = True
    except (
        RuntimeError,
        ValueError,
        NotImplementedError,
    ):  # not the main thread (tests, embedding)
        hooked = False
    try:
        yield
    finally:
        if hooked:
            loop.remove_signal_handler(signal.SIGHUP)
        app.state.reloader = None


@router.get("/health")
async def health(state: State) -> Response:
    """200 when the watchdog sees nothing wrong; 503 with each failing check's reason."""
    watchdog = getattr(state.scheduler, "watchdog", None)
    verdict: Health = watchdog.health() if watchdog is not None else Health(True)
    body = {**verdict.as_json(), "models_loaded": len(state.scheduler.resident())}
    return json_response(body, 200 if verdict.ok else 503)


@router.post("/api/residency/reload")
async def reload(request: Request) -> Response:
    """Re-reads the configuration; only models whose configuration changed restart."""
    reloader: Reloader | None = getattr(request.app.state, "reloader", None)
    if reloader is None:
        raise ApiError(404, "reload is not available: this server has no configuration to re-read")
    key: ApiKey | None = request.scope.get(SCOPE_KEY)
    if key is not None and key.models is not None:
        raise ApiError(403, f"API key {key.name!r} is limited to some models and may not reload")
    if key is None and not _loopback(request):
        raise ApiError(403, "without API keys, reload is allowed only from this machine")
    try:
        report = await reloader.reload("POST /api/residency/reload")
    except ConfigError as err:
        raise ApiError(
            422, f"the new configuration is invalid; the one in use is unchanged: {err}"
        ) from None
    return json_response(report.as_json())


def _loopback(request: Request) -> bool:
    client = request.client
    if client is None:
        return False
    try:
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False
