"""The estimator's options checked and resolved as llama.cpp resolves them (padding, the
per-sequence context, flash attention, outputs, layers on the GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from residency.errors import EstimateError
from residency.estimate._buffers import host_repacks, pad
from residency.estimate._gguf import ModelInfo
from residency.llamacpp import KV_CACHE_TYPES, needs_flash_attn

LLAMA_MAX_SEQ = 256  # llama-cparams.h
PAD = 256  # llama.cpp pads n_ctx, n_ctx_seq and the SWA cache to 256 cells


@dataclass(frozen=True)
class Options:
    n_ctx: int
    n_ctx_seq: int
    n_seq: int
    n_stream: int
    n_batch: int
    n_ubatch: int
    n_outputs: int
    kv_type: str
    flash_attn: bool
    swa_full: bool
    kv_unified: bool
    embeddings: bool
    gpu_layers: int  # resolved: 0 .. n_layer + 1
    on_gpu: bool
    gpu_overhead_bytes: int
    cpu_repack: bool


# ---- resolving ---------------------------------------------------------------------------------


def _positive_int(path: Path, name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EstimateError(f"{path}: {name} must be an integer >= {minimum}, not {value!r}")
    return value


def resolve_options(
    info: ModelInfo,
    *,
    ctx: int,
    parallel: int,
    kv_type: str,
    batch: int,
    ubatch: int,
    gpu_layers: int | Literal["all"],
    device: str,
    gpu_overhead_bytes: int,
    flash_attn: bool | Literal["auto"] | None,
    swa_full: bool,
    kv_unified: bool,
    embeddings: bool,
    cpu_repack: bool | None,
    n_outputs: int | None,
) -> Options:
    p = info.path
    ctx = _positive_int(p, "ctx", ctx, minimum=0)
    parallel = _positive_int(p, "parallel", parallel)
    if parallel > LLAMA_MAX_SEQ:
        raise EstimateError(
            f"{p}: parallel must be <= {LLAMA_MAX_SEQ} (llama.cpp's limit), not {parallel}"
        )
    batch = _positive_int(p, "batch", batch)
    ubatch = _positive_int(p, "ubatch", ubatch)
    kv = kv_type.lower() if isinstance(kv_type, str) else kv_type
    if kv not in KV_CACHE_TYPES:
        raise EstimateError(
            f"{p}: unknown KV cache type {kv_type!r} (one of {', '.join(KV_CACHE_TYPES)})"
        )
    quantized = needs_flash_attn(kv)
    if flash_attn not in (None, True, False, "auto"):
        raise EstimateError(f"{p}: flash_attn must be True, False, None or 'auto'")
    if flash_attn is False and quantized:
        raise EstimateError(
            f"{p}: a quantised V cache ({kv}) needs flash attention; llama.cpp refuses it"
        )
    block = KV_CACHE_TYPES[kv].block
    if block > 1 and (info.head_dim_k % block or info.head_dim_v % block):
        raise EstimateError(
            f"{p}: KV cache type {kv} has blocks of {block}, which do not divide the head size "
            f"{info.head_dim_k}; llama.cpp refuses it"
        )
    if device not in ("cpu", "gpu"):
        raise EstimateError(f"{p}: device must be 'cpu' or 'gpu', not {device!r}")
    if (
        isinstance(gpu_overhead_bytes, bool)
        or not isinstance(gpu_overhead_bytes, int)
        or gpu_overhead_bytes < 0
    ):
        raise EstimateError(f"{p}: gpu_overhead_bytes must be a non-negative integer")
    if gpu_layers == "all":
        layers = info.n_layer + 1
    else:
        layers = min(_positive_int(p, "gpu_layers", gpu_layers, minimum=0), info.n_layer + 1)
    on_gpu = device == "gpu" and layers > 0
    if not on_gpu:
        layers = 0
    if flash_attn == "auto":
        # llama_context::resolve_fused_ops: a quantised V cache forces it on; otherwise it stays on
        # unless a GPU layer's attention would fall back to the CPU. The CPU runs every head size.
        fa = quantized or not on_gpu or _cuda_flash_attn_supported(info)
    else:
        fa = quantized if flash_attn is None else bool(flash_attn)
    if n_outputs is not None:
        n_outputs = _positive_int(p, "n_outputs", n_outputs)

    # llama_context::llama_context
    n_ctx = pad(ctx or info.n_ctx_train or 4096, PAD)
    n_batch = min(n_ctx, batch)  # causal attention: the batch never exceeds the context
    n_ubatch = min(n_batch, ubatch)
    if kv_unified:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = pad(n_ctx // parallel, PAD)
        n_ctx = n_ctx_seq * parallel
    return Options(
        n_ctx=n_ctx,
        n_ctx_seq=n_ctx_seq,
        n_seq=parallel,
        n_stream=1 if kv_unified else parallel,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        n_outputs=min(n_batch, n_outputs) if n_outputs is not None else n_batch,
        kv_type=kv,
        flash_attn=fa,
        swa_full=swa_full,
        kv_unified=kv_unified,
        embeddings=embeddings,
        gpu_layers=layers,
        on_gpu=on_gpu,
        gpu_overhead_bytes=gpu_overhead_bytes,
        cpu_repack=(device != "gpu" and host_repacks()) if cpu_repack is None else cpu_repack,
    )


#: (K, V) head sizes ggml-cuda's flash-attention kernels run (fattn.cu); others run on the CPU.
_CUDA_FA_HEADS = {(d, d) for d in (40, 64, 72, 80, 96, 112, 128, 256, 512)} | {
    (192, 128),
    (320, 256),
    (576, 512),
}


def _cuda_flash_attn_supported(info: ModelInfo) -> bool:
    return (info.head_dim_k, info.head_dim_v) in _CUDA_FA_HEADS


# ---- the estimate --------------------------------------------------------------------------------
