"""What every route needs, stored once on ``app.state`` by the lifespan (no module-level state)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel
from starlette.responses import Response

from residency.api._types import SchedulerLike
from residency.api.metrics import RequestRecord
from residency.config import Settings
from residency.metrics import ResidencyMetrics

__all__ = [
    "DIRECT_ENDPOINTS",
    "ApiState",
    "DirectEndpoint",
    "State",
    "api_state",
    "body_schema",
    "direct",
]

DirectEndpoint = Callable[[Request], Awaitable[Response]]

#: Endpoints served without FastAPI's router and middleware (see ``app.ResidencyApp``).
DIRECT_ENDPOINTS: set[DirectEndpoint] = set()


def direct(endpoint: DirectEndpoint) -> DirectEndpoint:
    """Marks a route's endpoint as one the app may call directly: it takes only the Request,
    parses its own body and uses no dependencies, so FastAPI's per-request machinery does nothing
    for it but cost time. Put it under the route decorator."""
    DIRECT_ENDPOINTS.add(endpoint)
    return endpoint


@dataclass
class ApiState:
    settings: Settings
    scheduler: SchedulerLike
    #: The scheduler's metrics: requests are counted beside its loads, evictions and crashes.
    metrics: ResidencyMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = self.scheduler.metrics
        if self.metrics.source is None:
            self.metrics.source = self.scheduler

    def record(self, api: str, endpoint: str) -> RequestRecord:
        return RequestRecord(self.metrics, api, endpoint)


def api_state(request: Request) -> ApiState:
    """The state, read directly: the generation routes skip dependency injection (it costs more
    than the rest of their own work on a slow core)."""
    state: ApiState = request.app.state.residency
    return state


async def _state(request: Request) -> ApiState:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a handoff per request.
    return api_state(request)


State = Annotated[ApiState, Depends(_state)]


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route that parses its body itself (any Content-Type).

    The component itself is added by ``app.openapi`` (see app.py), so the schema FastAPI publishes
    documents the same model the route validates with.
    """
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        },
    }
