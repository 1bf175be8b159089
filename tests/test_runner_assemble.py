"""A streamed answer assembled into the unstreamed one (runners/assemble.py): chat text, reasoning,
tool calls split over chunks, completions with logprobs, usage and timings from the last chunk."""

from __future__ import annotations

from typing import Any

from residency.runners.assemble import Assembly


def _chat(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [choice],
        **extra,
    }


def test_chat_text_reasoning_and_usage() -> None:
    a = Assembly()
    for event in (
        _chat({"role": "assistant", "content": None}),
        _chat({"reasoning_content": "Let me "}),
        _chat({"reasoning_content": "think."}),
        _chat({"content": "Hel"}),
        _chat({"content": "lo"}),
        _chat({}, "stop"),
        {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"x": 1}},
    ):
        a.add(event)
    assert a.pieces == 4
    assert a.answer() == {
        "id": "c1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello",
                    "reasoning_content": "Let me think.",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"x": 1},
    }


def test_tool_calls_split_over_chunks_come_back_whole() -> None:
    a = Assembly()
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_w"}}
    a.add(_chat({"role": "assistant", "tool_calls": [first]}))
    a.add(_chat({"tool_calls": [{"index": 0, "function": {"name": "eather", "arguments": '{"c'}}]}))
    a.add(_chat({"tool_calls": [{"index": 0, "function": {"arguments": 'ity": "Oslo"}'}}]}))
    a.add(_chat({}, "tool_calls", timings={"predicted_n": 9}))
    answer = a.answer()
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None  # OpenAI's shape beside tool calls
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        }
    ]
    assert answer["timings"] == {"predicted_n": 9}


def test_completion_text_and_logprobs_are_joined() -> None:
    a = Assembly()
    for token, finish in (("A", None), ("B", None), ("", "length")):
        lp = {"tokens": [token], "token_logprobs": [-0.5], "top_logprobs": [None]}
        a.add(
            {
                "id": "t",
                "object": "text_completion",
                "model": "m",
                "choices": [{"index": 0, "text": token, "logprobs": lp, "finish_reason": finish}],
            }
        )
    answer = a.answer()
    assert answer["object"] == "text_completion"
    (choice,) = answer["choices"]
    assert choice["text"] == "AB"
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["A", "B", ""]
    assert a.pieces == 2
    assert "usage" not in answer  # a runner that streams none: the caller counts
