"""From the settings to one launch: the runner kind "auto" means, and the KV persistence a model's
llama-server runner gets (its LaunchSpec's ``kv``).

Plain functions of the settings, called where a launch is planned (the scheduler's sizing and
executor): nothing here is kept between calls, so two Settings in one process never mix.
"""

from __future__ import annotations

import logging
from pathlib import Path

from residency.config_model import ModelConfig
from residency.config_runners import RunnerSettings
from residency.runners.build import find_llama_server
from residency.runners.kvfiles import KvPersistence

__all__ = ["kv_persistence", "resolve_kind", "start_build_if_missing"]

log = logging.getLogger(__name__)


def resolve_kind(configured: str, settings: RunnerSettings) -> str:
    """A model's runner kind with "auto" resolved: the settings' `runner`; when that says "auto"
    too, llama-server if one is found (configured, PATH, built), else llama-cpp-python."""
    kind = settings.runner if configured == "auto" else configured
    if kind != "auto":
        return kind
    return "llama-server" if find_llama_server(settings.llama_server) else "llama-cpp-python"


def kv_persistence(settings: RunnerSettings, model: ModelConfig) -> KvPersistence | None:
    """The KV persistence of `model`'s llama-server runners; None when off (globally or for it)."""
    if not (settings.kv_persist and model.kv_persist):
        return None
    return KvPersistence(
        directory=settings.kv_dir if settings.kv_dir is not None else _default_kv_dir(),
        budget_bytes=settings.kv_budget,
        save_timeout_s=settings.kv_save_timeout_s,
    )


def _default_kv_dir() -> Path:
    from residency.embedded import cache_dir

    return cache_dir() / "kv"


def start_build_if_missing(settings: RunnerSettings) -> bool:
    """For `residency serve`: when "auto" would find no llama-server, builds it in the background
    (`build_runner`, the default) or says once how to get one. Returns whether a build started."""
    if settings.runner != "auto" or find_llama_server(settings.llama_server) is not None:
        return False
    if settings.build_runner:
        from residency.runners.build import build_in_background

        return build_in_background() is not None
    log.warning(
        "no llama-server found (not configured, not on PATH, not built): serving with "
        "llama-cpp-python. Build llama-server with `residency build-runner` "
        "(or scripts/build-llama-server.sh) to get parallel slots and KV persistence."
    )
    return False
