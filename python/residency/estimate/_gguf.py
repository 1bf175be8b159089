"""What the estimator needs from a GGUF file, read with residency's one GGUF reader
(residency.gguf_header, shared with the registry: each file version is parsed once).

:func:`read_model` turns the header and tensor table into a :class:`ModelInfo`: the architecture's
hyper-parameters as llama.cpp interprets them (including its per-architecture defaults, such as the
sliding-window pattern) and every tensor's type, shape, file offset and size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from residency.errors import EstimateError
from residency.gguf_header import GGUFHeader, read_header

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class SwaRule:
    """Where an architecture's sliding-window layers are (llama.cpp ``src/models/<arch>.cpp``)."""

    #: Every ``pattern``-th layer attends to the full context; the others are windowed.
    pattern: int
    #: Window used when the file has no ``<arch>.attention.sliding_window`` key (None: no SWA then).
    default_window: int | None = None


# Architectures whose KV cache is the standard per-layer K/V tensors, which the estimator models.
# Dense and MoE transformers alike (experts only change the weights, which are read exactly).
# Recurrent, hybrid and MLA caches (mamba, rwkv, qwen3next, deepseek2, ...) are refused rather than
# guessed. SWA rules as in the llama.cpp that llama-cpp-python 0.3.36 vendors.
SWA_RULES: dict[str, SwaRule | None] = {
    "llama": None,
    "mistral3": None,
    "qwen2": None,
    "qwen2moe": None,
    "qwen3": None,
    "qwen3moe": None,
    "granite": None,
    "granitemoe": None,
    "stablelm": None,
    "starcoder2": None,
    "internlm2": None,
    "command-r": None,
    "olmo": None,
    "olmoe": None,
    "phi2": None,
    "phi3": None,  # llama.cpp ignores phi3's sliding_window key (its converters fill it wrongly)
    "gemma": None,
    "smollm3": None,
    "exaone": None,
    "gemma2": SwaRule(pattern=2, default_window=4096),
    "gemma3": SwaRule(pattern=6),
    "cohere2": SwaRule(pattern=4, default_window=0),
    "olmo2": SwaRule(pattern=4),
    "gpt-oss": SwaRule(pattern=2, default_window=0),
    "exaone4": SwaRule(pattern=4, default_window=4096),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    #: Dimensions in ggml order (ne[0] is the row length).
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    #: Absolute offset of the data in the file.
    offset: int
    #: The repeating layer (``blk.N.``) the tensor belongs to; None for input/output tensors.
    layer: int | None


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    file_size: int
    architecture: str
    name: str
    quantization: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_expert: int
    n_expert_used: int
    n_swa: int
    #: Per layer: True where the layer attends through the sliding window.
    is_swa: tuple[bool, ...]
    tensors: tuple[TensorInfo, ...]

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def n_embd_k_gqa(self, il: int) -> int:
        return self.head_dim_k * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return self.head_dim_v * self.n_head_kv[il]

    @property
    def has_kv(self) -> tuple[bool, ...]:
        return tuple(h > 0 for h in self.n_head_kv)


def read_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read ``path``'s header and tensor table; raises EstimateError naming the file and problem."""
    p = Path(path)
    try:
        stat = p.stat()
    except OSError as err:
        raise EstimateError(f"{p}: cannot read the model file ({err.strerror or err})") from None
    return _read_cached(p.resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _read_cached(p: Path, size: int, mtime_ns: int) -> ModelInfo:
    """Cached by (path, size, mtime): a scheduler estimates the same file for every option set."""
    del mtime_ns  # part of the cache key only
    if not p.is_file():
        raise EstimateError(f"{p}: not a regular file")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EstimateError(f"{p}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        header = read_header(p)
    except (OSError, ValueError) as err:
        raise EstimateError(
            f"{p}: the GGUF header or tensor table is unreadable, the file is probably "
            f"truncated or corrupt ({type(err).__name__}: {err})"
        ) from None
    return _model_info(p, size, header)


def _model_info(p: Path, size: int, header: GGUFHeader) -> ModelInfo:
    from gguf import LlamaFileType

    def field(key: str, default: Any = None) -> Any:
        return header.metadata.get(key, default)

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise EstimateError(f"{p}: the GGUF header has no general.architecture")
    if arch not in SWA_RULES:
        raise EstimateError(
            f"{p}: architecture {arch!r} is not supported by the estimator (supported: "
            f"{', '.join(sorted(SWA_RULES))})"
        )

    def need(key: str) -> Any:
        value = field(f"{arch}.{key}")
        if value is None:
            raise EstimateError(f"{p}: the GGUF header lacks {arch}.{key}")
        return value

    n_layer = int(need("block_count"))
    n_embd = int(need("embedding_length"))
    if n_layer <= 0 or n_embd <= 0:
        raise EstimateError(f"{p}: block_count and embedding_length must be positive")

    def per_layer(key: str, default: Any = None) -> tuple[int, ...]:
        value = field(f"{arch}.{key}", default)
        if value is None:
            raise EstimateError(f"{p}: the GGUF header lacks {arch}.{key}")
        if isinstance(value, list):
            if len(value) != n_layer:
                raise EstimateError(
                    f"{p}: {arch}.{key} has {len(value)} entries for {n_layer} layers"
                )
            return tuple(int(v) for v in value)
        return (int(value),) * n_layer

    n_head = per_layer("attention.head_count")
    n_head_kv = per_layer("attention.head_count_kv", field(f"{arch}.attention.head_count"))
    n_ff = per_layer("feed_forward_length", 0)
    head0 = max(n_head) or 1
    head_dim_k = int(field(f"{arch}.attention.key_length", n_embd // head0))
    head_dim_v = int(field(f"{arch}.attention.value_length", n_embd // head0))

    n_vocab = header.array_lengths.get("tokenizer.ggml.tokens")
    if n_vocab is None:
        n_vocab = int(field(f"{arch}.vocab_size", 0))

    rule = SWA_RULES[arch]
    n_swa = 0
    is_swa = (False,) * n_layer
    if rule is not None:
        window = field(f"{arch}.attention.sliding_window")
        n_swa = int(window) if window is not None else int(rule.default_window or 0)
        if n_swa > 0:
            pattern_value = field(f"{arch}.attention.sliding_window_pattern")
            if isinstance(pattern_value, list):
                is_swa = tuple(bool(v) for v in pattern_value)[:n_layer]
            else:
                n_pattern = int(pattern_value) if pattern_value is not None else rule.pattern
                # llama_hparams::set_swa_pattern, dense_first = false
                is_swa = tuple(
                    n_pattern == 0 or (il % n_pattern) < (n_pattern - 1) for il in range(n_layer)
                )

    ftype = field("general.file_type")
    try:
        quantization = (
            LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
            if ftype is not None
            else "unknown"
        )
    except ValueError:
        quantization = f"file_type {ftype}"

    tensors = []
    for t in header.tensors:
        m = _LAYER.match(t.name)
        try:
            type_name, n_bytes = t.type_name, t.n_bytes
        except (ValueError, KeyError):
            raise EstimateError(
                f"{p}: tensor {t.name!r} has unknown ggml type {t.type_id}"
            ) from None
        tensors.append(
            TensorInfo(
                name=t.name,
                type_name=type_name,
                shape=t.shape,
                n_elements=t.n_elements,
                n_bytes=n_bytes,
                offset=t.offset,
                layer=int(m.group(1)) if m else None,
            )
        )
    end = max((t.offset + t.n_bytes for t in tensors), default=0)
    if end > size:
        raise EstimateError(
            f"{p}: truncated: its tensors end at byte {end:,} but the file has {size:,} bytes"
        )
    return ModelInfo(
        path=p,
        file_size=size,
        architecture=arch,
        name=str(field("general.name", p.stem)),
        quantization=quantization,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=int(field(f"{arch}.context_length", 0)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_expert=int(field(f"{arch}.expert_count", 0)),
        n_expert_used=int(field(f"{arch}.expert_used_count", 0)),
        n_swa=n_swa,
        is_swa=is_swa,
        tensors=tuple(tensors),
    )
