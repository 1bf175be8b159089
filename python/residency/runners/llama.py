"""The two llama.cpp runner kinds: llama-cpp-python's server and llama.cpp's own `llama-server`."""

from __future__ import annotations

import shutil
import sys
from typing import ClassVar

from residency.errors import ConfigError
from residency.runners.base import LOOPBACK, Runner

__all__ = ["LlamaCppPythonRunner", "LlamaServerRunner", "kv_type_id"]

# llama-cpp-python has no template for GGUFs that ship none; these families have a built-in format.
_CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama-2"}


def kv_type_id(kv_type: str) -> int:
    """ggml's numeric type for a KV cache type name ("f16", "q8_0"), as llama-cpp-python wants."""
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[kv_type.upper()].value)
    except KeyError:
        raise ConfigError(f"unknown KV cache type {kv_type!r} (e.g. f16, q8_0, q4_0)") from None


class LlamaCppPythonRunner(Runner):
    """``python -m llama_cpp.server``: the embedded default. It serves one request at a time
    (`parallel` is accepted but the server serialises requests)."""

    kind: ClassVar[str] = "llama-cpp-python"
    supports_offload: ClassVar[bool] = True
    default_health_path: ClassVar[str] = "/v1/models"

    def argv(self) -> list[str]:
        s = self.spec
        argv = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(s.model_path),
            "--model_alias",
            s.name,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--n_ctx",
            str(s.ctx),
            "--n_gpu_layers",
            str(s.gpu_layers if s.on_gpu else 0),
            # mlock needs an RLIMIT_MEMLOCK most containers lack; residency budgets memory itself.
            "--use_mlock",
            "false",
            # Embeddings on does not stop generation (checked with Gemma 3 270M), so /api/embed
            # works with any model as in Ollama; it costs a larger output buffer.
            "--embedding",
            "true" if s.extra.get("embedding", True) else "false",
            # Verbose: llama.cpp's buffer-size lines are how the runner reports its memory.
            "--verbose",
            "true",
        ]
        if s.kv_type.lower() != "f16":
            kv = str(kv_type_id(s.kv_type))
            argv += ["--type_k", kv, "--type_v", kv]
            if s.kv_type.lower() != "f32":
                argv += ["--flash_attn", "true"]  # llama.cpp needs it for a quantised V cache
        chat_format = s.extra.get("chat_format")
        details = s.extra.get("details") or {}
        if chat_format is None and not details.get("has_chat_template", True):
            chat_format = _CHAT_FORMATS.get(str(details.get("family", "")))
        if chat_format:
            argv += ["--chat_format", str(chat_format)]
        return argv + list(s.args)


class LlamaServerRunner(Runner):
    """llama.cpp's ``llama-server`` binary (configured, or found on PATH)."""

    kind: ClassVar[str] = "llama-server"
    supports_offload: ClassVar[bool] = True
    default_health_path: ClassVar[str] = "/health"  # 503 while loading, 200 when ready

    def argv(self) -> list[str]:
        s = self.spec
        binary = s.extra.get("binary") or shutil.which("llama-server")
        if not binary:
            raise ConfigError(
                f"model {s.name!r} uses runner 'llama-server', but no llama-server is on PATH "
                "(set `llama_server` in the config to its path)"
            )
        argv = [
            str(binary),
            "--model",
            str(s.model_path),
            "--alias",
            s.name,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            # llama-server's context is shared by its slots: each slot gets ctx.
            "--ctx-size",
            str(s.ctx * s.parallel),
            "--parallel",
            str(s.parallel),
            "--n-gpu-layers",
            str((999 if s.gpu_layers < 0 else s.gpu_layers) if s.on_gpu else 0),
            "--cache-type-k",
            s.kv_type,
            "--cache-type-v",
            s.kv_type,
        ]
        # Older llama-servers serve only embeddings with --embeddings: off unless asked for.
        if s.extra.get("embedding") is True:
            argv.append("--embeddings")
        return argv + list(s.args)
