from __future__ import annotations

import os

import pytest

# The suite must not serve whatever models this machine's Ollama store or Hugging Face cache hold;
# tests of discovery turn it on with their own stores (tests/test_discovery.py).
os.environ.setdefault("RESIDENCY_DISCOVER", "0")
# A `residency serve` a test starts never builds llama-server in the background: CI builds it
# first (scripts/build-llama-server.sh), and a test must not start a 20-minute compile.
os.environ.setdefault("RESIDENCY_BUILD_RUNNER", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="run the long variants marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long variant: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
