"""What a model can do, read as Ollama reads it: its chat template and its GGUF metadata.

Ollama refuses ``tools``, ``think`` and ``images`` for a model without the capability rather than
ignoring them; residency answers the same. A model whose file is not GGUF (its metadata unknown)
is given the benefit of the doubt: the request goes to its runner unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from residency.api._types import EntryLike
from residency.api.errors import ApiError
from residency.gguf_header import read_header

__all__ = ["ModelTraits", "model_traits", "refuse_missing", "traits"]

# Template text that shows the model was trained with tool calls / a thinking section.
_TOOL_MARKERS = ("tools", "tool_calls")
_THINK_MARKERS = ("<think>", "thinking", "reasoning_content", "enable_thinking")


@dataclass(frozen=True)
class ModelTraits:
    known: bool
    template: str
    capabilities: tuple[str, ...]

    def can(self, capability: str) -> bool:
        return not self.known or capability in self.capabilities


def _vision(metadata: Mapping[str, Any]) -> bool:
    return any(".vision." in key or key.startswith("clip.") for key in metadata)


def traits(entry: EntryLike) -> ModelTraits:
    """The model's template and capabilities (the header read is cached per file version)."""
    if entry.details.get("format") != "gguf":
        return ModelTraits(False, "", ("completion",))
    try:
        header = read_header(entry.path)
    except (OSError, ValueError):
        return ModelTraits(False, "", ("completion",))
    meta = header.metadata
    template = str(meta.get("tokenizer.chat_template") or "")
    caps = ["completion"]
    if any(m in template for m in _TOOL_MARKERS):
        caps.append("tools")
    if any(m in template for m in _THINK_MARKERS):
        caps.append("thinking")
    if _vision(meta):
        caps.append("vision")
    return ModelTraits(True, template, tuple(caps))


#: Each model file version's traits, so a warm request reads them without a thread hop.
_KNOWN: dict[tuple[str, int, object], ModelTraits] = {}


async def model_traits(entry: EntryLike) -> ModelTraits:
    """traits(), read off the event loop the first time a file version is asked about."""
    version = (str(entry.path), entry.size_bytes, entry.modified_at)
    known = _KNOWN.get(version)
    if known is None:
        known = _KNOWN[version] = await asyncio.to_thread(traits, entry)
    return known


def refuse_missing(name: str, model: ModelTraits, wanted: dict[str, bool]) -> None:
    """Ollama's 400 for a request that needs a capability the model lacks."""
    for capability, asked in wanted.items():
        if asked and not model.can(capability):
            what = "image input" if capability == "vision" else capability
            raise ApiError(400, f'"{name}" does not support {what}', code="unsupported")
