"""The FastAPI app: both routers, /metrics, error shapes, and a lifespan owning the scheduler.

``create_app(settings)`` builds everything and starts nothing; the lifespan starts the scheduler
when the server starts and stops it (every runner process group included) when the server stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.responses import PlainTextResponse, Response

from residency import __version__
from residency.api import ollama, openai
from residency.api._types import SchedulerLike
from residency.api.errors import install_exception_handlers
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
from residency.api.state import ApiState, State
from residency.config import Settings

__all__ = ["create_app"]

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


def create_app(
    settings: Settings,
    *,
    scheduler: SchedulerLike | None = None,
    scheduler_factory: Callable[[Settings], SchedulerLike] | None = None,
) -> FastAPI:
    """The residency server for `settings`.

    `scheduler` (already built) or `scheduler_factory` replace the real Scheduler — for tests and
    embedding; either way the lifespan starts it and stops it.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if scheduler is not None:
            sched = scheduler
        elif scheduler_factory is not None:
            sched = scheduler_factory(settings)
        else:
            from residency.scheduler import Scheduler

            sched = Scheduler(settings)
        app.state.residency = ApiState(settings=settings, scheduler=sched)
        await sched.start()
        try:
            yield
        finally:
            await sched.stop()

    app = FastAPI(
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

    @app.get("/metrics", tags=["residency"], response_class=PlainTextResponse)
    async def metrics(state: State) -> Response:
        """Prometheus text format: requests, loads, queueing, resident models and their bytes."""
        text = state.metrics.render(state.scheduler.resident(), len(state.scheduler.models()))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

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
