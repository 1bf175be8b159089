"""Property-based fuzzing of both APIs from their published OpenAPI schema (schemathesis): for any
request the schema's operations can be sent — valid bodies and bodies that break the schema —
the server answers, and never with a 5xx. Served by uvicorn with residency's protocol on a
loopback port, over the fake scheduler (fast: no model is loaded)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.generation import GenerationMode

from api_fakes import FakeRunner, FakeScheduler
from residency.api import create_app
from residency.api.protocol import protocol_with
from residency.config import Settings

pytestmark = pytest.mark.timeout(300)

#: Examples per operation and generation mode: ~20 operations, the whole file in ~1 minute.
EXAMPLES = 60


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    settings_ = Settings()
    app = create_app(settings_, scheduler=FakeScheduler(FakeRunner()))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        log_level="warning",
        lifespan="on",
        http=protocol_with(settings_.header_timeout_s),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "server did not start"
        assert time.monotonic() < deadline, "server did not start in time"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples in every run: CI failures reproduce
)
def test_no_client_input_gets_a_5xx(case: Any, base_url: str) -> None:
    with requests.Session() as session:
        response = case.call(base_url=base_url, session=session, timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\n"
        f"body: {str(case.body)[:500]}"
    )
