"""Ollama requests in the runner's OpenAI dialect, and the runner's stream back in Ollama's.

Timing fields are measured here, never estimated: the facade stamps when it sent the request, when
the first token arrived and when the last did; token counts come from the runner's ``usage`` when
it reports one, else from the token chunks it streamed. A runner that reports its own ``timings``
(llama-server) is trusted over our clock for the prompt/eval split.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic_core import to_json

from residency.api.errors import ApiError
from residency.api.schemas import ChatMessage, ChatRequest, GenerateRequest

__all__ = [
    "LOAD_OPTIONS",
    "Generation",
    "chat_body",
    "generate_body",
    "rfc3339_now",
    "split_options",
    "with_store_defaults",
]

#: Ollama options that change how a model is loaded (they go to the scheduler, not the runner).
LOAD_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_gpu",
        "main_gpu",
        "num_batch",
        "num_thread",
        "low_vram",
        "use_mmap",
        "use_mlock",
        "numa",
        "vocab_only",
        "f16_kv",
        "logits_all",
        "embedding_only",
    }
)

# Sampling options llama.cpp's servers read under Ollama's own names.
_SAME_NAME = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "repeat_last_n",
    "tfs_z",
    "mirostat_tau",
    "mirostat_eta",
    "penalize_newline",
    "num_keep",
)


def split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(runner request fields, load options) from Ollama's `options`."""
    runner: dict[str, Any] = {}
    load: dict[str, Any] = {}
    if not options:
        return runner, load
    for key, value in options.items():
        if value is None:
            continue
        if key in LOAD_OPTIONS:
            load[key] = value
        elif key == "num_predict":
            # Ollama: -1 = until the context is full, -2 = fill it; OpenAI: omit max_tokens.
            if isinstance(value, int) and value > 0:
                runner["max_tokens"] = value
        elif key == "mirostat":
            runner["mirostat"] = value  # llama-server
            runner["mirostat_mode"] = value  # llama-cpp-python
        elif key == "stop" and isinstance(value, str):
            runner["stop"] = [value]
        elif key in _SAME_NAME:
            runner[key] = value
        # Anything else Ollama would warn about and ignore; so do we.
    return runner, load


def _response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        # Both llama.cpp servers accept a schema on json_object (grammar-constrained output).
        return {"type": "json_object", "schema": fmt}
    return None


def _content(text: str | None, images: list[str] | None) -> str | list[dict[str, Any]]:
    if not images:
        return text or ""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text or ""}]
    for image in images:
        url = image if image.startswith("data:") else f"data:image/jpeg;base64,{image}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _message(m: ChatMessage, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": _content(m.content, m.images)}
    if m.tool_calls:
        calls = []
        for i, call in enumerate(m.tool_calls):
            fn = dict(call.get("function") or {})
            args = fn.get("arguments", {})
            calls.append(
                {
                    "id": call.get("id") or f"call_{index}_{i}",
                    "type": "function",
                    "function": {
                        "name": fn.get("name", ""),
                        # Ollama sends arguments as an object, OpenAI as a JSON string.
                        "arguments": args if isinstance(args, str) else to_json(args).decode(),
                    },
                }
            )
        out["tool_calls"] = calls
    if m.tool_name:
        out["name"] = m.tool_name
    return out


#: Ollama's thinking levels (gpt-oss): ``think: "low"`` etc.
THINK_LEVELS = ("low", "medium", "high")


def thinking_fields(think: bool | str | None) -> dict[str, Any]:
    """Ollama's ``think`` in llama-server's fields: the chat template's ``enable_thinking``
    switch, a level as ``reasoning_effort`` (gpt-oss's templates read it), and the thinking
    returned apart from the answer (``reasoning_format: deepseek`` → ``reasoning_content``, which
    becomes Ollama's ``thinking``). Unset: nothing, the template's default. Runners that know
    none of these fields ignore them."""
    if think is None:
        return {}
    if think is False:
        return {"chat_template_kwargs": {"enable_thinking": False}}
    if think is True:
        return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_format": "deepseek"}
    if think not in THINK_LEVELS:
        levels = ", ".join(f'"{level}"' for level in THINK_LEVELS)
        raise ApiError(400, f"think must be true, false, {levels}; got {think!r}")
    return {
        "chat_template_kwargs": {"enable_thinking": True},
        "reasoning_effort": think,
        "reasoning_format": "deepseek",
    }


def _common(req: ChatRequest | GenerateRequest, model: str) -> dict[str, Any]:
    body, _ = split_options(req.options)
    body.update(thinking_fields(req.think))
    body["model"] = model
    body["stream"] = True  # always: the stream is how prompt and eval times are measured
    # Runners that can (llama-server, vLLM) then send exact token counts; others ignore it.
    body["stream_options"] = {"include_usage": True}
    fmt = _response_format(req.format)
    if fmt is not None:
        body["response_format"] = fmt
    return body


def chat_body(req: ChatRequest, model: str) -> dict[str, Any]:
    """/api/chat → /v1/chat/completions."""
    body = _common(req, model)
    body["messages"] = [_message(m, i) for i, m in enumerate(req.messages or ())]
    if req.tools:
        body["tools"] = req.tools
    return body


def generate_body(req: GenerateRequest, model: str) -> tuple[str, dict[str, Any]]:
    """/api/generate → (runner path, body): chat with the model's template, or a raw completion."""
    body = _common(req, model)
    if req.raw or req.suffix:
        # raw: the prompt is already templated; suffix: fill-in-the-middle needs the plain prompt.
        body["prompt"] = req.prompt or ""
        if req.suffix:
            body["suffix"] = req.suffix
        return "/v1/completions", body
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": req.system})
    messages.append({"role": "user", "content": _content(req.prompt, req.images)})
    body["messages"] = messages
    return "/v1/chat/completions", body


def with_store_defaults(body: dict[str, Any], entry: Any) -> dict[str, Any]:
    """`body` (a runner request) over the model's own defaults from Ollama's store: its
    ``parameters`` under the request's options, its ``system`` prompt when the request has none."""
    config = getattr(entry, "config", None)  # a registry entry's ModelConfig
    params, _ = split_options(getattr(config, "parameters", None) or {})
    for key, value in params.items():
        body.setdefault(key, value)
    system = getattr(config, "system", None)
    messages = body.get("messages")
    has_system = isinstance(messages, list) and any(
        m.get("role") in ("system", "developer") for m in messages
    )
    if system and isinstance(messages, list) and not has_system:
        messages.insert(0, {"role": "system", "content": system})
    return body


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


_DONE_REASONS = {"tool_calls": "stop", "function_call": "stop", None: "stop"}


class Generation:
    """Accumulates one streamed generation: its text, tool calls, counts and timestamps."""

    __slots__ = (
        "_tool_calls",
        "chunks",
        "finish_reason",
        "parts",
        "t_end",
        "t_first",
        "t_sent",
        "thinking",
        "timings",
        "usage",
    )

    def __init__(self, t_sent: int) -> None:
        self.t_sent = t_sent
        self.t_first: int | None = None
        self.t_end = t_sent
        self.parts: list[str] = []
        self.thinking: list[str] = []
        self.chunks = 0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None
        self._tool_calls: dict[int, dict[str, Any]] = {}

    def feed(self, event: Mapping[str, Any], now: int) -> tuple[str, str]:
        """Takes one runner event that arrived at `now` (perf ns); returns the (content, thinking)
        text it carried."""
        self.t_end = now
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        timings = event.get("timings")
        if isinstance(timings, dict):
            self.timings = timings
        choices = event.get("choices")
        if not choices:
            return "", ""
        choice = choices[0]
        reason = choice.get("finish_reason")
        if reason is not None:
            self.finish_reason = reason
        delta = choice.get("delta")
        if delta is None:  # /v1/completions
            text = choice.get("text") or ""
            think = ""
        else:
            text = delta.get("content") or ""
            think = delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or ():
                self._add_tool_call(call)
        if text or think:
            if self.t_first is None:
                self.t_first = now
            self.chunks += 1
            if text:
                self.parts.append(text)
            if think:
                self.thinking.append(think)
        return text, think

    def _add_tool_call(self, call: Mapping[str, Any]) -> None:
        if self.t_first is None:
            self.t_first = self.t_end
        index = int(call.get("index", len(self._tool_calls)))
        slot = self._tool_calls.setdefault(index, {"name": "", "arguments": ""})
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["name"] += fn["name"]
        if fn.get("arguments"):
            slot["arguments"] += fn["arguments"]

    def tool_calls(self) -> list[dict[str, Any]]:
        """Ollama's shape: arguments as an object (the runner streams them as JSON text)."""
        from pydantic_core import from_json

        calls = []
        for _, slot in sorted(self._tool_calls.items()):
            try:
                args = from_json(slot["arguments"]) if slot["arguments"] else {}
            except ValueError:
                args = slot["arguments"]
            calls.append({"function": {"name": slot["name"], "arguments": args}})
        return calls

    def prompt_count(self) -> int | None:
        """The prompt's tokens as the runner reported them (usage or timings), if it did."""
        if self.timings and self.timings.get("prompt_n") is not None:
            return int(self.timings["prompt_n"])
        if self.usage and self.usage.get("prompt_tokens") is not None:
            return int(self.usage["prompt_tokens"])
        return None

    @property
    def done_reason(self) -> str:
        return _DONE_REASONS.get(self.finish_reason, self.finish_reason or "stop")

    def stats(self, *, t_start: int, load_duration_ns: int) -> dict[str, Any]:
        """Ollama's final counters, in nanoseconds."""
        first = self.t_first if self.t_first is not None else self.t_end
        prompt_ns = first - self.t_sent
        eval_ns = self.t_end - first
        eval_count = self.chunks
        prompt_count: int | None = None
        if self.usage:
            eval_count = int(self.usage.get("completion_tokens", eval_count))
            if self.usage.get("prompt_tokens") is not None:
                prompt_count = int(self.usage["prompt_tokens"])
        if self.timings:  # the runner's own clock (llama-server), when it has one
            t = self.timings
            if t.get("prompt_ms") is not None:
                prompt_ns = int(float(t["prompt_ms"]) * 1e6)
            if t.get("predicted_ms") is not None:
                eval_ns = int(float(t["predicted_ms"]) * 1e6)
            if t.get("prompt_n") is not None:
                prompt_count = int(t["prompt_n"])
            if t.get("predicted_n") is not None:
                eval_count = int(t["predicted_n"])
        out: dict[str, Any] = {
            "total_duration": time.perf_counter_ns() - t_start,
            "load_duration": load_duration_ns,
        }
        if prompt_count is not None:
            out["prompt_eval_count"] = prompt_count
        out["prompt_eval_duration"] = prompt_ns
        out["eval_count"] = eval_count
        out["eval_duration"] = eval_ns
        return out
