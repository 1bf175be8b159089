"""Models already on disk, found with no configuration: Ollama's store, the Hugging Face cache and
``models_dir`` (searched recursively). Read-only: nothing here writes, renames or deletes a file.

Each source yields ``Found`` models (a ModelConfig plus where it came from). ``Discovery.scan``
merges them in a fixed precedence — models_dir, then Ollama's store, then the Hugging Face cache —
and reports every name a higher source shadowed, so duplicates are resolved predictably and shown.
``Discovery.changed`` stats only directories, so noticing a pull or a removal costs microseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from residency.config import ModelConfig, Settings

__all__ = [
    "Discovery",
    "Found",
    "hf_cache_models",
    "models_dir_models",
    "ollama_models",
    "ollama_store",
]

log = logging.getLogger(__name__)

#: Ollama's layer media types (server/images.go); the config blob carries no weights.
MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"
PARAMS_LAYER = "application/vnd.ollama.image.params"
SYSTEM_LAYER = "application/vnd.ollama.image.system"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
LICENSE_LAYER = "application/vnd.ollama.image.license"

_OLLAMA_REGISTRY = "registry.ollama.ai"
_OLLAMA_LIBRARY = "library"
#: Bounds on what a manifest or a text layer may make us read (a store is not trusted input).
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_TEXT_LAYER_BYTES = 4 << 20
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
# Quantisation names as they appear in GGUF file names ("gemma-3-270m-it-Q4_K_M.gguf").
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])(UD-)?(I?Q[1-8](?:_[0-9A-Z]+)*|BF16|F16|F32|MXFP4(?:_MOE)?)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# Split GGUFs: only the first part names the model (llama.cpp opens the others itself).
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$")


@dataclass(frozen=True)
class Found:
    """One discovered model: its configuration and the place it was found (shown to people)."""

    config: ModelConfig
    source: str
    #: The identity Ollama shows (the manifest's sha256), when the source has one.
    digest: str | None = None


def ollama_store(settings: Settings) -> Path | None:
    """``OLLAMA_MODELS``, else ``~/.ollama/models``, else the Linux service's store."""
    if settings.ollama_models is not None:
        return settings.ollama_models.expanduser()
    for candidate in (
        Path.home() / ".ollama" / "models",
        Path("/usr/share/ollama/.ollama/models"),
    ):
        if (candidate / "manifests").is_dir():
            return candidate
    return None


def ollama_name(parts: tuple[str, ...]) -> str | None:
    """The name `ollama list` shows for manifests/<host>/<namespace>/<model>/<tag>."""
    if len(parts) != 4:
        return None
    host, namespace, model, tag = parts
    if host == _OLLAMA_REGISTRY:
        prefix = "" if namespace == _OLLAMA_LIBRARY else f"{namespace}/"
    else:
        prefix = f"{host}/{namespace}/"
    return f"{prefix}{model}:{tag}"


def ollama_models(store: Path) -> Iterator[Found]:
    """Every manifest of the store whose model layer is a GGUF blob that exists."""
    manifests = store / "manifests"
    if not manifests.is_dir():
        return
    for path in sorted(_files(manifests)):
        name = ollama_name(path.relative_to(manifests).parts)
        if name is None:
            continue
        try:
            found = _ollama_model(store, name, path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("skipping Ollama manifest %s: %s", path, err)
            continue
        if found is not None:
            yield found


def _ollama_model(store: Path, name: str, manifest_path: Path) -> Found | None:
    raw = _read_bounded(manifest_path, _MAX_MANIFEST_BYTES)
    manifest = json.loads(raw)
    layers: list[dict[str, Any]] = manifest["layers"]
    by_type: dict[str, list[Path]] = {}
    for layer in layers:
        blob = _blob(store, str(layer["digest"]))
        by_type.setdefault(str(layer["mediaType"]), []).append(blob)
    models = by_type.get(MODEL_LAYER)
    if not models:
        return None  # a safetensors or remote-only model: nothing a GGUF runner can serve
    if not models[0].is_file():
        log.warning("Ollama model %s: its blob %s is missing", name, models[0])
        return None
    fields: dict[str, Any] = {
        "name": name,
        "path": models[0],
        "projectors": by_type.get(PROJECTOR_LAYER, []),
        "adapters": by_type.get(ADAPTER_LAYER, []),
    }
    for media, key in ((SYSTEM_LAYER, "system"), (TEMPLATE_LAYER, "template")):
        if media in by_type:
            fields[key] = _text(by_type[media][-1])
    if LICENSE_LAYER in by_type:
        fields["license"] = "\n".join(_text(p) for p in by_type[LICENSE_LAYER])
    if PARAMS_LAYER in by_type:
        params = json.loads(_text(by_type[PARAMS_LAYER][-1]))
        if not isinstance(params, dict):
            raise ValueError("its params layer is not a JSON object")
        # num_ctx decides the load (the reservation); the rest are request defaults.
        num_ctx = params.pop("num_ctx", None)
        if isinstance(num_ctx, int) and num_ctx > 0:
            fields["ctx"] = num_ctx
        fields["parameters"] = params
    digest = hashlib.sha256(raw).hexdigest()
    return Found(ModelConfig(**fields), f"ollama:{manifest_path}", digest)


def _blob(store: Path, digest: str) -> Path:
    match = _DIGEST.fullmatch(digest)
    if match is None:  # also keeps a hostile digest from naming a path outside blobs/
        raise ValueError(f"layer digest {digest!r} is not a sha256 digest")
    return store / "blobs" / f"sha256-{match.group(1)}"


def _text(path: Path) -> str:
    return _read_bounded(path, _MAX_TEXT_LAYER_BYTES).decode("utf-8", errors="replace")


def _read_bounded(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def hf_cache_models(cache_dir: Path | None) -> Iterator[Found]:
    """GGUF files of the Hugging Face cache as ``hf.co/org/repo:QUANT`` (Ollama's naming)."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:  # pragma: no cover - a declared dependency
        return
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return
    except (ValueError, OSError) as err:  # not a directory, unreadable
        log.warning("cannot scan the Hugging Face cache %s: %s", cache_dir or "", err)
        return
    for warning in info.warnings:
        log.debug("Hugging Face cache: %s", warning)
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        # The revision a ref (main) points to first, then the newest; one file per name.
        revisions = sorted(repo.revisions, key=lambda r: (not r.refs, -r.last_modified))
        seen: set[str] = set()
        for rev in revisions:
            ggufs = [f for f in rev.files if _is_model_gguf(f.file_path)]
            for f in sorted(ggufs, key=lambda f: str(f.file_path)):
                name = f"hf.co/{repo.repo_id}:{_hf_tag(f.file_path, len(ggufs))}"
                if name in seen:
                    continue
                seen.add(name)
                projectors = [p.file_path for p in rev.files if _is_projector(p.file_path)]
                yield Found(
                    ModelConfig(name=name, path=f.file_path, projectors=projectors),
                    f"huggingface:{f.file_path}",
                )


def _hf_tag(path: Path, files_in_revision: int) -> str:
    stem = _SPLIT.sub("", path.name.removesuffix(".gguf"))
    matches = list(_QUANT.finditer(stem))
    if matches:
        return "".join(g for g in matches[-1].groups() if g).upper()
    return "latest" if files_in_revision == 1 else stem


def _is_projector(path: Path) -> bool:
    return path.name.endswith(".gguf") and "mmproj" in path.name.lower()


def _is_model_gguf(path: Path) -> bool:
    if not path.name.endswith(".gguf") or _is_projector(path):
        return False
    split = _SPLIT.search(path.name.removesuffix(".gguf"))
    return split is None or int(split.group(1)) == 1


def models_dir_models(directory: Path) -> Iterator[Found]:
    """Every GGUF under `directory`, recursively: top-level files by their stem (as before),
    nested ones by their relative path ("qwen/qwen2.5-7b-q4_k_m")."""
    for path in sorted(_files(directory)):
        if not _is_model_gguf(path):
            continue
        rel = path.relative_to(directory).with_suffix("")
        name = _SPLIT.sub("", rel.as_posix())
        yield Found(ModelConfig(name=name, path=path), f"models_dir:{path}")


def _files(root: Path) -> Iterator[Path]:
    # Follows symlinked files (HF snapshots are links) but never symlinked directories (loops).
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if not f.startswith("."):
                yield Path(dirpath) / f


class Discovery:
    """The discovered models of one settings object, and a cheap way to tell they changed."""

    def __init__(self, settings: Settings) -> None:
        self._models_dir = settings.models_dir
        self._enabled = settings.discover
        self._ollama = ollama_store(settings) if self._enabled else None
        self._hf = settings.hf_cache
        #: Names a higher-precedence source shadowed: (name, kept source, shadowed source).
        self.shadowed: list[tuple[str, str, str]] = []

    def roots(self) -> list[Path]:
        """The directories whose trees are watched for changes."""
        roots = [self._models_dir] if self._models_dir is not None else []
        if self._enabled:
            if self._ollama is not None:
                roots.append(self._ollama / "manifests")
            roots.append(self._hf_root())
        return roots

    def _hf_root(self) -> Path:
        if self._hf is not None:
            return self._hf.expanduser()
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        """Every watched directory and file with its mtime and size: a pull, a new file, a
        removal, or a manifest rewritten in place (as `ollama pull` of a newer version does)
        changes it. Metadata only: no file is opened."""
        marks: list[tuple[str, int, int]] = []
        for root in self.roots():
            for dirpath, _dirs, files in os.walk(root):
                for path in (dirpath, *(os.path.join(dirpath, f) for f in files)):
                    try:
                        st = os.stat(path)
                    except OSError:  # removed while we looked, or a dangling link
                        continue
                    marks.append((path, st.st_mtime_ns, st.st_size))
        return tuple(marks)

    def scan(self) -> list[Found]:
        """All discovered models, one per name, in precedence order; fills `shadowed`."""
        sources: list[Iterator[Found]] = []
        if self._models_dir is not None:
            sources.append(models_dir_models(self._models_dir))
        if self._enabled:
            if self._ollama is not None:
                sources.append(ollama_models(self._ollama))
            sources.append(hf_cache_models(self._hf.expanduser() if self._hf else None))
        kept: dict[str, Found] = {}
        self.shadowed = []
        for source in sources:
            for found in source:
                key = found.config.name.removesuffix(":latest")
                if key in kept:
                    self.shadowed.append((found.config.name, kept[key].source, found.source))
                else:
                    kept[key] = found
        return list(kept.values())
