"""What a simulation runs under (:class:`SimConfig`) and what it measures (:class:`SimResult`)."""

from __future__ import annotations

from dataclasses import dataclass

from residency.errors import ConfigError


@dataclass(frozen=True)
class SimConfig:
    policy: str = "ollama"
    #: Queue discipline: "affinity" (residency's default) or "ollama" (Ollama's FIFO, one load).
    queue: str = "affinity"
    #: Affinity's starvation deadline; 0 = the engine's adaptive default (the mean load time).
    starvation_s: float = 0.0
    #: Affinity: loads in flight at once; 0 = no limit (the server's default is 1: Settings).
    max_loads: int = 0
    #: The keep-alive every request carries (Ollama's default 5 minutes); < 0 forever, 0 none.
    keep_alive_s: float = 300.0
    #: Seconds between a runner's exit and its memory showing free again (driver lag).
    recovery_lag_s: float = 1.0
    #: Requests one runner serves at once (llama.cpp slots); more wait at the runner.
    parallel: int = 4
    #: Models one device may hold (Ollama's OLLAMA_MAX_LOADED_MODELS per GPU).
    max_models: int = 3
    #: Keep the engine's journal of actions (for differential tests).
    journal: bool = False
    #: The host's page cache (the kernel's LRU) as a multiple of the GPU budget; 0: none, every
    #: load reads from disk at the trace's load cost (the earlier, pessimistic baseline).
    host_cache_x: float = 0.0
    #: Reading a file from the page cache (GB/s; calibrate with benchmarks/bench_warm.py).
    host_gb_per_s: float = 9.0
    #: Starting the engine once the weights are read; None: the trace's own engine start.
    engine_start_s: float | None = None
    #: Who decides what stays in the page cache: "lru" (the kernel) or "managed" (the core's
    #: HostTier, with prefetch while loads wait).
    host_tier: str = "lru"
    #: The managed tier's half-life of past uses.
    host_half_life_s: float = 300.0
    #: Conversations (a trace with ``turns_mean``): slots saved at a runner's stop and restored
    #: into its successor (runners.kvcache), or, off, every cold turn prefills its context.
    kv_persist: bool = False
    #: The cost model's calibration, Gemma 3 270M on the 2-core dev machine (sim.conversations,
    #: from benchmarks/bench_kv_restore.py): prefill speed, KV bytes per token, restore and save
    #: bandwidth (llama-server's own timings), and the save bound.
    prefill_tokens_per_s: float = 500.0
    kv_bytes_per_token: float = 18_432.0
    kv_restore_gb_per_s: float = 7.7
    kv_save_gb_per_s: float = 1.4
    kv_save_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.recovery_lag_s < 0 or self.parallel < 1 or self.max_models < 1:
            raise ConfigError("sim: need recovery_lag_s ≥ 0, parallel ≥ 1 and max_models ≥ 1")
        if self.host_cache_x < 0 or self.host_gb_per_s <= 0:
            raise ConfigError("sim: need host_cache_x ≥ 0 and host_gb_per_s > 0")
        if self.engine_start_s is not None and self.engine_start_s < 0:
            raise ConfigError("sim: engine_start_s must be ≥ 0")
        if self.host_tier not in ("lru", "managed") or self.host_half_life_s <= 0:
            raise ConfigError("sim: host_tier is 'lru' or 'managed', host_half_life_s > 0")
        if self.starvation_s < 0 or self.max_loads < 0:
            raise ConfigError("sim: starvation_s and max_loads must be ≥ 0")
        rates = (self.prefill_tokens_per_s, self.kv_bytes_per_token, self.kv_restore_gb_per_s,
                 self.kv_save_gb_per_s)  # fmt: skip
        if min(rates) <= 0 or self.kv_save_timeout_s < 0:
            raise ConfigError("sim: conversation rates must be > 0, kv_save_timeout_s ≥ 0")


@dataclass(frozen=True)
class SimResult:
    policy: str
    queue: str
    requests: int
    served: int
    rejected: int
    cold_loads: int
    load_seconds: float
    #: Models chosen as victims to make room, and models unloaded because their keep-alive ran out.
    evictions: int
    expirations: int
    #: Requests not granted at arrival (they queued).
    waited: int
    #: Time to first token = queueing + loading + waiting for a slot (service starts).
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_max_s: float
    ttft_mean_s: float
    #: ∫ bytes of ready models serving no request dt, in GB·s (memory held in vain).
    idle_gb_s: float
    #: ∫ bytes of loading and ready models dt, in GB·s.
    resident_gb_s: float
    #: Virtual seconds from the first arrival to the last completion.
    duration_s: float
    #: Bytes loads read from the host's page cache instead of disk, in GB.
    host_hit_gb: float = 0.0
    #: Conversations: seconds first tokens waited for earlier turns' context, and how many turns
    #: had it prefilled again or restored from a saved slot.
    context_s: float = 0.0
    context_prefills: int = 0
    context_restores: int = 0
    journal: tuple[str, ...] = ()

    def row(self) -> dict[str, float | int | str]:
        return {k: v for k, v in self.__dict__.items() if k != "journal"}
