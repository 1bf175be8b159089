"""What the runner kinds take from the settings rather than from a LaunchSpec: the runner that
"auto" means, where llama-server is, and KV persistence.

The settings set these once they are valid (``Settings`` calls :func:`configure`), so a model made
outside the config file (the embedded model, a ``models_dir`` file) is served the same way as one
listed in it. The scheduler builds LaunchSpecs without knowing about them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from residency.runners.build import find_llama_server

__all__ = [
    "KvPersistence",
    "RunnerDefaults",
    "configure",
    "current",
    "resolve_auto",
    "start_build_if_missing",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvPersistence:
    """Saving llama-server slots before a runner stops, restoring them into its successor."""

    enabled: bool = True
    #: Where slot files live; None: ``<cache>/kv``.
    directory: Path | None = None
    #: Files beyond this many bytes are removed, least recently used first.
    budget_bytes: int = 4 << 30
    #: The longest a stop waits for saves; what is unsaved by then is skipped (see README).
    save_timeout_s: float = 5.0
    #: Models (by name) whose slots are never saved.
    disabled_models: frozenset[str] = frozenset()

    def enabled_for(self, model: str) -> bool:
        return self.enabled and model not in self.disabled_models

    def path(self) -> Path:
        if self.directory is not None:
            return self.directory
        from residency.embedded import cache_dir

        return cache_dir() / "kv"


@dataclass(frozen=True)
class RunnerDefaults:
    #: The kind "auto" models get: "auto" resolves per load, a kind name forces it.
    runner: str = "auto"
    #: A configured llama-server binary; None: PATH, then residency's own build.
    llama_server: str | None = None
    #: `residency serve` builds llama-server in the background when "auto" finds none.
    build_runner: bool = True
    kv: KvPersistence = field(default_factory=KvPersistence)


class _State:
    #: The last valid settings' defaults (one process serves one Settings).
    defaults = RunnerDefaults()
    fallback_logged = False


def configure(defaults: RunnerDefaults) -> None:
    _State.defaults = defaults


def current() -> RunnerDefaults:
    return _State.defaults


def start_build_if_missing() -> bool:
    """For `residency serve`: builds llama-server in the background when "auto" would find none
    (and `build_runner` is on). Returns whether a build started."""
    d = _State.defaults
    if d.runner != "auto" or not d.build_runner or find_llama_server(d.llama_server) is not None:
        return False
    from residency.runners.build import build_in_background

    return build_in_background() is not None


def resolve_auto() -> str:
    """The kind "auto" means now: llama-server when one is found (configured, PATH, built),
    else llama-cpp-python, said once in the log with how to get llama-server."""
    d = _State.defaults
    if d.runner != "auto":
        return d.runner
    if find_llama_server(d.llama_server) is not None:
        return "llama-server"
    if not _State.fallback_logged:
        _State.fallback_logged = True
        log.warning(
            "no llama-server found (not configured, not on PATH, not built): serving with "
            "llama-cpp-python. Build llama-server with `residency build-runner` "
            "(or scripts/build-llama-server.sh) to get parallel slots and KV persistence."
        )
    return "llama-cpp-python"
