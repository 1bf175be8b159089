"""Reload without restart: a new configuration replaces the old, and only what changed restarts.

The new configuration is read and checked whole — settings, model files, API keys — before
anything changes, so an invalid one is refused with the reason and the old one keeps serving.
Then the registry is replaced (``Scheduler.replace_models``): a model whose configuration or
file changed has its runner stopped once the requests it is serving end (newcomers wait for a
fresh one), a removed model drains and stops, an added model loads on its first request, and
every other runner keeps running. Settings read once at start-up (the listening address, the
devices, the queue's shape…) are reported as needing a restart, and the old values stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from residency.config import Settings
from residency.registry import ModelEntry, Registry

if TYPE_CHECKING:
    from residency.scheduler.driver import Scheduler

__all__ = ["LIVE_SETTINGS", "ModelChanges", "Reloader", "model_changes", "restart_required"]

log = logging.getLogger("residency.reload")

#: Settings a reload applies: the models (and the defaults their entries are built with) and the
#: API keys. Every other setting is read once at start-up.
LIVE_SETTINGS = frozenset(
    {
        "models",
        "models_dir",
        "discover",
        "ollama_models",
        "hf_cache",
        "kv_cache_type",
        "flash_attention",
        "api_keys",
        "api_key",
        "api_keys_file",
    }
)


@dataclass(frozen=True)
class ModelChanges:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: Configuration or file changed: the runner restarts once its requests end.
    changed: tuple[str, ...] = ()
    unchanged: int = 0


def model_changes(old: Sequence[ModelEntry], new: Sequence[ModelEntry]) -> ModelChanges:
    """What differs between two model lists, by name (a config or a file digest that differs)."""
    before = {e.name: e for e in old}
    after = {e.name: e for e in new}
    changed = [
        n
        for n in sorted(before.keys() & after.keys())
        if (before[n].config, before[n].digest) != (after[n].config, after[n].digest)
    ]
    return ModelChanges(
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        changed=tuple(changed),
        unchanged=len(before.keys() & after.keys()) - len(changed),
    )


def restart_required(old: Settings, new: Settings) -> list[str]:
    """Settings that differ but apply only at the next start."""
    a, b = old.model_dump(), new.model_dump()
    return sorted(k for k in a.keys() | b.keys() if k not in LIVE_SETTINGS and a.get(k) != b.get(k))


@dataclass(frozen=True)
class ReloadReport:
    changes: ModelChanges
    restart_required: list[str]

    def as_json(self) -> dict[str, Any]:
        c = self.changes
        return {
            "status": "reloaded",
            "added": list(c.added),
            "removed": list(c.removed),
            "changed": list(c.changed),
            "unchanged": c.unchanged,
            "restart_required": self.restart_required,
        }


class Reloader:
    """Re-reads the configuration with `load` and applies it; one reload at a time.

    `check` validates what else the new settings configure (the API keys) and returns the
    function that applies it — called only once every check has passed.
    """

    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Settings],
        scheduler: Scheduler,
        check: Callable[[Settings], Callable[[], None]] | None = None,
    ) -> None:
        self.settings = settings
        self._load = load
        self._scheduler = scheduler
        self._check = check
        self._lock = asyncio.Lock()

    async def reload(self, why: str) -> ReloadReport:
        """Raises ConfigError (nothing changed) when the new configuration is invalid."""
        metrics = self._scheduler.metrics
        async with self._lock:
            try:
                # Reading the file and the models' headers is disk work: off the event loop.
                new, registry, apply = await asyncio.to_thread(self._prepare)
            except Exception as err:
                metrics.reloads.labels("failed").inc()
                log.error(
                    "reload (%s) refused, the configuration in use is unchanged: %s", why, err
                )
                raise
            changes = self._scheduler.replace_models(registry)
            if apply is not None:
                apply()
            report = ReloadReport(changes, restart_required(self.settings, new))
            metrics.reloads.labels("ok").inc()
            log.info(
                "reloaded (%s): added %s, removed %s, restarting %s, %d unchanged%s",
                why,
                list(changes.added) or "none",
                list(changes.removed) or "none",
                list(changes.changed) or "none",
                changes.unchanged,
                f"; needs a restart to apply: {', '.join(report.restart_required)}"
                if report.restart_required
                else "",
            )
            return report

    def _prepare(self) -> tuple[Settings, Registry, Callable[[], None] | None]:
        new = self._load()
        apply = self._check(new) if self._check is not None else None
        return new, Registry.from_settings(new), apply


def on_sighup(reload: Callable[[str], Awaitable[object]]) -> Callable[[], None]:
    """A signal handler that runs a reload (its errors are logged by the reload itself)."""
    tasks: set[asyncio.Task[object]] = set()

    def handler() -> None:
        async def run() -> None:
            # Errors are logged by Reloader.reload; the old configuration serves on.
            with contextlib.suppress(Exception):
                await reload("SIGHUP")

        task: asyncio.Task[Any] = asyncio.ensure_future(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return handler
