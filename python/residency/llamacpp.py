"""Facts llama.cpp itself defines, written once: the runner kinds and the estimator import them.

- the KV cache types it accepts, with ggml's type id and block layout (ggml.h, ggml.c type traits);
- a quantised V cache needs flash attention (llama.cpp refuses the context otherwise);
- llama-server's context is shared by its slots: ``--ctx-size`` is ctx × parallel;
- the buffer lines it logs while loading, which are how a runner reports its memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "GPU_BUFFER_PREFIXES",
    "KV_CACHE_TYPES",
    "BufferLine",
    "KvCacheType",
    "is_gpu_buffer",
    "needs_flash_attn",
    "parse_buffer_line",
    "parse_offload_line",
    "slots_ctx_size",
]


@dataclass(frozen=True)
class KvCacheType:
    #: ggml's numeric type (enum ggml_type), as llama-cpp-python's --type_k/--type_v take it.
    type_id: int
    #: Elements per block and bytes per block (ggml's type traits).
    block: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block > 1


#: The KV cache types llama.cpp accepts (``--cache-type-k/-v``), by the name it takes.
KV_CACHE_TYPES: dict[str, KvCacheType] = {
    "f32": KvCacheType(0, 1, 4),
    "f16": KvCacheType(1, 1, 2),
    "bf16": KvCacheType(30, 1, 2),
    "q8_0": KvCacheType(8, 32, 34),
    "q4_0": KvCacheType(2, 32, 18),
    "q4_1": KvCacheType(3, 32, 20),
    "q5_0": KvCacheType(6, 32, 22),
    "q5_1": KvCacheType(7, 32, 24),
    "iq4_nl": KvCacheType(20, 32, 18),
}


def needs_flash_attn(kv_type: str) -> bool:
    """Whether llama.cpp needs flash attention for this cache type: a quantised V cache."""
    kv = KV_CACHE_TYPES.get(kv_type.lower())
    return kv is not None and kv.quantized


def slots_ctx_size(ctx: int, parallel: int) -> int:
    """llama-server's ``--ctx-size`` for `parallel` slots of `ctx` tokens each: the context is
    shared by the slots, so each gets ``--ctx-size / --parallel``."""
    return ctx * parallel


# "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB"
# "llama_kv_cache:      CUDA0 KV buffer size =    15.00 MiB"
# "llama_context:        CPU  output buffer size =     1.00 MiB"
# "sched_reserve:        CPU compute buffer size =   514.50 MiB"
# llama-server (with -lv 4) prefixes a timestamp and a level: "0.00.812.345 I load_tensors: ..."
_BUFFER_LINE = re.compile(
    r"\b(?P<dev>[A-Za-z][\w]*)\s+(?P<what>model|KV|RS|output|compute)\s+buffer size\s*=\s*"
    r"(?P<size>[\d.]+)\s*(?P<unit>[KMG]i?B|B)\b"
)
_UNITS = {"B": 1, "KB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": 1024**2, "GB": 1e9, "GiB": 1024**3}


@dataclass(frozen=True)
class BufferLine:
    #: The backend buffer type: "CPU_Mapped", "CUDA0", "CUDA_Host", ...
    device: str
    #: "model", "KV", "RS", "output" or "compute".
    kind: str
    #: As logged (two decimals of its unit): callers round as they need.
    size_bytes: float


def parse_buffer_line(line: str) -> BufferLine | None:
    """The buffer a llama.cpp log line reports, if it is one of its buffer-size lines."""
    m = _BUFFER_LINE.search(line)
    if m is None:
        return None
    return BufferLine(m["dev"], m["what"], float(m["size"]) * _UNITS[m["unit"]])


#: Backend buffer names of device memory ("CUDA0", "ROCm1", ...); "*_Host" ones are pinned host
#: memory, "CPU" and "CPU_Mapped" plain host memory.
GPU_BUFFER_PREFIXES = ("CUDA", "ROCm", "Metal", "Vulkan", "SYCL")


def is_gpu_buffer(device: str) -> bool:
    """Whether a buffer line's backend name is device (GPU) memory."""
    return device.startswith(GPU_BUFFER_PREFIXES) and not device.endswith("_Host")


# "load_tensors: offloaded 19/19 layers to GPU" (the output layer counts as one of them)
_OFFLOAD_LINE = re.compile(r"\boffloaded (\d+)/(\d+) layers to GPU\b")


def parse_offload_line(line: str) -> tuple[int, int] | None:
    """(layers on the GPU, layers) from llama.cpp's "offloaded N/M layers to GPU" line."""
    m = _OFFLOAD_LINE.search(line)
    return None if m is None else (int(m[1]), int(m[2]))
