"""The bytes a GGUF model needs in llama.cpp, predicted from its header and tensor table.

:func:`estimate` predicts the buffers llama.cpp itself reports when it loads a model (the lines
``model buffer size``, ``KV buffer size``, ``output buffer size`` and ``compute buffer size`` of its
log), so a scheduler can budget memory before it starts a runner. :func:`fit_layers` answers how
many layers fit in a GPU budget. Each rule below follows the llama.cpp that llama-cpp-python 0.3.36
vendors; the functions it mirrors are named in the comments.

Meaning of the options (all keyword-only, llama.cpp's own semantics):

- ``ctx``: llama.cpp's ``n_ctx`` (``--ctx-size``), the context of the whole cache. With
  ``parallel`` sequences and no unified cache, each sequence gets ``ctx / parallel``, as in
  llama-server. ``0`` means the model's trained context.
- ``parallel``: ``n_seq_max`` (``--parallel``).
- ``kv_type``: the K and V cache type (``f16``, ``q8_0``, ``q4_0``, ...).
- ``batch`` / ``ubatch``: ``n_batch`` / ``n_ubatch``; the compute buffer scales with ``ubatch``.
- ``flash_attn``: ``None`` = on exactly when the V cache is quantised (llama.cpp refuses a quantised
  V cache without it), as llama-cpp-python's server passes it; ``"auto"`` = llama-server's default
  ``-fa auto``: on, unless a layer on the GPU has a head size CUDA's kernels lack (its attention
  would then fall back to the CPU, and llama.cpp turns flash attention off instead).
- ``n_outputs``: rows of logits the worst-case graph computes per micro-batch: ``None`` = every
  token (llama.cpp's default); llama-server asks for one per slot (``parallel``) unless it serves
  embeddings. With a large vocabulary this decides the compute buffer (Gemma 3: 512 MiB vs 1).
- ``swa_full``: a full-size cache for sliding-window layers (llama.cpp's C default is True, which
  llama-cpp-python inherits; llama-server defaults to False).
- ``kv_unified``: one cache stream shared by all sequences (each may then use all of ``ctx``).
- ``embeddings``: the context also returns embeddings (a larger output buffer).
- ``gpu_layers`` / ``device``: on ``device="gpu"``, llama.cpp's ``-ngl``: the output layer counts as
  the last layer, so it goes to the GPU first, then the last ``gpu_layers - 1`` repeating layers
  (``"all"``: everything; the input embeddings always stay on the host).
- ``gpu_overhead_bytes``: added once per GPU runner for the CUDA context, cuBLAS workspace and the
  allocator's slack that llama.cpp does not report (default :data:`DEFAULT_GPU_OVERHEAD_BYTES`).
- ``cpu_repack``: whether llama.cpp's CPU backend repacks quantised weights into an extra buffer
  (``CPU_REPACK``); ``None`` = as this machine's CPU does (AVX2 / AVX-512 / ARM dot-product), and
  never on ``device="gpu"``: a CUDA build prefers its pinned host buffer type for host weights,
  which the mmap'ed file then replaces (checked on an H100: no ``CPU_REPACK`` buffer).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from residency.errors import EstimateError
from residency.estimate._gguf import ModelInfo, TensorInfo, read_model
from residency.llamacpp import KV_CACHE_TYPES, needs_flash_attn

__all__ = [
    "DEFAULT_GPU_OVERHEAD_BYTES",
    "KV_TYPES",
    "Estimate",
    "LayerFit",
    "ModelInfo",
    "estimate",
    "fit_layers",
    "read_model",
    "seed_formula_bytes",
]

MiB = 1 << 20

#: What a CUDA runner holds beyond llama.cpp's buffer lines: the CUDA context, kernels, cuBLAS
#: workspace and ggml's pool. Measured on an H100 (driver 580, CUDA 13, llama-server built from the
#: llama.cpp llama-cpp-python 0.3.36 vendors; ``benchmarks/bench_gpu_estimate.py``): a bare CUDA
#: context takes 528 MiB; a llama-server 595-700 MiB once ready, 608-720 MiB after a 1,500-token
#: prompt (more without flash attention, whose cuBLAS path needs workspace). Ollama reserves a
#: similar fixed amount per GPU (``OLLAMA_GPU_OVERHEAD`` adds to it).
DEFAULT_GPU_OVERHEAD_BYTES = 768 * MiB

#: KV cache types -> (elements per block, bytes per block) (residency.llamacpp owns the table).
KV_TYPES: dict[str, tuple[int, int]] = {
    name: (t.block, t.block_bytes) for name, t in KV_CACHE_TYPES.items()
}

LLAMA_MAX_SEQ = 256  # llama-cparams.h
_PAD = 256  # llama.cpp pads n_ctx, n_ctx_seq and the SWA cache to 256 cells
_CUDA_ALIGN = 128
_CUDA_ROW_PADDING = 512  # ggml-cuda pads quantised rows to MATRIX_ROW_PADDING elements
_CUDA_OFFLOAD_MIN_BATCH = 32  # ggml-cuda takes host-weight ops of at least this many tokens

# Tensors looked up by row (GET_ROWS), never multiplied: the CPU backend never repacks them.
_NOT_MATMUL = ("token_embd.weight", "position_embd.weight", "token_types.weight")


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes, per component, for one model with one set of options."""

    path: Path
    #: Weights as llama.cpp allocates them: the host mapping (the span of the host tensors in the
    #: file), the CPU backend's repacked copies, and the GPU copies.
    weights_bytes: int
    #: File bytes of the repeating layers (``blk.N.*``) and of everything else (embeddings, output).
    weights_layers_bytes: int
    weights_other_bytes: int
    #: Of ``weights_bytes``: the ``CPU_REPACK`` buffer.
    weights_repack_bytes: int
    kv_bytes: int
    #: Of ``kv_bytes``: the sliding-window layers' cache.
    kv_swa_bytes: int
    output_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int
    gpu_bytes: int
    #: Of ``gpu_bytes``: the GPU's share of the weights, KV cache and compute buffer (llama.cpp's
    #: ``CUDA0`` lines); the rest of ``gpu_bytes`` is ``overhead_bytes``.
    gpu_weights_bytes: int
    gpu_kv_bytes: int
    gpu_compute_bytes: int
    host_bytes: int
    gpu_layers: int
    #: The effective context after llama.cpp's padding, per sequence and in total.
    n_ctx: int
    n_ctx_seq: int
    n_layers: int
    context_length: int
    family: str
    parameter_count: int
    quantization: str
    #: What the seed guidance's formula predicts for the same options, for comparison.
    seed_formula_bytes: int


@dataclass(frozen=True)
class LayerFit:
    """How many layers fit in a GPU budget, and where the bytes then go."""

    layers: int
    gpu_bytes: int
    host_bytes: int


@dataclass(frozen=True)
class _Options:
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


def estimate(
    path: str | os.PathLike[str],
    *,
    ctx: int = 4096,
    parallel: int = 1,
    kv_type: str = "f16",
    batch: int = 2048,
    ubatch: int = 512,
    gpu_layers: int | Literal["all"] = 0,
    device: Literal["cpu", "gpu"] = "cpu",
    gpu_overhead_bytes: int = DEFAULT_GPU_OVERHEAD_BYTES,
    flash_attn: bool | Literal["auto"] | None = None,
    swa_full: bool = False,
    kv_unified: bool = False,
    embeddings: bool = False,
    cpu_repack: bool | None = None,
    n_outputs: int | None = None,
) -> Estimate:
    """The bytes llama.cpp will allocate for ``path`` with these options (see the module doc)."""
    info = read_model(path)
    o = _options(
        info,
        ctx=ctx,
        parallel=parallel,
        kv_type=kv_type,
        batch=batch,
        ubatch=ubatch,
        gpu_layers=gpu_layers,
        device=device,
        gpu_overhead_bytes=gpu_overhead_bytes,
        flash_attn=flash_attn,
        swa_full=swa_full,
        kv_unified=kv_unified,
        embeddings=embeddings,
        cpu_repack=cpu_repack,
        n_outputs=n_outputs,
    )
    return _estimate(info, o)


def fit_layers(
    path: str | os.PathLike[str],
    budget_bytes: int,
    **options: object,
) -> LayerFit:
    """The most layers whose GPU share (weights, KV, compute, overhead) fits in ``budget_bytes``.

    Counts like ``-ngl``: 1 is the output layer alone, ``n_layers + 1`` everything. Zero layers
    means the GPU is not used at all (``gpu_bytes == 0``) and everything is on the host.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise EstimateError(
            f"{path}: the budget must be a non-negative number of bytes, not {budget_bytes!r}"
        )
    for key in ("gpu_layers", "device"):
        if key in options:
            raise EstimateError(f"{path}: fit_layers chooses {key} itself; do not pass it")
    info = read_model(path)
    # The GPU share grows with every layer, so the first fit from the top is the largest.
    for n in range(info.n_layer + 1, 0, -1):
        est = estimate(path, gpu_layers=n, device="gpu", **options)  # type: ignore[arg-type]
        if est.gpu_bytes <= budget_bytes:
            return LayerFit(layers=n, gpu_bytes=est.gpu_bytes, host_bytes=est.host_bytes)
    est = estimate(path, gpu_layers=0, device="cpu", **options)  # type: ignore[arg-type]
    return LayerFit(layers=0, gpu_bytes=0, host_bytes=est.host_bytes)


def seed_formula_bytes(info: ModelInfo, *, n_ctx: int, on_gpu: bool, overhead: int) -> int:
    """The seed guidance's rough formula: parameters x bytes per parameter + an f16 KV cache for
    every layer at the full context + 10 % (+ the GPU overhead). Shown beside the estimate."""
    weights = sum(t.n_bytes for t in info.tensors)  # parameters x their average bytes each
    kv = sum(
        n_ctx * 2 * (info.n_embd_k_gqa(il) + info.n_embd_v_gqa(il)) for il in range(info.n_layer)
    )
    return int((weights + kv) * 1.10) + (overhead if on_gpu else 0)


# ---- options -------------------------------------------------------------------------------------


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _positive_int(path: Path, name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EstimateError(f"{path}: {name} must be an integer >= {minimum}, not {value!r}")
    return value


def _options(
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
) -> _Options:
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
    if kv not in KV_TYPES:
        raise EstimateError(
            f"{p}: unknown KV cache type {kv_type!r} (one of {', '.join(KV_TYPES)})"
        )
    quantized = needs_flash_attn(kv)
    if flash_attn not in (None, True, False, "auto"):
        raise EstimateError(f"{p}: flash_attn must be True, False, None or 'auto'")
    if flash_attn is False and quantized:
        raise EstimateError(
            f"{p}: a quantised V cache ({kv}) needs flash attention; llama.cpp refuses it"
        )
    block = KV_TYPES[kv][0]
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
    n_ctx = _pad(ctx or info.n_ctx_train or 4096, _PAD)
    n_batch = min(n_ctx, batch)  # causal attention: the batch never exceeds the context
    n_ubatch = min(n_batch, ubatch)
    if kv_unified:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = _pad(n_ctx // parallel, _PAD)
        n_ctx = n_ctx_seq * parallel
    return _Options(
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
        cpu_repack=(device != "gpu" and _host_repacks()) if cpu_repack is None else cpu_repack,
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


def _estimate(info: ModelInfo, o: _Options) -> Estimate:
    i_gpu_start = max(info.n_layer + 1 - o.gpu_layers, 0) if o.on_gpu else info.n_layer + 1
    # llama.cpp counts the output layer as layer n_layer: -ngl 1 already puts it on the GPU.
    output_on_gpu = o.on_gpu

    def layer_on_gpu(il: int) -> bool:
        return il >= i_gpu_start

    # Weights (llama_model::load_tensors): the input layer always stays on the host.
    host: list[TensorInfo] = []
    gpu_weights = 0
    has_output = any(t.name == "output.weight" for t in info.tensors)
    for t in info.tensors:
        on_gpu = layer_on_gpu(t.layer) if t.layer is not None else (output_on_gpu and _is_output(t))
        if on_gpu:
            gpu_weights += _cuda_alloc_size(t)
        else:
            host.append(t)
    repacked = [t for t in host if o.cpu_repack and _repackable(t)]
    tied = (
        None
        if has_output
        else next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    )
    if tied is not None:
        # No output.weight: llama.cpp duplicates token_embd into the output layer's buffer.
        if output_on_gpu:
            gpu_weights += _cuda_alloc_size(tied)
        elif o.cpu_repack and _repackable(tied, as_output=True):
            repacked.append(tied)
    repack_bytes = sum(_pad(t.n_bytes, 32) for t in repacked)
    repacked_names = {t.name for t in repacked}
    mapped = [t for t in host if t.name not in repacked_names]
    # llama_model_loader::get_mapping_range: the mapping covers the span of the mapped tensors.
    host_weights = (
        max(t.offset + t.n_bytes for t in mapped) - min(t.offset for t in mapped) if mapped else 0
    ) + repack_bytes
    layers_bytes = sum(t.n_bytes for t in info.tensors if t.layer is not None)
    other_bytes = sum(t.n_bytes for t in info.tensors if t.layer is None)

    # KV cache (llama_kv_cache_iswa / llama_kv_cache): one K and one V tensor per layer and stream.
    size_base = o.n_ctx_seq
    size_swa = _pad(
        min(size_base, info.n_swa * (o.n_seq if o.kv_unified else 1) + o.n_ubatch), _PAD
    )
    if o.swa_full:
        size_swa = size_base
    v_trans = not o.flash_attn
    n_embd_v_max = max((info.n_embd_v_gqa(il) for il in range(info.n_layer)), default=0)
    kv_gpu = kv_host = kv_swa = 0
    host_layer_kv = 0  # the largest host layer's cache
    for il in range(info.n_layer):
        if not info.has_kv[il]:
            continue
        cells = size_swa if info.is_swa[il] else size_base
        n_v = n_embd_v_max if v_trans else info.n_embd_v_gqa(il)
        nbytes = (
            (_row_size(o.kv_type, info.n_embd_k_gqa(il)) + _row_size(o.kv_type, n_v))
            * cells
            * o.n_stream
        )
        if info.is_swa[il]:
            kv_swa += nbytes
        if layer_on_gpu(il):
            kv_gpu += nbytes
        else:
            kv_host += nbytes
            host_layer_kv = max(host_layer_kv, nbytes)

    # Output buffer (llama_context::output_reserve): logits (+ embeddings), one token per sequence.
    output = 4 * o.n_seq * (info.n_vocab + (info.n_embd if o.embeddings else 0))

    compute_host, compute_gpu = _compute(
        info,
        o,
        i_gpu_start=i_gpu_start,
        output_on_gpu=output_on_gpu,
        size_base=size_base,
        size_swa=size_swa,
        host_layer_kv=host_layer_kv,
    )
    overhead = o.gpu_overhead_bytes if o.on_gpu else 0

    gpu = gpu_weights + kv_gpu + compute_gpu + overhead
    host_total = host_weights + kv_host + output + compute_host
    weights = host_weights + gpu_weights
    return Estimate(
        path=info.path,
        weights_bytes=weights,
        weights_layers_bytes=layers_bytes,
        weights_other_bytes=other_bytes,
        weights_repack_bytes=repack_bytes,
        kv_bytes=kv_gpu + kv_host,
        kv_swa_bytes=kv_swa,
        output_bytes=output,
        compute_bytes=compute_host + compute_gpu,
        overhead_bytes=overhead,
        total_bytes=gpu + host_total,
        gpu_bytes=gpu,
        gpu_weights_bytes=gpu_weights,
        gpu_kv_bytes=kv_gpu,
        gpu_compute_bytes=compute_gpu,
        host_bytes=host_total,
        gpu_layers=o.gpu_layers,
        n_ctx=o.n_ctx,
        n_ctx_seq=o.n_ctx_seq,
        n_layers=info.n_layer,
        context_length=info.n_ctx_train,
        family=info.architecture,
        parameter_count=info.parameter_count,
        quantization=info.quantization,
        seed_formula_bytes=seed_formula_bytes(
            info, n_ctx=o.n_ctx, on_gpu=o.on_gpu, overhead=o.gpu_overhead_bytes
        ),
    )


def _compute(
    info: ModelInfo,
    o: _Options,
    *,
    i_gpu_start: int,
    output_on_gpu: bool,
    size_base: int,
    size_swa: int,
    host_layer_kv: int,
) -> tuple[int, int]:
    """Compute buffers (host, gpu): the peak of ggml's graph allocator on the worst-case graph.

    llama.cpp reserves the prompt-processing graph for one full micro-batch (``n_ubatch`` tokens,
    ``n_seq_max`` sequences, up to ``n_outputs`` of them outputs) and sizes each backend's buffer
    to the peak of tensors alive at once. That peak is one of three moments (measured against
    llama.cpp, see the tests): the largest attention layer, the largest feed-forward layer, or the
    output layer.
    Everywhere the per-token inputs (masks) stay alive until the last attention layer.
    """
    n_tok = o.n_ubatch
    n_out = min(n_tok, o.n_outputs)
    f32 = 4
    q_dim = max(info.n_head) * info.head_dim_k
    n_embd = info.n_embd
    any_swa = any(info.is_swa[il] and info.has_kv[il] for il in range(info.n_layer))
    any_full = any(not info.is_swa[il] and info.has_kv[il] for il in range(info.n_layer))

    # Masks (llm_graph_input_attn_kv*): one row per token over the sequence's cells; f16 with
    # flash attention, f32 without. The unified cache masks all cells for every token.
    mask_el = 2 if o.flash_attn else 4
    masks = 0
    if any_full:
        masks += size_base * n_tok * mask_el
    if any_swa:
        masks += size_swa * n_tok * mask_el
    # Per-token activations alive around attention: Q, the attention output and its projection,
    # the residual stream copies, plus the small integer inputs (positions, cache indices).
    acts = f32 * n_tok * (3 * q_dim + 3 * n_embd + 5)
    n_kv_max = size_base if any_full else size_swa
    # Without flash attention, KQ is materialised: n_kv x tokens per head and stream (softmax then
    # runs in place). The tokens of a micro-batch are divided among the streams.
    kq = 0 if o.flash_attn else f32 * max(info.n_head) * n_kv_max * n_tok
    attention = masks + acts + kq
    n_ff = max(info.n_ff, default=0)
    n_ff_active = n_ff * max(1, info.n_expert_used)
    ffn = masks + f32 * n_tok * (3 * n_ff_active + 2 * n_embd)
    # The logits for every output token, next to the final hidden state and its norm.
    output = f32 * n_out * (info.n_vocab + 2 * n_embd)

    layers_gpu = i_gpu_start <= info.n_layer - 1
    layers_host = i_gpu_start > 0
    host = max(
        attention if layers_host else 0,
        ffn if layers_host else 0,
        0 if output_on_gpu else output,
    )
    gpu = 0
    if o.on_gpu:
        gpu = max(
            attention if layers_gpu else 0,
            ffn if layers_gpu else 0,
            output if output_on_gpu else 0,
        )
        if layers_host and n_tok >= _CUDA_OFFLOAD_MIN_BATCH:
            # ggml-cuda also runs the host layers' attention for a large batch, on copies of
            # their cache: room for one host layer's K and V (measured: within a few MiB).
            gpu = max(gpu, attention + host_layer_kv)
        # The host still stages the inputs and the copies that cross devices.
        host = max(host, f32 * n_tok * n_embd + masks)
    return host, gpu


def _row_size(type_name: str, n: int) -> int:
    block, size = KV_TYPES[type_name]
    return size * (n // block) if block > 1 else size * n


def _is_output(t: TensorInfo) -> bool:
    return t.name.startswith("output") or t.name.startswith("result")


def _cuda_alloc_size(t: TensorInfo) -> int:
    """ggml-cuda's buffer size for a tensor: quantised rows padded to 512 elements, 128-aligned."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = t.n_bytes
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[t.type_name]]
    ne0 = t.shape[0] if t.shape else 0
    if block > 1 and ne0 % _CUDA_ROW_PADDING:
        size += type_size * ((_CUDA_ROW_PADDING - ne0 % _CUDA_ROW_PADDING) // block)
    return _pad(size, _CUDA_ALIGN)


def _repackable(t: TensorInfo, *, as_output: bool = False) -> bool:
    """ggml-cpu's ggml_repack_get_optimal_repack_type, for this machine's CPU features."""
    if len(t.shape) < 2 or (t.name in _NOT_MATMUL and not as_output):
        return False
    rows = t.shape[1]
    return any(t.type_name == name and rows % mult == 0 for name, mult in _repack_types())


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def _repack_types() -> tuple[tuple[str, int], ...]:
    """(weight type, required row multiple) that this CPU's backend repacks."""
    flags = _cpu_flags()
    if "avx2" in flags:  # x86: the AVX2 kernels, plus Q2_K with AVX-512
        types = [("Q4_0", 8), ("Q4_K", 8), ("IQ4_NL", 8), ("MXFP4", 8)]
        if "avx512f" in flags:
            types.append(("Q2_K", 8))
        return tuple(types)
    if "asimddp" in flags:  # ARM with dot-product (and i8mm) kernels
        return (
            ("Q4_0", 4),
            ("Q4_K", 8),
            ("Q5_K", 8),
            ("Q6_K", 8),
            ("IQ4_NL", 4),
            ("MXFP4", 4),
            ("Q8_0", 4),
        )
    return ()


def _host_repacks() -> bool:
    return bool(_repack_types())


def format_bytes(n: int) -> str:
    """Human-readable binary size (``1.50 GiB``)."""
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exp:.2f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exp]}"
