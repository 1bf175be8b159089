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
from pathlib import Path
from typing import Literal

from residency.errors import EstimateError
from residency.estimate._buffers import (
    compute_buffers,
    cuda_alloc_size,
    is_output,
    pad,
    repackable,
    row_size,
)
from residency.estimate._gguf import ModelInfo, TensorInfo, read_model
from residency.estimate._options import PAD, Options, resolve_options
from residency.llamacpp import KV_CACHE_TYPES

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
    o = resolve_options(
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


def _estimate(info: ModelInfo, o: Options) -> Estimate:
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
        on_gpu = layer_on_gpu(t.layer) if t.layer is not None else (output_on_gpu and is_output(t))
        if on_gpu:
            gpu_weights += cuda_alloc_size(t)
        else:
            host.append(t)
    repacked = [t for t in host if o.cpu_repack and repackable(t)]
    tied = (
        None
        if has_output
        else next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    )
    if tied is not None:
        # No output.weight: llama.cpp duplicates token_embd into the output layer's buffer.
        if output_on_gpu:
            gpu_weights += cuda_alloc_size(tied)
        elif o.cpu_repack and repackable(tied, as_output=True):
            repacked.append(tied)
    repack_bytes = sum(pad(t.n_bytes, 32) for t in repacked)
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
    size_swa = pad(min(size_base, info.n_swa * (o.n_seq if o.kv_unified else 1) + o.n_ubatch), PAD)
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
            (row_size(o.kv_type, info.n_embd_k_gqa(il)) + row_size(o.kv_type, n_v))
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

    compute_host, compute_gpu = compute_buffers(
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


def format_bytes(n: int) -> str:
    """Human-readable binary size (``1.50 GiB``)."""
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exp:.2f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exp]}"
