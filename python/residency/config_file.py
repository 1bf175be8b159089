"""Reading residency's TOML config file (residency.config.load_settings uses it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from residency.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["read_toml"]


def read_toml(path: Path) -> dict[str, Any]:
    """The file's settings, with its relative paths taken relative to the file."""
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    base = path.parent
    # Paths in the file are relative to the file, not to wherever the server was started.
    for key in ("models_dir", "simulated_device", "ollama_models", "hf_cache", "api_keys_file"):
        if isinstance(data.get(key), str):
            data[key] = str(_relative_to(base, data[key]))
    models = data.get("models")
    if isinstance(models, list):
        data["models"] = [
            {**m, "path": str(_relative_to(base, m["path"]))}
            if isinstance(m, dict) and isinstance(m.get("path"), str)
            else m
            for m in models
        ]
    return data


def _relative_to(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p
