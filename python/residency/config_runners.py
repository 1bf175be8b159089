"""Settings for which runner serves a model, where llama-server is, and KV persistence (read by
``residency.runners``); ``config.Settings`` inherits them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

__all__ = ["RunnerKind", "RunnerSettings"]

RunnerKind = Literal["auto", "llama-server", "llama-cpp-python", "command"]


class RunnerSettings(BaseSettings):
    """The runner of models that say "auto", the llama-server binary and its build, KV files."""

    #: The runner of models that say "auto": "auto" = llama-server when one is configured, on
    #: PATH or built (`residency build-runner`), else llama-cpp-python.
    runner: RunnerKind = "auto"
    #: The llama.cpp `llama-server` binary; None = PATH, then residency's own build.
    llama_server: str | None = None
    #: `residency serve` builds llama-server in the background when "auto" finds none.
    build_runner: bool = True
    #: Save llama-server slots (the KV cache of a conversation) before a runner stops, and
    #: restore them when a later request continues that conversation.
    kv_persist: bool = True
    #: Where saved slots live; None = <cache>/kv.
    kv_dir: Path | None = None
    #: Bytes of saved slots kept; beyond it the least recently used are removed.
    kv_budget: int = Field(default=4 << 30, ge=0)
    #: The longest a stopping runner waits for its saves (eviction, expiry, unload).
    kv_save_timeout_s: float = Field(default=5.0, ge=0)
