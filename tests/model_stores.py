"""Model stores laid out on disk exactly as their tools leave them, for the discovery tests:
Ollama's (``ollama pull``: manifests/<host>/<namespace>/<model>/<tag> and content-addressed blobs
named sha256-<hex>) and huggingface_hub's cache (models--org--repo with blobs, refs, snapshots)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.ollama.image."


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _put_blob(
    store: Path, *, data: bytes | None = None, file: Path | None = None
) -> dict[str, Any]:
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if file is not None:
        digest = _sha256_file(file)
        target = blobs / f"sha256-{digest}"
        if not target.exists():
            try:
                os.link(file, target)  # same bytes, no copy of a 250 MB model
            except OSError:
                shutil.copyfile(file, target)
        size = target.stat().st_size
    else:
        assert data is not None
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        size = len(data)
    return {"digest": f"sha256:{digest}", "size": size}


def write_ollama_model(
    store: Path,
    name: str,
    gguf: Path,
    *,
    params: dict[str, Any] | None = None,
    system: str | None = None,
    template: str | None = None,
    license: str | None = None,
    projector: Path | None = None,
) -> Path:
    """One model as `ollama pull NAME` stores it; returns its manifest's path.

    NAME: "gemma3:270m" (registry.ollama.ai/library), "user/model:tag", "hf.co/org/repo:quant".
    """
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    layers = [{"mediaType": LAYER + "model", **_put_blob(store, file=gguf)}]
    if projector is not None:
        layers.append({"mediaType": LAYER + "projector", **_put_blob(store, file=projector)})
    for kind, text in (("template", template), ("system", system), ("license", license)):
        if text is not None:
            layers.append({"mediaType": LAYER + kind, **_put_blob(store, data=text.encode())})
    if params is not None:
        data = json.dumps(params).encode()
        layers.append({"mediaType": LAYER + "params", **_put_blob(store, data=data)})
    config = {"model_format": "gguf", "model_family": "gemma3", "file_type": "Q4_K_M"}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, **_put_blob(store, data=json.dumps(config).encode())},
        "layers": layers,
    }
    path = store.joinpath("manifests", *parts, tag or "latest")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def write_hf_repo(
    cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40
) -> Path:
    """A model repository in huggingface_hub's cache layout (what hf_hub_download leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        blob = repo / "blobs" / _sha256_file(source)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(source, blob)
            except OSError:
                shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo
