"""A runner's streamed OpenAI answer, put back together as the answer it would send unstreamed.

residency asks a runner for a stream even when its client wants one body, because only a stream
lets the runner notice that nobody waits any more. llama-server checks a streamed request's
connection before every token, but an unstreamed one only after a second with no result for *any*
task: another slot's tokens, or a ``/slots`` query, restart that wait, so a request whose client
left kept generating for as long as anything else happened (measured: 7 s more, stopped only when
the other traffic did). llama-cpp-python never checks an unstreamed request at all. Streamed, both
stop within a token of the connection closing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

__all__ = ["Assembly", "generate_streamed"]


class _Events(Protocol):
    """A runner's event stream (protocol.EventStream, or one relayed from a Ray replica)."""

    first_at: int | None

    def __aiter__(self) -> AsyncIterator[tuple[Any, int]]: ...
    async def aclose(self) -> None: ...


async def generate_streamed(
    stream: Callable[[str, Mapping[str, Any]], Awaitable[_Events]],
    path: str,
    body: Mapping[str, Any],
) -> Assembly:
    """Asks ``stream`` for ``body`` as a stream with usage, and assembles the whole answer."""
    events = await stream(path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    answer = Assembly()
    answer.first_at = events.first_at
    try:
        async for event, _ in events:
            answer.add(event)
    finally:
        await events.aclose()
    return answer


_ANSWER_OBJECT = {"chat.completion.chunk": "chat.completion"}


class _Choice:
    __slots__ = ("finish_reason", "logprobs", "reasoning", "role", "text", "tool_calls")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.role = "assistant"
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.logprobs: dict[str, Any] | None = None

    def add_logprobs(self, logprobs: Any) -> None:
        """Extends each list of a chunk's logprobs (chat: ``content``; completions: ``tokens``…)."""
        if not isinstance(logprobs, Mapping):
            return
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                self.logprobs.setdefault(key, []).extend(value)
            else:
                self.logprobs[key] = value

    def add_tool_call(self, delta: Mapping[str, Any]) -> None:
        index = int(delta.get("index", len(self.tool_calls)))
        call = self.tool_calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if delta.get("id"):
            call["id"] = delta["id"]
        fn = delta.get("function") or {}
        for part in ("name", "arguments"):
            if fn.get(part):
                call["function"][part] += fn[part]


class Assembly:
    """Takes a chat or completion stream's events (:meth:`add`); :meth:`answer` is the whole one.

    :attr:`pieces` counts the events that carried generated text, one per token on both llama.cpp
    servers: the completion's tokens for a runner that streams no usage.
    """

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._chat = False
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None
        self.pieces = 0
        #: When the first event arrived (perf ns), if any did.
        self.first_at: int | None = None

    def add(self, event: Mapping[str, Any]) -> None:
        if not self._head:
            for key in ("id", "object", "created", "model", "system_fingerprint"):
                if key in event:
                    self._head[key] = event[key]
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        for raw in event.get("choices") or ():
            choice = self._choices.setdefault(int(raw.get("index", 0)), _Choice())
            delta = raw.get("delta")
            if isinstance(delta, Mapping):  # chat
                self._chat = True
                carried = self._add_delta(choice, delta)
            else:
                text = raw.get("text") or ""
                choice.text.append(text)
                carried = bool(text)
            self.pieces += carried
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
            choice.add_logprobs(raw.get("logprobs"))

    @staticmethod
    def _add_delta(choice: _Choice, delta: Mapping[str, Any]) -> bool:
        if delta.get("role"):
            choice.role = delta["role"]
        content = delta.get("content") or ""
        reasoning = delta.get("reasoning_content") or ""
        choice.text.append(content)
        choice.reasoning.append(reasoning)
        for call in delta.get("tool_calls") or ():
            choice.add_tool_call(call)
        return bool(content or reasoning or delta.get("tool_calls"))

    def answer(self) -> dict[str, Any]:
        """The unstreamed answer: OpenAI's ``chat.completion`` or ``text_completion`` object."""
        out = dict(self._head)
        obj = str(out.get("object") or ("chat.completion.chunk" if self._chat else ""))
        out["object"] = _ANSWER_OBJECT.get(obj, obj or "text_completion")
        out["choices"] = [self._choice(i, c) for i, c in sorted(self._choices.items())]
        if self.usage is not None:
            out["usage"] = self.usage
        if self.timings is not None:
            out["timings"] = self.timings
        return out

    def _choice(self, index: int, c: _Choice) -> dict[str, Any]:
        text = "".join(c.text)
        out: dict[str, Any] = {"index": index}
        if self._chat:
            calls = [call for _, call in sorted(c.tool_calls.items())]
            # OpenAI's shape: no text beside tool calls is null, not "".
            message: dict[str, Any] = {"role": c.role, "content": text or (None if calls else "")}
            reasoning = "".join(c.reasoning)
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["text"] = text
        out["logprobs"] = c.logprobs
        out["finish_reason"] = c.finish_reason
        return out
