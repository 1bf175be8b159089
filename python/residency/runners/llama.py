"""The two llama.cpp runner kinds: llama-cpp-python's server and llama.cpp's own `llama-server`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

from residency.errors import ConfigError
from residency.llamacpp import KV_CACHE_TYPES, needs_flash_attn, slots_ctx_size
from residency.runners.base import LOOPBACK, LaunchSpec, Runner
from residency.runners.build import find_llama_server
from residency.runners.kvcache import SlotPersistence, cache_key

__all__ = [
    "LlamaCppPythonRunner",
    "LlamaServerRunner",
    "kv_type_id",
    "llama_server_estimate_options",
]

# llama-cpp-python has no template for GGUFs that ship none; these families have a built-in format.
_CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama-2"}


# llama-server's built-in templates for GGUFs that ship none (llama_chat_template names).
_SERVER_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama2"}


def _declares_pooling(model_path: Path) -> bool:
    """Whether the GGUF names a pooling type (an embedding model); unreadable: assume it does."""
    from residency.gguf_header import read_header

    try:
        meta = read_header(model_path).metadata
    except (OSError, ValueError):
        return True
    return f"{meta.get('general.architecture')}.pooling_type" in meta


def kv_type_id(kv_type: str) -> int:
    """ggml's numeric type for a KV cache type name ("f16", "q8_0"), as llama-cpp-python wants."""
    kv = KV_CACHE_TYPES.get(kv_type.lower())
    if kv is None:
        raise ConfigError(f"unknown KV cache type {kv_type!r} (one of {', '.join(KV_CACHE_TYPES)})")
    return kv.type_id


def llama_server_estimate_options(
    *,
    ctx: int,
    parallel: int,
    kv_type: str,
    embedding: bool = False,
    swa_full: bool = False,
    flash_attention: bool | None = None,
) -> dict[str, Any]:
    """The estimator's options for the command line LlamaServerRunner builds (``ctx`` per slot)."""
    return {
        "ctx": slots_ctx_size(ctx, parallel),
        "parallel": parallel,
        "kv_type": kv_type,
        "embeddings": embedding,
        "swa_full": swa_full,
        # As set (`--flash-attn on|off`), else llama-server's default `-fa auto`: on unless
        # CUDA lacks the model's head size.
        "flash_attn": "auto" if flash_attention is None else flash_attention,
        # It reserves logits for one token per slot (all of a batch only when serving embeddings).
        "n_outputs": None if embedding else parallel,
    }


class LlamaCppPythonRunner(Runner):
    """``python -m llama_cpp.server``: the embedded default. It serves one request at a time
    (`parallel` is accepted but the server serialises requests)."""

    kind: ClassVar[str] = "llama-cpp-python"
    supports_offload: ClassVar[bool] = True
    default_health_path: ClassVar[str] = "/v1/models"
    # Embeddings on does not stop generation (checked with Gemma 3 270M), so /api/embed works
    # with any model as in Ollama; it costs a larger output buffer.
    default_embedding: ClassVar[bool] = True

    @classmethod
    def estimate_options(
        cls,
        *,
        ctx: int,
        parallel: int,
        kv_type: str,
        embedding: bool | None,
        flash_attention: bool | None = None,
        kv_persist: bool = False,
    ) -> dict[str, Any]:
        if embedding is None:
            embedding = cls.default_embedding
        # n_batch 512 and llama.cpp's full-size sliding-window cache. With --embedding it also
        # sets n_seq_max = min(n_batch, 256) over one unified KV cache, which grows the output
        # buffer by ~256 MiB (measured by the estimator's llama.cpp comparison). It serves one
        # request at a time, whatever `parallel` says.
        opts: dict[str, Any] = {
            "ctx": ctx,
            "parallel": 1,
            "kv_type": kv_type,
            "embeddings": embedding,
            "batch": 512,
            "swa_full": True,
            # As set (--flash_attn), else on exactly for a quantised V cache, as the runner does.
            "flash_attn": flash_attention,
        }
        if embedding:
            opts.update(parallel=256, kv_unified=True)
        return opts

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
            "--embedding",
            "true" if self.embedding else "false",
            # The server's default (true) keeps n_ctx x n_vocab float32 logits: 32 GiB for
            # Gemma 3 at its 32k training context. Only logprobs need them.
            "--logits_all",
            "false",
            # Its default ends a running request when another arrives (an empty 200 answer);
            # with one slot, requests must wait their turn instead.
            "--interrupt_requests",
            "false",
            # Verbose: llama.cpp's buffer-size lines are how the runner reports its memory.
            "--verbose",
            "true",
        ]
        if s.kv_type.lower() != "f16":
            kv = str(kv_type_id(s.kv_type))
            argv += ["--type_k", kv, "--type_v", kv]
        flash = needs_flash_attn(s.kv_type) if s.flash_attention is None else s.flash_attention
        if flash or s.flash_attention is not None:
            argv += ["--flash_attn", "true" if flash else "false"]
        chat_format = s.chat_format
        details = s.details
        if chat_format is None and not details.get("has_chat_template", True):
            chat_format = _CHAT_FORMATS.get(str(details.get("family", "")))
        if chat_format:
            argv += ["--chat_format", str(chat_format)]
        return argv + list(s.args)


class LlamaServerRunner(Runner):
    """llama.cpp's ``llama-server`` binary: configured, on PATH, or built by residency
    (runners.build). Its slots are saved before it stops and restored into its successor
    (runners.kvcache) unless KV persistence is off for the model."""

    kind: ClassVar[str] = "llama-server"
    supports_offload: ClassVar[bool] = True
    default_health_path: ClassVar[str] = "/health"  # 503 while loading, 200 when ready
    # Printed right after /health turns 200 ("llama_server: model loaded").
    ready_marker: ClassVar[str | None] = "model loaded"
    # With --embeddings this llama-server still serves completions (checked with the vendored
    # build and Gemma 3 270M), so /api/embed works with any model, as in Ollama.
    default_embedding: ClassVar[bool] = True

    def __init__(self, spec: LaunchSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        kv = spec.kv
        self.kv: SlotPersistence | None = None
        if kv is not None:
            try:
                binary: Path | None = self.binary()
            except ConfigError:
                binary = None  # argv() says why
            key = cache_key(
                spec.model_path, ctx=spec.ctx, kv_type=spec.kv_type, args=spec.args, binary=binary
            )
            self.kv = SlotPersistence(
                self.client, model=spec.name, key=key, config=kv, slots=spec.parallel
            )
            self.api.before_send = self.kv.before_send

    @classmethod
    def estimate_options(
        cls,
        *,
        ctx: int,
        parallel: int,
        kv_type: str,
        embedding: bool | None,
        flash_attention: bool | None = None,
        kv_persist: bool = False,
    ) -> dict[str, Any]:
        return llama_server_estimate_options(
            ctx=ctx,
            parallel=parallel,
            kv_type=kv_type,
            embedding=cls.default_embedding if embedding is None else embedding,
            swa_full=kv_persist,  # KV persistence runs it with --swa-full
            flash_attention=flash_attention,
        )

    def binary(self) -> Path:
        found = find_llama_server(self.spec.binary)
        if found is None:
            raise ConfigError(
                f"model {self.spec.name!r} uses runner 'llama-server', but none is configured, "
                "on PATH or built (run `residency build-runner`, or set `llama_server`)"
            )
        return found

    def argv(self) -> list[str]:
        s = self.spec
        argv = [
            str(self.binary()),
            "--model",
            str(s.model_path),
            "--alias",
            s.name,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--ctx-size",
            str(slots_ctx_size(s.ctx, s.parallel)),
            "--parallel",
            str(s.parallel),
            "--n-gpu-layers",
            str((999 if s.gpu_layers < 0 else s.gpu_layers) if s.on_gpu else 0),
            "--cache-type-k",
            s.kv_type,
            "--cache-type-v",
            s.kv_type,
            # llama.cpp logs its buffer lines at "trace" (4): how the runner reports its memory.
            "--verbosity",
            "4",
            # Its host-RAM prompt cache (default 8 GiB per runner) is memory no estimate counts,
            # and with idle-slot caching it may clear a slot whose KV we would save at stop.
            "--cache-ram",
            "0",
        ]
        if s.flash_attention is not None:  # else its own "auto"
            argv += ["--flash-attn", "on" if s.flash_attention else "off"]
        if self.kv is not None:
            self.kv.directory.mkdir(parents=True, exist_ok=True)
            # A sliding-window cache keeps only the window: a restored slot would be reprocessed
            # in full ("lack of cache data"). The full-size one is reusable.
            argv += ["--slot-save-path", str(self.kv.directory), "--swa-full"]
        if s.projectors:  # a vision model's projector, as Ollama's store keeps it beside it
            argv += ["--mmproj", str(s.projectors[0])]
        if self.embedding:
            argv.append("--embeddings")
            if not _declares_pooling(s.model_path):
                # A generative model pools nothing, and /v1/embeddings refuses unpooled output.
                argv += ["--pooling", "mean"]
        template = s.chat_format
        if template is None and not s.details.get("has_chat_template", True):
            template = _SERVER_TEMPLATES.get(str(s.details.get("family", "")))
        if template:
            # A llama.cpp built-in template by name (Jinja would read the name as a template).
            argv += ["--no-jinja", "--chat-template", template]
        return argv + list(s.args)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        if self.kv is not None:
            # /slots then shows each slot's prompt text, which saved files are matched by.
            env.setdefault("LLAMA_SERVER_SLOTS_DEBUG", "1")
        return env

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """Saves the slots (bounded by the KV settings' save_timeout_s), then stops."""
        alive = not self.stopping and not self.exited and self.stalled is None
        if self.kv is not None and alive and self.ready_at_s:
            await self.kv.save_all()
        return await super().stop(timeout_s)
