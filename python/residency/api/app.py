"""The FastAPI app: both routers, /metrics, error shapes, and a lifespan owning the scheduler.

``create_app(settings)`` builds everything and starts nothing; the lifespan starts the scheduler
when the server starts and stops it (every runner process group included) when the server stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from residency import __version__
from residency.api import ollama, openai, operations
from residency.api._types import SchedulerLike
from residency.api.errors import error_for, install_exception_handlers
from residency.api.operations import reloading
from residency.api.schemas import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    OpenAIChatRequest,
    OpenAICompletionRequest,
    OpenAIEmbeddingRequest,
    ShowRequest,
)
from residency.api.security import Guard, load_keys, warn_if_exposed, with_cors
from residency.api.state import DIRECT_ENDPOINTS, ApiState, DirectEndpoint, State
from residency.config import Settings
from residency.metrics import CONTENT_TYPE

__all__ = ["ResidencyApp", "create_app"]

#: The bodies routes parse themselves; published as components of the OpenAPI schema.
BODY_MODELS = (
    GenerateRequest,
    ChatRequest,
    EmbedRequest,
    EmbeddingsRequest,
    ShowRequest,
    OpenAIChatRequest,
    OpenAICompletionRequest,
    OpenAIEmbeddingRequest,
)


class ResidencyApp(FastAPI):
    """FastAPI, with the generation endpoints called directly.

    Every generation request pays for FastAPI's middleware stack, router scan and request handler
    (about 0.3 ms on the 2-core CI machine, a third of the facade's budget) though those endpoints
    take only the Request, parse their own bodies and use no dependencies. Requests for them skip
    all that: the endpoint is called, its errors go through the same handler FastAPI would use.
    Every other path, the lifespan and the OpenAPI schema are FastAPI's, unchanged.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._direct: dict[tuple[str, str], DirectEndpoint] = {}
        #: Keys, origins and Host checks (security.Guard); set by the lifespan.
        self.guard: Guard | None = None

    def include_router(self, router: APIRouter, *args: Any, **kwargs: Any) -> None:
        """FastAPI's, noting the routes whose endpoints are marked with ``state.direct``."""
        super().include_router(router, *args, **kwargs)
        prefix = kwargs.get("prefix") or ""
        for route in router.routes:
            if isinstance(route, APIRoute) and route.endpoint in DIRECT_ENDPOINTS:
                for method in route.methods or ():
                    self._direct[(method, prefix + route.path)] = route.endpoint

    @property
    def direct_routes(self) -> set[tuple[str, str]]:
        """(method, path) of every request served without FastAPI's routing."""
        return set(self._direct)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.guard is not None:
            if not await self.guard(scope, receive, send):
                return
            send = with_cors(scope, send)
        endpoint = (
            self._direct.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # as Starlette sets it: request.app is how endpoints find the state
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            response = await error_for(request, exc)
        await response(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    scheduler: SchedulerLike | None = None,
    scheduler_factory: Callable[[Settings], SchedulerLike] | None = None,
    reload_settings: Callable[[], Settings] | None = None,
) -> FastAPI:
    """The residency server for `settings`.

    `scheduler` (already built) or `scheduler_factory` replace the real Scheduler — for tests and
    embedding; either way the lifespan starts it and stops it. `reload_settings` re-reads the
    configuration: SIGHUP and POST /api/residency/reload apply what it returns.
    """

    keys = load_keys(settings)  # a bad key file fails here, before the port is bound

    @asynccontextmanager
    async def lifespan(app: ResidencyApp) -> AsyncIterator[None]:
        if scheduler is not None:
            sched = scheduler
        elif scheduler_factory is not None:
            sched = scheduler_factory(settings)
        else:
            from residency.scheduler import Scheduler

            sched = Scheduler(settings)
        app.state.residency = ApiState(settings=settings, scheduler=sched)
        app.guard = Guard(settings, keys, sched.metrics)
        warn_if_exposed(settings, keys)
        await sched.start()
        try:
            async with reloading(app, settings, reload_settings, sched):
                yield
        finally:
            await sched.stop()

    app: ResidencyApp = ResidencyApp(
        title="residency",
        version=__version__,
        summary="Ollama- and OpenAI-compatible server that keeps the right models resident.",
        lifespan=lifespan,
        # Routes build their own bytes: skip FastAPI's response validation and encoding pass.
        default_response_class=Response,
    )
    install_exception_handlers(app)
    app.include_router(ollama.router)
    app.include_router(openai.router)
    app.include_router(operations.router)

    @app.get("/metrics", tags=["residency"], response_class=PlainTextResponse)
    async def metrics(state: State) -> Response:
        """Prometheus text format: requests, loads, evictions, crashes, devices and models."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            _, defs = models_json_schema(
                [(m, "validation") for m in BODY_MODELS],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
