"""Ask llama.cpp itself: load a model in a child process and parse the buffers it reports.

This is the ground truth the estimator is checked against (tests, benchmark, ``residency estimate
--measure``). Each configuration runs in its own process because llama.cpp logs to fd 2 and keeps
global state; the child (:mod:`residency.estimate._probe`) exits as soon as the context exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from residency.errors import EstimateError
from residency.llamacpp import KV_CACHE_TYPES, needs_flash_attn, parse_buffer_line

#: ggml's type ids of the KV cache types llama.cpp accepts (residency.llamacpp owns the table).
GGML_TYPE_IDS: dict[str, int] = {name: t.type_id for name, t in KV_CACHE_TYPES.items()}


@dataclass(frozen=True)
class Measured:
    """The buffers llama.cpp reported, in bytes (each rounded to its log's 0.01 MiB)."""

    #: (device, kind) -> bytes, summed when a kind appears twice (the two caches of an SWA model).
    buffers: dict[tuple[str, str], int] = field(default_factory=dict)

    def kind(self, what: str) -> int:
        """Total bytes of one kind: "model", "KV", "RS", "output" or "compute"."""
        return sum(b for (_, k), b in self.buffers.items() if k == what)

    @property
    def total_bytes(self) -> int:
        return sum(self.buffers.values())


def parse_buffers(log: str) -> Measured:
    """The buffer sizes in a llama.cpp log (the lines llama.cpp prints while loading)."""
    buffers: dict[tuple[str, str], int] = {}
    for line in log.splitlines():
        buffer = parse_buffer_line(line)
        if buffer is None:
            continue
        key = (buffer.device, buffer.kind)
        buffers[key] = buffers.get(key, 0) + round(buffer.size_bytes)
    return Measured(buffers)


def measure(
    path: str | os.PathLike[str],
    *,
    ctx: int = 4096,
    parallel: int = 1,
    kv_type: str = "f16",
    batch: int = 2048,
    ubatch: int = 512,
    gpu_layers: int = 0,
    flash_attn: bool | None = None,
    swa_full: bool = False,
    kv_unified: bool = False,
    embeddings: bool = False,
    timeout_s: float = 120.0,
) -> Measured:
    """Load ``path`` in llama.cpp (llama-cpp-python) with these options and return its accounting.

    ``flash_attn=None`` enables flash attention exactly when the V cache is quantised (llama.cpp
    refuses a quantised V cache without it), as residency's runners do.
    """
    kv = kv_type.lower()
    if kv not in GGML_TYPE_IDS:
        raise EstimateError(f"{path}: unknown KV cache type {kv_type!r}")
    fa = flash_attn if flash_attn is not None else needs_flash_attn(kv)
    opts = {
        "path": str(Path(path)),
        "n_gpu_layers": gpu_layers,
        "n_ctx": ctx,
        "n_batch": batch,
        "n_ubatch": ubatch,
        "n_seq_max": parallel,
        "type_k": GGML_TYPE_IDS[kv],
        "type_v": GGML_TYPE_IDS[kv],
        "flash_attn_type": 1 if fa else 0,
        "swa_full": swa_full,
        "kv_unified": kv_unified,
        "embeddings": embeddings,
    }
    # Fixed argv, no shell: the options travel as one JSON argument.
    proc = subprocess.run(
        [sys.executable, "-m", "residency.estimate._probe", json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = proc.stderr + proc.stdout
    if proc.returncode != 0 or "residency-probe: ok" not in log:
        tail = "\n".join(log.splitlines()[-15:])
        raise EstimateError(
            f"{path}: llama.cpp failed to load it (exit {proc.returncode}):\n{tail}"
        )
    return parse_buffers(log)
