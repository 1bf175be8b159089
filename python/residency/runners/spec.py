"""What a runner is started with: one model's launch options, resolved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from residency.runners.kvfiles import KvPersistence
from residency.runners.upstream import UpstreamTimeouts

__all__ = ["LaunchSpec"]


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a runner needs to start one model, resolved (no "auto" left)."""

    name: str
    model_path: Path
    ctx: int
    parallel: int
    kv_type: str
    #: Layers on the GPU: -1 all, 0 none.
    gpu_layers: int
    #: "cuda:0", "host", "sim:0".
    device: str = "host"
    device_index: int = 0
    #: Every GPU it uses when several (a sched_spread device); () = device_index alone.
    device_indices: tuple[int, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str | None = None
    args: tuple[str, ...] = ()
    #: Serve embeddings too; None: the kind's default (``Runner.default_embedding``).
    embedding: bool | None = None
    #: llama-cpp-python's --chat_format; None: the GGUF's own template (or its family's).
    chat_format: str | None = None
    #: The command kind's argv template ({model}, {port}, ... placeholders).
    command: Sequence[str] | None = None
    #: llama-server's binary (the settings' `llama_server`); None: PATH, then residency's build.
    binary: str | None = None
    #: llama-server's KV persistence (saved slots across stops); None: off.
    kv: KvPersistence | None = None
    #: Flash attention on/off; None: the kind's default (llama-server: auto; on for a quantised KV).
    flash_attention: bool | None = None
    #: The registry's details of the model file (family, has_chat_template).
    details: Mapping[str, Any] = field(default_factory=dict)
    #: Multimodal projectors (llama-server's --mmproj; the first is used).
    projectors: tuple[Path, ...] = ()
    #: When a request whose runner stopped answering fails (runners.upstream).
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")
