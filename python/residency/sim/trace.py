"""Seeded synthetic workloads for the policy simulator.

The shape follows what serving papers measured: a few large models among many small ones (sizes
spread log-uniformly from 1.5 GB to 65 GB, like MuxServe's mix of 7B…65B LLaMAs at different
quantisations), Zipf popularity (model i gets a share ∝ (i+1)^−α), bursty arrivals (Gamma
inter-arrival times with a chosen coefficient of variation: CV 1 is Poisson, CV 4 is bursty), and
optionally on/off phases whose off periods straddle the keep-alive window, which is what makes a
fixed keep-alive either hold memory in vain or drop a model just before it is wanted again.

Optionally (``turns_mean`` > 0) requests are turns of multi-turn conversations: each model's
requests, in arrival order, continue its current conversation or (with probability
1 / turns_mean, or when the context would pass ``max_context_tokens``) start a new one, and every
turn adds a Gamma-distributed number of tokens (mean ``turn_tokens_mean``) to the context the
next turn carries. The simulator charges a cold runner for that context (sim.conversations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from residency.errors import ConfigError

GB = 1_000_000_000


@dataclass(frozen=True)
class TraceConfig:
    """Parameters of a synthetic trace. Times are seconds, sizes decimal GB."""

    n_models: int = 12
    n_requests: int = 20_000
    #: Zipf exponent of popularity: rate_i ∝ (i + 1) ** −alpha.
    alpha: float = 1.0
    #: Coefficient of variation of each model's inter-arrival times (Gamma shape 1 / cv²).
    cv: float = 1.0
    #: Requests per second over all models.
    total_rate: float = 0.5
    min_gb: float = 1.5
    max_gb: float = 65.0
    #: Total model bytes ÷ device budget; the budget is raised to hold the largest model if needed.
    total_to_budget: float = 4.0
    disk_gb_per_s: float = 2.0
    #: Fixed cost of starting a runner (process, CUDA context, warm-up), added to every load.
    engine_start_s: float = 2.0
    #: Mean service time of one request (Gamma, CV service_cv).
    service_mean_s: float = 4.0
    service_cv: float = 0.75
    #: On/off phases: mean on-period length (exponential); 0 disables the phases.
    on_mean_s: float = 0.0
    #: Off periods are uniform in [off_min_s, off_max_s]: put them around the keep-alive window.
    off_min_s: float = 150.0
    off_max_s: float = 600.0
    #: Mean turns per conversation (geometric); 0: requests carry no conversation context.
    turns_mean: float = 0.0
    #: Tokens one turn adds to its conversation (the user's message and the answer), Gamma CV 0.7.
    turn_tokens_mean: float = 400.0
    #: A conversation whose context would pass this starts over (a model's context window).
    max_context_tokens: int = 16_384
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "n_models must be ≥ 1": self.n_models >= 1,
            "n_requests must be ≥ 1": self.n_requests >= 1,
            "alpha must be ≥ 0": self.alpha >= 0,
            "cv must be > 0": self.cv > 0,
            "total_rate must be > 0": self.total_rate > 0,
            "0 < min_gb ≤ max_gb required": 0 < self.min_gb <= self.max_gb,
            "total_to_budget must be ≥ 1": self.total_to_budget >= 1,
            "disk_gb_per_s must be > 0": self.disk_gb_per_s > 0,
            "engine_start_s must be ≥ 0": self.engine_start_s >= 0,
            "service_mean_s must be > 0 and service_cv > 0": (
                self.service_mean_s > 0 and self.service_cv > 0
            ),
            "on_mean_s must be ≥ 0": self.on_mean_s >= 0,
            "0 ≤ off_min_s ≤ off_max_s required": 0 <= self.off_min_s <= self.off_max_s,
            "turns_mean must be 0 (none) or ≥ 1": self.turns_mean == 0 or self.turns_mean >= 1,
            "turn_tokens_mean and max_context_tokens must be > 0": (
                self.turn_tokens_mean > 0 and self.max_context_tokens > 0
            ),
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigError(f"trace: {message}")


@dataclass(frozen=True)
class ModelSpec:
    key: str
    bytes: int
    #: Mean requests per second (long-run, including off periods).
    rate: float
    #: Seconds one load takes: bytes ÷ disk bandwidth + engine start.
    load_seconds: float


@dataclass(frozen=True)
class Trace:
    config: TraceConfig
    models: list[ModelSpec]
    budget_bytes: int
    #: Arrival times (s, ascending), model indices and service times (s), one entry per request.
    times: npt.NDArray[np.float64] = field(repr=False)
    model: npt.NDArray[np.int64] = field(repr=False)
    service: npt.NDArray[np.float64] = field(repr=False)
    #: Per request: its conversation (an id), and the tokens of context it carries from earlier
    #: turns (0 for a first turn). None: every request is a conversation of its own.
    conversation: npt.NDArray[np.int64] | None = field(default=None, repr=False)
    context: npt.NDArray[np.int64] | None = field(default=None, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes for m in self.models)

    def __len__(self) -> int:
        return len(self.times)


def _sizes(cfg: TraceConfig, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    # Stratified log-uniform: one size per equal-probability stratum, jittered inside it, so even 12
    # models span the range (many small, few large) while the seed still varies the exact sizes.
    u = (np.arange(cfg.n_models) + rng.uniform(0.0, 1.0, cfg.n_models)) / cfg.n_models
    sizes = cfg.min_gb * (cfg.max_gb / cfg.min_gb) ** u
    return np.asarray(rng.permutation(sizes), dtype=np.float64)


def _gamma_arrivals(
    rng: np.random.Generator, rate: float, cv: float, horizon: float
) -> npt.NDArray[np.float64]:
    """Renewal process with Gamma(1/cv², ·) gaps of mean 1/rate, on [0, horizon)."""
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    chunks: list[npt.NDArray[np.float64]] = []
    # Start at a random point of a gap, so models do not all arrive at time 0.
    t = float(rng.gamma(shape, scale) * rng.uniform())
    expected = int(rate * horizon * 1.2) + 16
    while t < horizon:
        gaps = rng.gamma(shape, scale, expected)
        times = t + np.concatenate(([0.0], np.cumsum(gaps[:-1])))
        chunks.append(times)
        t = float(times[-1] + gaps[-1])
    if not chunks:
        return np.empty(0)
    out = np.concatenate(chunks)
    return out[out < horizon]


def _on_off(
    rng: np.random.Generator, cfg: TraceConfig, on_times: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Maps times measured in on-time to wall time by inserting off periods between on periods."""
    if len(on_times) == 0:
        return on_times
    span = float(on_times[-1])
    n = int(span / cfg.on_mean_s * 1.5) + 16
    ons = rng.exponential(cfg.on_mean_s, n)
    while ons.sum() <= span:
        ons = np.concatenate((ons, rng.exponential(cfg.on_mean_s, n)))
    offs = rng.uniform(cfg.off_min_s, cfg.off_max_s, len(ons))
    on_end = np.cumsum(ons)  # on-time at which each on period ends
    phase = np.searchsorted(on_end, on_times, side="right")
    # Before phase k, k off periods have passed.
    off_before = np.concatenate(([0.0], np.cumsum(offs)))
    return on_times + off_before[phase]


def make_trace(cfg: TraceConfig) -> Trace:
    """Builds the trace ``cfg`` describes; the same config (seed included) gives the same trace."""
    rng = np.random.default_rng(cfg.seed)
    sizes_gb = _sizes(cfg, rng)
    weights = (np.arange(cfg.n_models) + 1.0) ** -cfg.alpha
    rates = cfg.total_rate * weights / weights.sum()
    # Names carry no hint of popularity: Ollama's policy breaks keep-alive ties by name.
    names = [f"model-{j:02d}" for j in rng.permutation(cfg.n_models)]
    models = [
        ModelSpec(
            key=names[i],
            bytes=int(sizes_gb[i] * GB),
            rate=float(rates[i]),
            load_seconds=float(sizes_gb[i] / cfg.disk_gb_per_s + cfg.engine_start_s),
        )
        for i in range(cfg.n_models)
    ]
    total = sum(m.bytes for m in models)
    budget = max(int(total / cfg.total_to_budget), *(m.bytes for m in models))

    duty = 1.0
    if cfg.on_mean_s > 0:
        duty = cfg.on_mean_s / (cfg.on_mean_s + (cfg.off_min_s + cfg.off_max_s) / 2)
    horizon = cfg.n_requests / cfg.total_rate
    while True:
        times_l: list[npt.NDArray[np.float64]] = []
        model_l: list[npt.NDArray[np.int64]] = []
        for i in range(cfg.n_models):
            # On-time runs faster by 1/duty so that the long-run rate stays rates[i].
            t = _gamma_arrivals(rng, rates[i] / duty, cfg.cv, horizon * duty * 1.05)
            if cfg.on_mean_s > 0:
                t = _on_off(rng, cfg, t)
            times_l.append(t)
            model_l.append(np.full(len(t), i, dtype=np.int64))
        times = np.concatenate(times_l)
        if len(times) >= cfg.n_requests:
            break
        horizon *= 1.25  # bursty traces can fall short; draw a longer one
    model = np.concatenate(model_l)
    order = np.argsort(times, kind="stable")[: cfg.n_requests]
    shape = 1.0 / (cfg.service_cv * cfg.service_cv)
    service = rng.gamma(shape, cfg.service_mean_s / shape, cfg.n_requests)
    model = model[order]
    conversation = context = None
    if cfg.turns_mean > 0:  # drawn last: traces without conversations stay as they were
        conversation, context = _conversations(rng, cfg, model)
    return Trace(
        config=cfg,
        models=models,
        budget_bytes=budget,
        times=times[order],
        model=model,
        service=service,
        conversation=conversation,
        context=context,
    )


def _conversations(
    rng: np.random.Generator, cfg: TraceConfig, model: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Each request's conversation id and the context tokens it carries (see the module doc)."""
    n = len(model)
    new = rng.uniform(size=n) < 1.0 / cfg.turns_mean
    turn = np.maximum(1, rng.gamma(2.0, cfg.turn_tokens_mean / 2.0, n)).astype(np.int64)
    conversation = np.empty(n, dtype=np.int64)
    context = np.empty(n, dtype=np.int64)
    current: dict[int, tuple[int, int]] = {}  # model → (its conversation, its context so far)
    ids = 0
    rows = zip(model.tolist(), new.tolist(), turn.tolist(), strict=True)
    for r, (mi, starts, tokens) in enumerate(rows):
        conv, ctx = current.get(mi, (-1, 0))
        if conv < 0 or starts or ctx + tokens > cfg.max_context_tokens:
            conv, ctx = ids, 0
            ids += 1
        conversation[r], context[r] = conv, ctx
        current[mi] = (conv, ctx + tokens)
    return conversation, context
