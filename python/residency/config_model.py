"""One model as configured (a `[[models]]` entry, or one found on disk); ``config`` re-exports
it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from residency.config_keepalive import KeepAliveLimits
from residency.config_runners import RunnerKind
from residency.errors import InvalidArgumentError
from residency.keepalive import parse_keep_alive

__all__ = ["ModelConfig", "parse_duration"]


class ModelConfig(KeepAliveLimits):
    """One model as configured: a file, the runner that serves it, and its load options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    #: The model file (GGUF for the llama.cpp runners; anything a `command` template understands).
    path: Path
    #: "auto" = the settings' `runner` (llama-server when one is found, else llama-cpp-python).
    runner: RunnerKind = "auto"
    #: Save this model's llama-server slots before its runner stops (see Settings.kv_persist).
    kv_persist: bool = True
    #: Context length; None = min(settings.default_ctx, the model's training context).
    ctx: int | None = Field(default=None, gt=0)
    #: Parallel request slots; None = settings.num_parallel.
    parallel: int | None = Field(default=None, gt=0)
    kv_type: str = "f16"
    #: Layers offloaded to the GPU: an int (-1 = all), or "auto" (all that fit; 0 on the host).
    gpu_layers: int | Literal["auto"] = "auto"
    #: This model's default keep-alive ("10m", "300", "-1"); None = settings.keep_alive. Its
    #: keep_alive_min/max and client_keep_alive (KeepAliveLimits) override the server's.
    keep_alive: str | None = None
    #: Pinned models are never evicted and never expire.
    pinned: bool = False
    #: For runner "command": argv template with {model} {port} {host} {ctx} {parallel} {gpu_layers}
    #: {kv_type} placeholders. Never run through a shell.
    command: list[str] | None = None
    health_path: str = "/v1/models"
    env: dict[str, str] = Field(default_factory=dict)
    #: Extra arguments appended to the llama.cpp runners' command line.
    args: list[str] = Field(default_factory=list)
    #: Bytes to reserve, overriding the estimate (for runners whose files cannot be estimated).
    memory: int | None = Field(default=None, gt=0)
    #: Start the runner with embeddings on, so /api/embed works with any model (as in Ollama).
    #: None = the kind's default: on for llama-cpp-python (generation still works; it costs a
    #: larger output buffer), off for llama-server (older builds then serve only embeddings).
    embedding: bool | None = None
    #: llama-cpp-python's chat format; None = the GGUF's template, else one guessed from the family.
    chat_format: str | None = None
    #: Flash attention on or off; None = settings.flash_attention (then the runner's default).
    flash_attention: bool | None = None
    #: Request options this model defaults to (Ollama's PARAMETERs: stop, temperature, top_k…).
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: The model's default system prompt, its template (as Ollama stores it: a Go template, shown
    #: by /api/show; the runner applies the GGUF's own) and its license text.
    system: str | None = None
    template: str | None = None
    license: str | None = None
    #: Vision projectors and LoRA adapters that came with the model (noted, not yet loaded).
    projectors: list[Path] = Field(default_factory=list)
    adapters: list[Path] = Field(default_factory=list)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive_text(cls, value: object) -> object:
        # TOML users write `keep_alive = 300` or `-1`; store the text, parse it where it is used.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_valid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration("keep_alive", value)
        return value

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("health_path must start with '/'")
        return value

    @model_validator(mode="after")
    def _command_given(self) -> ModelConfig:
        if self.runner == "command" and not self.command:
            raise ValueError(f"model {self.name!r}: runner 'command' needs a `command` template")
        return self


def parse_duration(field: str, value: str) -> int:
    try:
        return parse_keep_alive(value)
    except InvalidArgumentError as err:
        raise ValueError(f"{field}: {err}") from None
