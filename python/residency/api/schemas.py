"""Request bodies of both APIs as pydantic models.

They validate what the facade reads (model, stream, keep_alive, options, messages) and let every
other field through (``extra="allow"``), as Ollama and OpenAI servers ignore or forward fields they
do not know. Bodies are parsed with ``model_validate_json`` whatever the Content-Type says:
``curl -d`` sends form-urlencoded, and Ollama accepts that.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "EmbedRequest",
    "EmbeddingsRequest",
    "GenerateRequest",
    "OpenAIChatMessage",
    "OpenAIChatRequest",
    "OpenAICompletionRequest",
    "OpenAIEmbeddingRequest",
    "ShowRequest",
]

#: Ollama's keep_alive: a duration ("5m", "1h30m"), seconds (300), negative = forever, 0 = unload.
KeepAlive = float | str | None

_KEEP_ALIVE_DOC = (
    "How long the model stays loaded after this request: a duration ('5m'), seconds, "
    "a negative value for forever, 0 to unload when the request ends."
)


class _Open(BaseModel):
    """Unknown fields are kept (and forwarded to the runner where that makes sense)."""

    model_config = ConfigDict(extra="allow")


# --- Ollama ---------------------------------------------------------------------------------


class ChatMessage(_Open):
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class _OllamaGeneration(_Open):
    model: str = Field(min_length=1)
    stream: bool | None = Field(default=None, description="Defaults to true (NDJSON).")
    format: str | dict[str, Any] | None = Field(
        default=None, description="'json' or a JSON schema the output must follow."
    )
    options: dict[str, Any] | None = Field(
        default=None, description="num_ctx, temperature, top_p, top_k, seed, num_predict, stop, …"
    )
    keep_alive: KeepAlive = Field(default=None, description=_KEEP_ALIVE_DOC)
    think: bool | str | None = None


class GenerateRequest(_OllamaGeneration):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ChatRequest(_OllamaGeneration):
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None


class EmbedRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="A text or a list of texts.")
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = Field(default=None, description=_KEEP_ALIVE_DOC)
    dimensions: int | None = Field(default=None, gt=0)


class EmbeddingsRequest(_Open):
    model: str = Field(min_length=1)
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = Field(default=None, description=_KEEP_ALIVE_DOC)


class ShowRequest(_Open):
    model: str | None = None
    name: str | None = Field(default=None, description="Deprecated spelling of `model`.")
    verbose: bool = False

    @model_validator(mode="after")
    def _model_given(self) -> ShowRequest:
        if not (self.model or self.name):
            raise ValueError("`model` is required")
        return self

    @property
    def model_name(self) -> str:
        return self.model or self.name or ""


# --- OpenAI ---------------------------------------------------------------------------------


class _OpenAIBase(_Open):
    model: str = Field(min_length=1)
    # residency's extensions: OpenAI has no way to say how long a model stays loaded.
    keep_alive: KeepAlive = Field(default=None, description=_KEEP_ALIVE_DOC)
    num_ctx: int | None = Field(default=None, gt=0, description="Context length to load with.")


class OpenAIChatMessage(_Open):
    role: str
    content: str | list[dict[str, Any]] | None = None


class OpenAIChatRequest(_OpenAIBase):
    messages: list[OpenAIChatMessage] = Field(min_length=1)
    stream: bool = False


class OpenAICompletionRequest(_OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False


class OpenAIEmbeddingRequest(_OpenAIBase):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, gt=0)
