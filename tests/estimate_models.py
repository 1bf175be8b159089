"""Small GGUF models of other shapes, written with the ``gguf`` package's writer (random weights).

llama.cpp loads them like any model, so the estimator can be checked on shapes where attention or
the feed-forward layer, not the vocabulary, decides the compute buffer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize


def write_llama(
    path: Path,
    *,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 8,
    n_head_kv: int = 2,
    n_ff: int = 768,
    n_vocab: int = 1024,
    ctx_train: int = 8192,
    weight_type: GGMLQuantizationType = GGMLQuantizationType.F16,
    tied_output: bool = False,
    arch: str = "llama",
    sliding_window: int | None = None,
    head_dim: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a llama-family GGUF (``arch`` = llama, qwen2 or gemma3) with random weights.

    ``head_dim`` defaults to ``n_embd // n_head``; gemma3 may set another (Gemma 3 270M: 256)."""
    rng = np.random.default_rng(seed)
    head_dim = head_dim or n_embd // n_head
    w = GGUFWriter(str(path), arch)
    w.add_name(f"test-{arch}-{n_layer}x{n_embd}")
    w.add_block_count(n_layer)
    w.add_context_length(ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if sliding_window:
            w.add_sliding_window(sliding_window)
    w.add_file_type(
        LlamaFileType.MOSTLY_Q8_0
        if weight_type == GGMLQuantizationType.Q8_0
        else LlamaFileType.MOSTLY_F16
    )
    # A SentencePiece-style vocabulary: control tokens, the 256 byte tokens, then fillers.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(n_vocab - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        # numpy shape (rows, cols) is ggml's ne = [cols, rows]
        data = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        if weight_type == GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, weight_type), raw_dtype=weight_type)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    matrix("token_embd.weight", n_vocab, n_embd)
    vector("output_norm.weight", n_embd)
    if not tied_output:
        matrix("output.weight", n_vocab, n_embd)
    for il in range(n_layer):
        p = f"blk.{il}."
        vector(p + "attn_norm.weight", n_embd)
        matrix(p + "attn_q.weight", n_head * head_dim, n_embd)
        matrix(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(p + "attn_output.weight", n_embd, n_head * head_dim)
        vector(p + "ffn_norm.weight", n_embd)
        matrix(p + "ffn_gate.weight", n_ff, n_embd)
        matrix(p + "ffn_up.weight", n_ff, n_embd)
        matrix(p + "ffn_down.weight", n_embd, n_ff)
        if arch == "qwen2":
            vector(p + "attn_q.bias", n_head * head_dim)
            vector(p + "attn_k.bias", n_head_kv * head_dim)
            vector(p + "attn_v.bias", n_head_kv * head_dim)
        if arch == "gemma3":
            vector(p + "attn_q_norm.weight", head_dim)
            vector(p + "attn_k_norm.weight", head_dim)
            vector(p + "post_attention_norm.weight", n_embd)
            vector(p + "post_ffw_norm.weight", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
