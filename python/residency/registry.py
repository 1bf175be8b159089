"""The model registry: every model a client may ask for, from the config and a models directory.

Entries are plain values built once at start-up. Names resolve as Ollama's do: ``name`` and
``name:latest`` are the same model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from residency.config import ModelConfig, Settings
from residency.errors import ConfigError, ModelNotFoundError
from residency.gguf_header import read_header

if TYPE_CHECKING:
    from residency.catalog import DiscoveredModels

__all__ = ["ModelEntry", "Registry", "gguf_details"]

log = logging.getLogger(__name__)

_LATEST = ":latest"


@dataclass(frozen=True)
class ModelEntry:
    """A configured model as clients see it (/api/tags, /api/show, /v1/models)."""

    name: str
    path: Path
    #: The file's size; 0 when the path is not a file (a `command` runner's model id).
    size_bytes: int
    modified_at: datetime
    #: sha256 over path, size and mtime: changes when the file does, without reading 100s of GB.
    digest: str
    runner: str
    #: The configuration the entry came from (load options, keep-alive, pinned, command, env).
    config: ModelConfig
    #: format "gguf", family, parameter_size, quantization_level, context_length (from the header).
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        """The configured load options (None = default)."""
        c = self.config
        return {
            "ctx": c.ctx,
            "parallel": c.parallel,
            "kv_type": c.kv_type,
            "gpu_layers": c.gpu_layers,
        }

    @property
    def context_length(self) -> int | None:
        """The model's training context, when the header says."""
        value = self.details.get("context_length")
        return value if isinstance(value, int) else None


class Registry:
    """Name → ModelEntry. Built from settings.models, then the models found on disk
    (residency.discovery); the embedded default Gemma 3 270M when none is found."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._discovered: DiscoveredModels | None = None
        self._version = 0
        self._entries: dict[str, ModelEntry] = {}
        for entry in entries:
            if _canonical(entry.name) in self._entries:
                raise ConfigError(f"model {entry.name!r} is configured twice")
            self._entries[_canonical(entry.name)] = entry

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        if settings.models_dir is not None and not settings.models_dir.is_dir():
            raise ConfigError(f"models_dir {settings.models_dir} is not a directory")
        from residency.catalog import DiscoveredModels  # it builds entries with make_entry

        found = DiscoveredModels(settings, make_entry)
        registry = cls(found.entries())
        registry._discovered = found
        found.watch()
        return registry

    def _refresh(self) -> None:
        # Takes the list the discovery watcher published, if it changed (an int compare).
        found = self._discovered
        if found is not None and found.version != self._version:
            self._version = found.version
            self._entries = {_canonical(e.name): e for e in found.entries()}

    def close(self) -> None:
        """Stops watching the disk for models (the watcher also ends with the registry)."""
        if self._discovered is not None:
            self._discovered.close()

    def resolve(self, name: str) -> ModelEntry:
        """The entry for `name` ("gemma3:270m", "mymodel", "mymodel:latest")."""
        self._refresh()
        entry = self._entries.get(_canonical(name.strip()))
        if entry is None:
            known = ", ".join(sorted(e.name for e in self._entries.values())) or "none"
            raise ModelNotFoundError(f"model {name!r} not found (configured models: {known})")
        return entry

    def entries(self) -> list[ModelEntry]:
        self._refresh()
        return sorted(self._entries.values(), key=lambda e: e.name)

    def __len__(self) -> int:
        return len(self._entries)


def _canonical(name: str) -> str:
    return name.removesuffix(_LATEST)


def make_entry(config: ModelConfig) -> ModelEntry:
    """Stats the file and reads its GGUF header. A missing file is a ConfigError unless the model
    runs through a `command` template (whose 'path' may be a model id such as a HF repo)."""
    path = config.path.expanduser()
    try:
        st = path.stat()
    except OSError:
        if config.runner != "command":
            raise ConfigError(f"model {config.name!r}: file {path} does not exist") from None
        return ModelEntry(
            name=config.name,
            path=path,
            size_bytes=0,
            modified_at=datetime.now(timezone.utc),
            digest=hashlib.sha256(str(path).encode()).hexdigest(),
            runner=config.runner,
            config=config,
            details={"format": "unknown"},
        )
    digest = hashlib.sha256(
        f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    ).hexdigest()
    return ModelEntry(
        name=config.name,
        path=path,
        size_bytes=st.st_size,
        modified_at=datetime.fromtimestamp(st.st_mtime, timezone.utc),
        digest=digest,
        runner=config.runner,
        config=config,
        details=gguf_details(path),
    )


def gguf_details(path: Path) -> dict[str, Any]:
    """Ollama's `details` from a GGUF header; {"format": "unknown"} for anything else."""
    try:
        header = read_gguf_header(path)
    except OSError as err:
        log.warning("cannot read %s: %s", path, err)
        return {"format": "unknown"}
    except ValueError as err:  # not GGUF, or a corrupt header: the registry still lists it
        if "is not a GGUF file" not in str(err):  # other formats are fine for `command` runners
            log.warning("cannot read the GGUF header of %s: %s", path, err)
        return {"format": "unknown"}
    kv, n_params = header
    arch = kv.get("general.architecture")
    details: dict[str, Any] = {"format": "gguf"}
    if isinstance(arch, str):
        details["family"] = arch
        details["families"] = [arch]
    size_label = kv.get("general.size_label")
    details["parameter_size"] = (
        size_label if isinstance(size_label, str) else _human_params(n_params)
    )
    file_type = kv.get("general.file_type")
    if isinstance(file_type, int):
        from gguf import LlamaFileType

        try:
            details["quantization_level"] = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            details["quantization_level"] = f"type {file_type}"
    ctx = kv.get(f"{arch}.context_length") if isinstance(arch, str) else None
    if isinstance(ctx, int):
        details["context_length"] = ctx
    details["has_chat_template"] = "tokenizer.chat_template" in kv
    return details


def read_gguf_header(path: Path) -> tuple[Mapping[str, Any], int]:
    """The metadata of a GGUF file (long arrays skipped, their keys kept) and its parameter count,
    from residency's one GGUF reader (parsed once per file version). Raises ValueError
    (GGUFFormatError) for a file that is not GGUF or whose header is cut short."""
    header = read_header(path)
    return header.metadata, header.parameter_count


def model_info(path: Path, *, verbose: bool) -> tuple[dict[str, Any], str]:
    """/api/show's ``model_info`` and chat template from the file's header: every key/value with
    arrays only when `verbose` (as Ollama), and general.parameter_count. Raises OSError or
    ValueError for a file that changed or broke since it was listed."""
    header = read_header(path, arrays=verbose)
    # Arrays only when verbose, else null: as Ollama shows them.
    info = {
        k: v if verbose or not isinstance(v, list) else None for k, v in header.metadata.items()
    }
    template = info.pop("tokenizer.chat_template", "") or ""
    info.setdefault("general.parameter_count", header.parameter_count)
    return info, str(template)


def _human_params(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)
