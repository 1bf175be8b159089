"""Any OpenAI-compatible server (vLLM, a llama.cpp fork, a test double) from an argv template."""

from __future__ import annotations

import string
from typing import ClassVar

from residency.errors import ConfigError
from residency.runners.base import LOOPBACK, Runner

__all__ = ["PLACEHOLDERS", "CommandRunner"]

PLACEHOLDERS = (
    "model",
    "name",
    "port",
    "host",
    "ctx",
    "parallel",
    "gpu_layers",
    "kv_type",
    "device",
)


class CommandRunner(Runner):
    """Formats each element of the template with the placeholders; never runs a shell."""

    kind: ClassVar[str] = "command"
    supports_offload: ClassVar[bool] = False

    def argv(self) -> list[str]:
        s = self.spec
        template = s.command
        if not template:
            raise ConfigError(f"model {s.name!r}: runner 'command' needs a command template")
        values = {
            "model": str(s.model_path),
            "name": s.name,
            "port": str(self.port),
            "host": LOOPBACK,
            "ctx": str(s.ctx),
            "parallel": str(s.parallel),
            "gpu_layers": str(s.gpu_layers),
            "kv_type": s.kv_type,
            "device": s.device,
        }
        argv = []
        for part in template:
            for _, fname, _, _ in string.Formatter().parse(part):
                if fname is not None and fname not in values:
                    raise ConfigError(
                        f"model {s.name!r}: unknown placeholder {{{fname}}} in command "
                        f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
                    )
            argv.append(part.format_map(values))
        return argv
