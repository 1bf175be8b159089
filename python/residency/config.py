"""Settings from a TOML file, the environment and explicit overrides.

Priority, highest first: keyword overrides, environment variables, the TOML file, defaults. Both
residency's own variables (``RESIDENCY_KEEP_ALIVE``) and Ollama's (``OLLAMA_KEEP_ALIVE``) are read,
so users migrating from Ollama change nothing; residency's name wins when both are set.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from residency.config_faults import FaultSettings
from residency.config_file import read_toml
from residency.config_keepalive import KeepAliveLimits
from residency.config_model import ModelConfig, parse_duration
from residency.config_operations import OperationsSettings
from residency.config_runners import RunnerKind, RunnerSettings
from residency.config_security import ApiKeyConfig, SecuritySettings
from residency.errors import ConfigError
from residency.keepalive import parse_keep_alive
from residency.llamacpp import KV_CACHE_TYPES as LLAMA_KV_CACHE_TYPES

__all__ = ["ApiKeyConfig", "ModelConfig", "RunnerKind", "Settings", "load_settings"]


#: KV cache types llama.cpp's runners accept (Ollama documents f16, q8_0 and q4_0).
KV_CACHE_TYPES = tuple(LLAMA_KV_CACHE_TYPES)

#: The environment variable naming a config file when load_settings() gets none.
CONFIG_ENV = "RESIDENCY_CONFIG"


def _alias(name: str, *extra: str) -> AliasChoices:
    """residency's variable first, then Ollama's, then the plain field name (TOML, keywords)."""
    upper = name.upper()
    choices = [f"RESIDENCY_{upper}", f"OLLAMA_{upper}", name]
    return AliasChoices(*choices, *extra)


class Settings(
    SecuritySettings, RunnerSettings, OperationsSettings, FaultSettings, KeepAliveLimits
):
    """Everything residency is configured with. See ``load_settings`` for where values come from."""

    model_config = SettingsConfigDict(
        env_prefix="RESIDENCY_",
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
    )

    host: str = Field(
        default="127.0.0.1", validation_alias=AliasChoices("RESIDENCY_HOST", "OLLAMA_HOST", "host")
    )
    port: int = Field(default=11434, ge=0, le=65535, validation_alias=_alias("port"))
    keep_alive: str = Field(default="5m", validation_alias=_alias("keep_alive"))
    #: Per device (Ollama: 3 per GPU).
    max_loaded_models: int = Field(default=3, gt=0, validation_alias=_alias("max_loaded_models"))
    num_parallel: int = Field(default=1, gt=0, validation_alias=_alias("num_parallel"))
    max_queue: int = Field(default=512, gt=0, validation_alias=_alias("max_queue"))
    #: Bytes reserved per GPU for the driver and other processes (Ollama's OLLAMA_GPU_OVERHEAD).
    gpu_overhead: int = Field(default=0, ge=0, validation_alias=_alias("gpu_overhead"))
    #: A load that shows no progress for this long fails (a duration or seconds).
    load_timeout: str = Field(default="5m", validation_alias=_alias("load_timeout"))
    recovery_timeout_s: float = Field(default=5.0, gt=0)
    #: Health ping timeout before reusing an idle runner.
    ping_timeout_s: float = Field(default=10.0, gt=0)
    #: SIGTERM to SIGKILL deadline when stopping a runner (unload, keep-alive expiry, shutdown).
    stop_timeout_s: float = Field(default=10.0, gt=0)
    #: The same deadline for an idle runner evicted to make room for a waiting load; 0 = SIGKILL
    #: at once (an idle inference server has nothing to save, and the load is waiting).
    evict_grace_s: float = Field(default=0.0, ge=0)
    #: Host page cache for model files (issue 17): bytes the scheduler keeps warm in RAM, deciding
    #: which files by use frequency and prefetching a waiting load's file; None: half the RAM
    #: available at start-up; 0: leave the page cache to the kernel. Half-life of past uses.
    host_cache_bytes: int | None = Field(default=None, ge=0)
    host_cache_half_life_s: float = Field(default=300.0, gt=0)
    policy: str = "ollama"
    #: Queue discipline: "affinity" (requests for a ready or loading model never wait behind other
    #: loads; loads start oldest request first) or "ollama" (Ollama's FIFO, one load at a time).
    queue: Literal["affinity", "ollama"] = Field(
        default="affinity", validation_alias=AliasChoices("RESIDENCY_QUEUE", "queue")
    )
    #: Affinity's starvation deadline: past it, nothing passes the oldest waiting request;
    #: 0 = the mean load time observed so far (10 s before the first load). 60 s by default: with
    #: fast loads (llama-server, a warm page cache) the mean load time is a second or two, and
    #: holding requests for ready models back that often made bursty traffic wait longer than
    #: Ollama's FIFO (p99 1.11×, bench_policies); 60 s still bounds the wait (max TTFT 0.91×).
    starvation_s: float = Field(default=60.0, ge=0)
    #: Affinity: loads in flight at once; 0 = no limit. Loads share the disk and each reserves its
    #: memory from its start, so 1 (Ollama's rule) holds a little less GPU memory (resident GB·s
    #: −0.7 %) but serves bursts later (mean TTFT up to +2 %, bench_policies): no limit by default.
    max_loads: int = Field(default=0, ge=0)
    probe: Literal["auto", "cuda", "nvml", "host", "simulated"] = "auto"
    #: A simulated device file (residency.memory.SimulatedDevice): the test double of a GPU.
    simulated_device: Path | None = None
    #: Caps each device's memory as residency sees it (bytes); None = the device's total.
    memory_limit: int | None = Field(default=None, gt=0)
    models: list[ModelConfig] = Field(default_factory=list)
    #: Every *.gguf under this directory (recursively) becomes a model named after its file.
    models_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("RESIDENCY_MODELS_DIR", "models_dir")
    )
    #: Serve the models of Ollama's store and the Hugging Face cache (explicit `models` win).
    discover: bool = Field(
        default=True, validation_alias=AliasChoices("RESIDENCY_DISCOVER", "discover")
    )
    #: Ollama's store; None = ~/.ollama/models, else /usr/share/ollama/.ollama/models.
    ollama_models: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("RESIDENCY_OLLAMA_MODELS", "OLLAMA_MODELS", "ollama_models"),
    )
    #: The Hugging Face hub cache; None = huggingface_hub's own (HF_HUB_CACHE, HF_HOME…).
    hf_cache: Path | None = Field(
        default=None, validation_alias=AliasChoices("RESIDENCY_HF_CACHE", "hf_cache")
    )
    #: How often (at most) discovered directories are checked for new or removed models.
    discover_interval_s: float = Field(default=2.0, gt=0)
    preload: list[str] = Field(default_factory=list)
    #: Context length of models that set none (capped by each model's training context).
    default_ctx: int = Field(
        default=4096,
        gt=0,
        validation_alias=AliasChoices(
            "RESIDENCY_DEFAULT_CTX", "OLLAMA_CONTEXT_LENGTH", "default_ctx"
        ),
    )
    #: KV cache type of models that set none: f16, q8_0, q4_0… (quantised needs flash attention).
    kv_cache_type: str = Field(default="f16", validation_alias=_alias("kv_cache_type"))
    #: Flash attention for every model that sets none; None = the runner's default.
    flash_attention: bool | None = Field(default=None, validation_alias=_alias("flash_attention"))
    #: Spread each model across all GPUs instead of fitting it on one (as OLLAMA_SCHED_SPREAD).
    sched_spread: bool = Field(default=False, validation_alias=_alias("sched_spread"))

    @model_validator(mode="after")
    def _runner_is_not_command(self) -> Settings:
        if self.runner == "command":
            raise ValueError("runner: 'command' is per model (it needs a `command` template)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _split_host_port(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        key = next(
            (k for k in ("host", "RESIDENCY_HOST", "OLLAMA_HOST") if k in data),
            None,
        )
        if key is None or not isinstance(data[key], str):
            return data
        host, port = _parse_host(data[key])
        data = dict(data)
        data[key] = host
        if port is not None and not any(k in data for k in ("port", "RESIDENCY_PORT")):
            data["port"] = port
        return data

    @field_validator("keep_alive", "load_timeout", mode="before")
    @classmethod
    def _duration_text(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("keep_alive", "load_timeout")
    @classmethod
    def _duration_valid(cls, value: str, info: Any) -> str:
        parse_duration(info.field_name, value)
        return value

    @field_validator("flash_attention", "sched_spread", "discover", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info: Any) -> object:
        # OLLAMA_FLASH_ATTENTION= (set but empty) means "not set", as in Ollama.
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("kv_cache_type")
    @classmethod
    def _kv_cache_type_known(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in KV_CACHE_TYPES:
            raise ValueError(f"unknown KV cache type {value!r}; known: {', '.join(KV_CACHE_TYPES)}")
        return value

    @field_validator("policy")
    @classmethod
    def _policy_known(cls, value: str) -> str:
        from residency._core import policy_names

        if value not in policy_names():
            raise ValueError(f"unknown policy {value!r}; known: {', '.join(policy_names())}")
        return value

    @model_validator(mode="after")
    def _names_unique(self) -> Settings:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model {model.name!r} is configured twice")
            seen.add(model.name)
        return self

    # Derived values, parsed once from the text forms users write.
    def keep_alive_ns(self) -> int:
        """The default keep-alive in the core's nanoseconds (< 0 forever, 0 unload when idle)."""
        return parse_keep_alive(self.keep_alive)

    def load_timeout_s(self) -> float:
        """Seconds of no load progress after which a load fails; 0 or less = never."""
        ns = parse_keep_alive(self.load_timeout)
        return float("inf") if ns < 0 else ns / 1e9

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


def _parse_host(text: str) -> tuple[str, int | None]:
    """Ollama's OLLAMA_HOST forms: "host", "host:port", ":port", "scheme://host:port"."""
    rest = text.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [::1]:11434
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, ""
    port = None
    if port_text:
        if not port_text.isdigit():
            raise ValueError(f"host {text!r}: port {port_text!r} is not a number")
        port = int(port_text)
    return host or "127.0.0.1", port


#: The TOML file's contents for the Settings being built (set by load_settings only).
_TOML_DATA: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "residency_toml_data", default=None
)


class _TomlSource(PydanticBaseSettingsSource):
    """The config file, below the environment and keywords in priority."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        data = _TOML_DATA.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        # pydantic-settings files init and env values under a field's first alias; so must we, or
        # a key given twice under two names reads as an unknown setting.
        out: dict[str, Any] = {}
        for key, value in (_TOML_DATA.get() or {}).items():
            field = self.settings_cls.model_fields.get(key)
            alias = field.validation_alias if field is not None else None
            out[_first_alias(alias) if isinstance(alias, AliasChoices) else key] = value
        return out


def _first_alias(alias: AliasChoices) -> str:
    first = alias.choices[0]
    return first if isinstance(first, str) else str(first)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from `config_file` (or ``$RESIDENCY_CONFIG``), the environment and `overrides`.

    Relative model paths in the file are taken relative to the file. Raises ConfigError with the
    file, the field and what is wrong.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = os.environ[CONFIG_ENV]
    data: dict[str, Any] = {}
    source = "settings"
    if config_file is not None:
        path = Path(config_file).expanduser()
        source = str(path)
        data = read_toml(path)
    token = _TOML_DATA.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None
    finally:
        _TOML_DATA.reset(token)


def _describe(err: ValidationError) -> str:
    # Name the setting as users know it: "max_queue (RESIDENCY_MAX_QUEUE, OLLAMA_MAX_QUEUE)".
    names: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            env = [str(c) for c in alias.choices if str(c).isupper()]
            names[_first_alias(alias)] = f"{name} ({', '.join(env)})"
    parts = []
    for e in err.errors():
        loc = [names.get(str(x), str(x)) for x in e["loc"]]
        where = ".".join(loc) or "settings"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
