"""The estimator's model of what llama.cpp allocates beyond the weights and the cache: the
compute buffers of the worst-case graph, and how ggml's backends size and repack tensors
(ggml-cuda's row padding and alignment, ggml-cpu's repacking for this machine's CPU)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from residency.estimate._gguf import ModelInfo, TensorInfo
from residency.llamacpp import KV_CACHE_TYPES

if TYPE_CHECKING:
    from residency.estimate._options import Options

_CUDA_ALIGN = 128
_CUDA_ROW_PADDING = 512  # ggml-cuda pads quantised rows to MATRIX_ROW_PADDING elements
_CUDA_OFFLOAD_MIN_BATCH = 32  # ggml-cuda takes host-weight ops of at least this many tokens

# Tensors looked up by row (GET_ROWS), never multiplied: the CPU backend never repacks them.
_NOT_MATMUL = ("token_embd.weight", "position_embd.weight", "token_types.weight")


def pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def compute_buffers(
    info: ModelInfo,
    o: Options,
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


def row_size(type_name: str, n: int) -> int:
    kv = KV_CACHE_TYPES[type_name]
    return kv.block_bytes * (n // kv.block) if kv.block > 1 else kv.block_bytes * n


def is_output(t: TensorInfo) -> bool:
    return t.name.startswith("output") or t.name.startswith("result")


def cuda_alloc_size(t: TensorInfo) -> int:
    """ggml-cuda's buffer size for a tensor: quantised rows padded to 512 elements, 128-aligned."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = t.n_bytes
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[t.type_name]]
    ne0 = t.shape[0] if t.shape else 0
    if block > 1 and ne0 % _CUDA_ROW_PADDING:
        size += type_size * ((_CUDA_ROW_PADDING - ne0 % _CUDA_ROW_PADDING) // block)
    return pad(size, _CUDA_ALIGN)


def repackable(t: TensorInfo, *, as_output: bool = False) -> bool:
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


def host_repacks() -> bool:
    return bool(_repack_types())
