"""The HTTP facade: Ollama's API (/api/*), OpenAI's (/v1/*) and /metrics over the scheduler."""

from __future__ import annotations

from residency.api.app import create_app

__all__ = ["create_app"]
