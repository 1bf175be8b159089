"""Settings for who may call the server and how much a request may ask (read by
``residency.api.security`` and ``residency.api.limits``); ``config.Settings`` inherits them."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, ConfigDict, Field
from pydantic_settings import BaseSettings

from residency.config_keepalive import KeepAliveLimits

__all__ = ["ApiKeyConfig", "SecuritySettings"]


def _alias(name: str) -> AliasChoices:
    """residency's variable, then Ollama's, then the plain field name (TOML, keywords)."""
    return AliasChoices(f"RESIDENCY_{name.upper()}", f"OLLAMA_{name.upper()}", name)


def _own(name: str) -> AliasChoices:
    """residency's variable only (not Ollama's: OLLAMA_API_KEY means ollama.com's key)."""
    return AliasChoices(f"RESIDENCY_{name.upper()}", name)


class ApiKeyConfig(KeepAliveLimits):
    """An API key (sent as ``Authorization: Bearer``) and its name, shown in logs and metrics;
    its keep-alive limits (KeepAliveLimits) override the model's and the server's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    key: str = Field(min_length=16, repr=False)
    #: The models this key may use (names as configured); None = every model.
    models: list[str] | None = None


class SecuritySettings(BaseSettings):
    """API keys, browser origins and input limits."""

    #: API keys; none = no authentication (the default, with the loopback bind).
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    #: One more key from the environment, named "env" in logs and metrics.
    api_key: str | None = Field(None, min_length=16, repr=False, validation_alias=_own("api_key"))
    #: A file of keys, one ``name:key`` or ``name:key:model,model`` per line (``#`` comments).
    api_keys_file: Path | None = Field(None, validation_alias=_own("api_keys_file"))
    #: Whether /metrics and /health need a key too (when keys are configured).
    auth_metrics: bool = True
    auth_health: bool = False
    #: Extra allowed browser origins, comma-separated, with Ollama's OLLAMA_ORIGINS patterns
    #: ("https://app.example.com", "http://*.example.com", "*"); loopback origins always pass.
    origins: str = Field(default="", validation_alias=_alias("origins"))
    #: Largest request body in bytes (413 beyond it, counted as it arrives).
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    #: A request body must arrive within this many seconds (a trickling client cannot hold on).
    body_timeout_s: float = Field(default=60.0, gt=0)
    #: Seconds for a request's headers to arrive (from the connection or the previous answer).
    header_timeout_s: float = Field(default=30.0, gt=0)
    #: Most chat messages, and most characters of a prompt (all messages' text together).
    max_messages: int = Field(default=4096, gt=0)
    max_prompt_chars: int = Field(default=8 * 1024 * 1024, gt=0)
    #: Largest num_predict / max_tokens, and largest OpenAI `n`.
    max_num_predict: int = Field(default=1 << 20, gt=0)
    max_n: int = Field(default=16, gt=0)
    #: Largest num_ctx for a model whose training context is unknown.
    max_num_ctx: int = Field(default=1 << 20, gt=0)
