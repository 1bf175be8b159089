"""Runner kinds behind one interface (`Runner`): llama-server, llama-cpp-python, command, and
"auto" (llama-server when there is one, else llama-cpp-python)."""

from __future__ import annotations

from residency.errors import ConfigError
from residency.runners.base import LaunchSpec, Runner, free_port
from residency.runners.command import CommandRunner
from residency.runners.llama import LlamaCppPythonRunner, LlamaServerRunner

__all__ = [
    "RUNNER_KINDS",
    "CommandRunner",
    "LaunchSpec",
    "LlamaCppPythonRunner",
    "LlamaServerRunner",
    "Runner",
    "free_port",
    "runner_class",
]

RUNNER_KINDS: dict[str, type[Runner]] = {
    cls.kind: cls for cls in (LlamaCppPythonRunner, LlamaServerRunner, CommandRunner)
}


def runner_class(kind: str) -> type[Runner]:
    """The class for a runner kind ("auto" is resolved first: runners.choice.resolve_kind)."""
    try:
        return RUNNER_KINDS[kind]
    except KeyError:
        raise ConfigError(
            f"unknown runner kind {kind!r} (known: {', '.join(sorted(RUNNER_KINDS))})"
        ) from None
