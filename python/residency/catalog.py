"""The registry's models: the configured ones, then those found on disk (residency.discovery),
each completed by the server-wide defaults, and kept current without a restart.

A watcher thread stats the watched directories every ``discover_interval_s``; only when something
changed are the sources rescanned (only new or changed files have their GGUF header read again),
and the new list is published as one reference. Requests never scan: they compare a version.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from residency.config import ModelConfig, Settings
from residency.discovery import Discovery, Found
from residency.embedded import DEFAULT_MODEL_NAME, default_model_path

if TYPE_CHECKING:
    from residency.registry import ModelEntry

__all__ = ["DiscoveredModels", "with_server_defaults"]

log = logging.getLogger(__name__)

# KV cache types that need flash attention in llama.cpp (a quantised V cache does).
_UNQUANTISED_KV = frozenset({"f16", "f32", "bf16"})


def with_server_defaults(config: ModelConfig, settings: Settings) -> ModelConfig:
    """`config` with the settings' KV cache type and flash attention where it sets neither.

    As in Ollama, a quantised KV cache with flash attention off falls back to f16.
    """
    kv_type = config.kv_type if "kv_type" in config.model_fields_set else settings.kv_cache_type
    flash = config.flash_attention
    if flash is None:
        flash = settings.flash_attention
    if flash is False and kv_type.lower() not in _UNQUANTISED_KV:
        log.warning(
            "model %s: KV cache type %s needs flash attention, which is off; using f16",
            config.name,
            kv_type,
        )
        kv_type = "f16"
    # The runner kind turns flash_attention into its own flag (runners.llama).
    if kv_type == config.kv_type and flash == config.flash_attention:
        return config
    return config.model_copy(update={"kv_type": kv_type, "flash_attention": flash})


class DiscoveredModels:
    """Explicit models plus the discovered ones, as registry entries; `refresh` re-looks."""

    def __init__(
        self,
        settings: Settings,
        make_entry: Callable[[ModelConfig], ModelEntry],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._make_entry = make_entry
        self._clock = clock
        self._discovery = Discovery(settings)
        self._explicit = [make_entry(with_server_defaults(c, settings)) for c in settings.models]
        #: Entries of discovered files, reused while the file and its configuration are unchanged.
        self._cache: dict[tuple[str, int, int], ModelEntry] = {}
        self._shadowed: list[tuple[str, str, str]] = []
        #: Where each served model came from: "config", "embedded", "ollama:<manifest>"…
        self.sources: dict[str, str] = {}
        self._fingerprint = self._discovery.fingerprint()
        self._checked_at = self._clock()
        self._entries = self._build()
        #: Bumped on every change of `_entries`; readers on other threads compare it.
        self.version = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def watch(self) -> None:
        """Starts the watcher thread (when there is anything to watch). It holds only a weak
        reference: it ends with close(), or soon after this object is garbage."""
        if self._watcher is not None or not self._discovery.roots():
            return
        self._watcher = threading.Thread(
            target=_watch,
            args=(weakref.ref(self), self._stop, self._settings.discover_interval_s),
            name="residency-discovery",
            daemon=True,  # a scan in progress must not hold up the server's exit
        )
        self._watcher.start()

    def close(self) -> None:
        """Stops the watcher thread; idempotent."""
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()

    @property
    def shadowed(self) -> list[tuple[str, str, str]]:
        """(name, the source kept, the source shadowed) for every duplicate name."""
        return list(self._shadowed)

    def refresh(self) -> bool:
        """Rescans when a watched directory changed (checked at most every interval); True when
        the list of entries changed."""
        now = self._clock()
        if now - self._checked_at < self._settings.discover_interval_s:
            return False
        self._checked_at = now
        fingerprint = self._discovery.fingerprint()
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        before = [(e.name, e.digest) for e in self._entries]
        entries = self._build()
        changed = before != [(e.name, e.digest) for e in entries]
        if changed:
            self._entries = entries  # one reference: readers see the old list or the new one
            self.version += 1
            log.info("models on disk changed: %d models now", len(entries))
        return changed

    def _build(self) -> list[ModelEntry]:
        entries = list(self._explicit)
        sources = {e.name: "config" for e in entries}
        kept = {e.name.removesuffix(":latest"): "config" for e in entries}
        shadowed: list[tuple[str, str, str]] = []
        cache: dict[tuple[str, int, int], ModelEntry] = {}
        for found in self._discovery.scan():
            key = found.config.name.removesuffix(":latest")
            if key in kept:  # explicit configuration wins over discovery
                shadowed.append((found.config.name, kept[key], found.source))
                continue
            entry = self._entry(found, cache)
            if entry is not None:
                entries.append(entry)
                kept[key] = sources[entry.name] = found.source
        shadowed += self._discovery.shadowed
        self._cache = cache
        for name, used, other in shadowed:
            if (name, used, other) not in self._shadowed:  # each duplicate said once
                log.info("model %s: using %s; also found at %s", name, used, other)
        if not entries:
            default = ModelConfig(name=DEFAULT_MODEL_NAME, path=default_model_path())
            entries.append(self._make_entry(with_server_defaults(default, self._settings)))
            sources[DEFAULT_MODEL_NAME] = "embedded"
        # Published whole, for readers on other threads.
        self._shadowed, self.sources = shadowed, sources
        return entries

    def _entry(
        self, found: Found, cache: dict[tuple[str, int, int], ModelEntry]
    ) -> ModelEntry | None:
        config = with_server_defaults(found.config, self._settings)
        try:
            st = config.path.stat()
        except OSError:
            return None  # removed between the scan and now
        key = (config.model_dump_json(), st.st_size, st.st_mtime_ns)
        entry = self._cache.get(key)
        if entry is None:
            try:
                entry = self._make_entry(config)
            except Exception as err:  # one unreadable file must not hide the others
                log.warning("skipping %s (%s): %s", config.name, found.source, err)
                return None
            if found.digest is not None:
                entry = dataclasses.replace(entry, digest=found.digest)
        cache[key] = entry
        return entry


def _watch(
    ref: weakref.ReferenceType[DiscoveredModels], stop: threading.Event, interval: float
) -> None:
    while not stop.wait(interval):
        models = ref()
        if models is None:
            return
        try:
            models.refresh()
        except Exception:  # a broken store must not end the watching
            log.exception("looking for models on disk failed")
        del models  # no strong reference while sleeping
