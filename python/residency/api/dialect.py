"""OpenAI requests in the form the runner accepts: translated, never forwarded blindly.

Clients speak newer OpenAI than llama.cpp's servers do (``max_completion_tokens``, the
``developer`` role, ``json_schema`` response formats, assistant messages with ``content: null``),
and some models' chat templates know no ``tool`` role. Each such field is mapped to what the runner
reads; what cannot be served gets a precise 400 here, before a model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_core import from_json

from residency.api._types import LeaseLike
from residency.api.errors import ApiError
from residency.errors import ResidencyError

__all__ = [
    "chat_fields",
    "check_completion",
    "check_embedding_input",
    "choices_wanted",
    "merged_answers",
    "prompt_tokens",
    "runner_messages",
]

_RESPONSE_TYPES = ("text", "json_object", "json_schema")


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, code=f"invalid_{param}")


def _response_format(fmt: Any) -> dict[str, Any] | None:
    """OpenAI's response_format as llama.cpp's servers read it (a schema on ``json_object``:
    grammar-constrained output in both llama-server and llama-cpp-python)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in _RESPONSE_TYPES:
        raise _bad(f"response_format.type must be one of {', '.join(_RESPONSE_TYPES)}", "format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return fmt
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise _bad("response_format json_schema needs json_schema.schema (an object)", "format")
    return {"type": "json_object", "schema": schema}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def runner_messages(
    messages: list[dict[str, Any]], *, template_tools: bool
) -> list[dict[str, Any]]:
    """`developer` → `system`, `content: null` → "", and — for a template that knows no tools —
    tool calls and results written as the plain turns it accepts (alternating user/assistant)."""
    out: list[dict[str, Any]] = []
    for original in messages:
        m = dict(original)
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("content") is None:
            m["content"] = ""
        if not template_tools:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = [c.get("function", {}) for c in m.pop("tool_calls")]
                said = "\n".join(
                    f"Calling tool {c.get('name', '')} with {_text(c.get('arguments'))}"
                    for c in calls
                )
                m["content"] = (m["content"] + "\n" + said).strip()
            elif m.get("role") == "tool":
                name = m.pop("name", None) or m.get("tool_call_id", "")
                m = {"role": "user", "content": f"Result of tool {name}: {_text(m['content'])}"}
        if out and not template_tools and out[-1]["role"] == m["role"] != "system":
            # Merged: templates such as Gemma's refuse two turns of one role in a row.
            out[-1]["content"] = _text(out[-1]["content"]) + "\n\n" + _text(m["content"])
            continue
        out.append(m)
    return out


def choices_wanted(fields: dict[str, Any], *, stream: bool) -> int:
    """How many choices the client asked for (`n`); several are served one by one, unstreamed."""
    n = fields.pop("n", None)
    if n is None:
        return 1
    if not isinstance(n, int) or n < 1 or n > 16:
        raise _bad("n must be an integer from 1 to 16", "n")
    if n > 1 and stream:
        raise _bad("n > 1 is served only without streaming; send stream: false", "n")
    return n


def chat_fields(fields: dict[str, Any], *, template_tools: bool) -> dict[str, Any]:
    """The client's chat request fields, in the runner's dialect (changed in place)."""
    limit = fields.pop("max_completion_tokens", None)
    if limit is not None and fields.get("max_tokens") is None:
        fields["max_tokens"] = limit
    fmt = _response_format(fields.pop("response_format", None))
    if fmt is not None:
        fields["response_format"] = fmt
    fields["messages"] = runner_messages(fields["messages"], template_tools=template_tools)
    return fields


def check_completion(prompt: Any) -> list[str]:
    """/v1/completions prompts as texts (a list is served one by one); token ids are refused."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise _bad("prompt must not be an empty list", "prompt")
        return list(prompt)
    raise _bad("prompt as token ids is not supported; send the text (or a list of texts)", "prompt")


def check_embedding_input(value: Any) -> None:
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return
    raise _bad("input as token ids is not supported; send the text (or a list of texts)", "input")


def merged_answers(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runner answers (one per prompt and choice) as one, choices numbered in order and
    usage summed (the prompt counted once per distinct prompt, as OpenAI counts it). A single
    answer passes unchanged: its usage keeps what the runner adds (cached prompt tokens)."""
    out = dict(answers[0])
    if len(answers) == 1:
        out.pop("_prompt_key", None)
        return out
    choices: list[dict[str, Any]] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    prompts_seen: set[str] = set()
    for answer, key in ((a, str(a.get("_prompt_key", ""))) for a in answers):
        for choice in answer.get("choices") or ():
            choices.append({**choice, "index": len(choices)})
        u = answer.get("usage") or {}
        if key not in prompts_seen:
            prompts_seen.add(key)
            usage["prompt_tokens"] += int(u.get("prompt_tokens") or 0)
        usage["completion_tokens"] += int(u.get("completion_tokens") or 0)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    out.pop("_prompt_key", None)
    out["choices"] = choices
    out["usage"] = usage
    return out


#: Chat fields that change the rendered prompt (a template may render the tools).
_PROMPT_FIELDS = ("messages", "tools", "tool_choice", "chat_template_kwargs")


async def prompt_tokens(lease: LeaseLike, fields: Mapping[str, Any]) -> int | None:
    """The prompt's tokens as the runner counts them, for one that reports none when streaming
    (llama-cpp-python). A raw prompt: the runner's tokenizer, which counts it as the runner
    does. A chat: the prompt is what the runner's chat template renders — special tokens, role
    headers, a generation prompt — so its messages' text alone undercounts (12 tokens for
    Gemma's one-line "Say hello.", 4 without the template). The runner is asked the same chat
    unstreamed, for one token: its usage is the rendered prompt's count, and the prompt is
    already in its cache, so this costs one token of work. None: the runner cannot count."""
    text = fields.get("prompt")
    try:
        if isinstance(text, str):
            counted = await lease.api.complete("/extras/tokenize/count", {"input": text})
            return int(from_json(counted)["count"])
        body = {k: fields[k] for k in _PROMPT_FIELDS if k in fields}
        body.update(model=fields.get("model"), stream=False, max_tokens=1)
        answer = from_json(await lease.api.complete("/v1/chat/completions", body))
        return int(answer["usage"]["prompt_tokens"])
    except (ResidencyError, ValueError, TypeError, KeyError):
        return None
