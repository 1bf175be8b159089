"""``residency run MODEL [PROMPT]``: load the model with a progress line, then answer one prompt
(or stdin when it is not a terminal) or chat interactively, streaming; Ctrl-C cancels the answer
being generated (the connection closes, the server stops the runner's request) and keeps the chat.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from typing import Any, TextIO

from residency.cli_client import Client, ServerError

__all__ = ["cmd_run"]

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_HELP = """Available commands:
  /set parameter NAME VALUE   set a request option (num_predict, temperature, num_ctx…)
  /clear    forget the conversation so far
  /bye      exit
  /?        this help
Ctrl-C stops the answer being written; Ctrl-D or /bye exits.
"""


def cmd_run(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    extra: dict[str, Any] = {}
    if args.keepalive is not None:
        extra["keep_alive"] = args.keepalive
    try:
        load_with_progress(client, args.model, extra, sys.stderr)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    options: dict[str, Any] = {}
    for item in args.parameter:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            sys.stderr.write(f"Error: --parameter {item!r}: expected NAME=VALUE\n")
            return 2
        options[name] = _value(raw)
    if prompt:
        return _one_shot(client, args, prompt, {**extra, "options": options}, out)
    return _chat(client, args.model, extra, options, out)


def load_with_progress(client: Client, model: str, extra: dict[str, Any], err: TextIO) -> None:
    """Loads the model (an empty request, as Ollama's CLI sends), drawing a progress line on a
    terminal while it waits; raises ServerError as the load failed."""
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            body = {"model": model, "stream": False, **extra}
            client.call("POST", "/api/generate", body, long=True)
            result.append(None)
        except BaseException as exc:  # handed to the main thread
            result.append(exc)

    worker = threading.Thread(target=load, name="residency-run-load", daemon=True)
    started = time.monotonic()
    worker.start()
    tty = err.isatty()
    drawn = False
    for frame in itertools.cycle(_SPINNER):
        worker.join(0.1)
        if not worker.is_alive():
            break
        if tty:
            err.write(f"\r{frame} loading {model} ({time.monotonic() - started:.1f} s) ")
            err.flush()
            drawn = True
    if drawn:
        err.write("\r\033[K")
        err.flush()
    if result and result[0] is not None:
        raise result[0]


def _one_shot(
    client: Client, args: argparse.Namespace, prompt: str, extra: dict[str, Any], out: TextIO
) -> int:
    body = {"model": args.model, "prompt": prompt, **extra}
    if args.json:
        json.dump(client.call("POST", "/api/generate", {**body, "stream": False}, long=True), out)
        out.write("\n")
        return 0
    try:
        for chunk in client.stream("/api/generate", body):
            out.write(chunk.get("response", ""))
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    out.write("\n")
    return 0


def _set(text: str, options: dict[str, Any]) -> str:
    """``/set parameter NAME VALUE`` as in Ollama: a number, true/false, or text."""
    words = text.split(maxsplit=3)
    if len(words) != 4 or words[1] != "parameter":
        return "Usage: /set parameter NAME VALUE"
    name, raw = words[2], words[3]
    options[name] = _value(raw)
    return f"Set parameter '{name}' to '{raw}'"


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _chat(
    client: Client, model: str, extra: dict[str, Any], options: dict[str, Any], out: TextIO
) -> int:
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\nUse Ctrl + d or /bye to exit.\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit"):
            return 0
        if text in ("/?", "/help"):
            out.write(_HELP)
            continue
        if text == "/clear":
            messages.clear()
            out.write("Cleared session context\n")
            continue
        if text.startswith("/set"):
            out.write(_set(text, options) + "\n")
            continue
        if text.startswith("/"):
            out.write(f"Unknown command {text.split()[0]!r}. Type /? for help\n")
            continue
        messages.append({"role": "user", "content": line})
        answer = _answer(client, model, messages, {**extra, "options": options}, out)
        if answer is None:
            messages.pop()  # cancelled: the question stays unanswered, and out of the history
        else:
            messages.append({"role": "assistant", "content": answer})


def _answer(
    client: Client,
    model: str,
    messages: list[dict[str, str]],
    extra: dict[str, Any],
    out: TextIO,
) -> str | None:
    parts: list[str] = []
    stream = client.stream("/api/chat", {"model": model, "messages": messages, **extra})
    try:
        for chunk in stream:
            piece = (chunk.get("message") or {}).get("content", "")
            parts.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stream.close()  # closes the connection: the server cancels the generation
        out.write("\n")
        return None
    except ServerError as err:
        sys.stderr.write(f"\nError: {err}\n")
        return None
    out.write("\n\n")
    return "".join(parts)
