"""How much memory a model needs with the options a request asks for, and those options parsed.

Option parsing runs once per request (the defaults once per model), keep-alive durations once per
model; estimating reads the GGUF once per (model, options) and is cached here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Literal

from residency._core import InvalidArgumentError
from residency.config import Settings
from residency.errors import EstimateError
from residency.keepalive import (
    KeepAliveChoice,
    KeepAliveClient,
    KeepAliveRule,
    KeepAliveSource,
    govern,
    parse_keep_alive,
)
from residency.registry import ModelEntry
from residency.runners import runner_class
from residency.runners.choice import resolve_kind
from residency.scheduler.lease import LoadOptions

__all__ = ["Sizing", "gib"]

log = logging.getLogger("residency.scheduler")


class Sizing:
    """Options, keep-alives and estimated bytes per model, each worked out once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Estimated bytes and GPU layers per (model, options): estimating reads the GGUF, once.
        self._estimates: dict[tuple[str, LoadOptions], tuple[int, int]] = {}
        #: Each model's options when a request sets none (the usual case), worked out once.
        self._default_options: dict[str, LoadOptions] = {}
        self._keep_alive: dict[str, int] = {}
        self._default_keep_alive_ns = settings.keep_alive_ns()
        self._server_rule = settings.keep_alive_rule()
        self._rules: dict[str, KeepAliveRule] = {}

    # ---- options and keep-alive ----------------------------------------------------------------
    def options(self, entry: ModelEntry, options: Mapping[str, Any] | None) -> LoadOptions:
        if not options:
            default = self._default_options.get(entry.name)
            if default is None:
                default = self._default_options[entry.name] = self._options_from(entry, {})
            return default
        return self._options_from(entry, options)

    def _options_from(self, entry: ModelEntry, options: Mapping[str, Any]) -> LoadOptions:
        cfg = entry.config
        opts = dict(options)
        ctx = _opt_int(opts, ("ctx", "num_ctx")) or cfg.ctx
        trained = entry.context_length
        if ctx is None:
            ctx = self.settings.default_ctx
            if trained:
                ctx = min(ctx, trained)
        elif trained and ctx > trained:
            # As Ollama: a context beyond the model's training one is clamped, with a warning.
            log.warning(
                "requested context size too large for model %s: num_ctx=%d n_ctx_train=%d",
                entry.name,
                ctx,
                trained,
            )
            ctx = trained
        parallel = _opt_int(opts, ("parallel", "num_parallel")) or cfg.parallel
        kv_type = opts.get("kv_type", cfg.kv_type)
        if not isinstance(kv_type, str):
            raise InvalidArgumentError(f"option kv_type must be a string, not {kv_type!r}")
        gpu: int | Literal["auto"] = cfg.gpu_layers
        for name in ("gpu_layers", "num_gpu"):
            if name in opts:
                value = opts[name]
                if value == "auto":
                    gpu = "auto"
                elif isinstance(value, int) and not isinstance(value, bool):
                    gpu = value
                else:
                    raise InvalidArgumentError(f"option {name} must be an int or 'auto'")
        return LoadOptions(
            ctx=ctx,
            parallel=parallel or self.settings.num_parallel,
            kv_type=kv_type,
            gpu_layers=gpu,
        )

    def forget(self, name: str) -> None:
        """Drops what was worked out for `name` (its configuration changed: a reload)."""
        self._default_options.pop(name, None)
        self._keep_alive.pop(name, None)
        for key in [k for k in self._estimates if k[0] == name]:
            del self._estimates[key]

    def keep_alive(self, entry: ModelEntry) -> int:
        """The model's keep-alive (its config's, else the server's), parsed once."""
        ka = self._keep_alive.get(entry.name)
        if ka is None:
            configured = entry.config.keep_alive
            ka = self._default_keep_alive_ns if configured is None else parse_keep_alive(configured)
            self._keep_alive[entry.name] = ka
        return ka

    def govern_keep_alive(
        self, entry: ModelEntry, asked_ns: int | None, client: KeepAliveClient | None
    ) -> KeepAliveChoice:
        """The keep-alive a request applies, under its key's, its model's and the server's rule
        (most specific first)."""
        rule = self._rules.get(entry.name)
        if rule is None:
            rule = self._rules[entry.name] = entry.config.keep_alive_rule().over(self._server_rule)
        if client is not None and client.rule is not None:
            rule = client.rule.over(rule)
        source: KeepAliveSource = "server" if entry.config.keep_alive is None else "model"
        return govern(asked_ns, self.keep_alive(entry), source, rule)

    # ---- bytes ---------------------------------------------------------------------------------
    def cached(self, entry: ModelEntry, want: LoadOptions) -> tuple[int, int] | None:
        """Bytes and GPU layers if known without reading the model file."""
        if entry.config.memory is not None:
            return entry.config.memory, _layers(want)
        return self._estimates.get((entry.name, want))

    async def needed(self, entry: ModelEntry, want: LoadOptions, on_gpu: bool) -> tuple[int, int]:
        """Bytes to reserve on the device, and the GPU layers to start with (-1 = all)."""
        known = self.cached(entry, want)
        if known is not None:
            return known
        layers = _layers(want)
        kw = self.estimate_options(entry, want)
        est = await asyncio.to_thread(
            _estimate,
            entry,
            gpu_layers="all" if layers < 0 else layers,
            device="gpu" if on_gpu else "cpu",
            **kw,
        )
        needed = int(est.gpu_bytes if on_gpu else est.total_bytes) + _projector_bytes(entry)
        result = (needed, layers)
        self._estimates[(entry.name, want)] = result
        return result

    async def partial_offload(
        self, entry: ModelEntry, want: LoadOptions, needed: int, layers: int, budget: int | None
    ) -> tuple[int, int] | None:
        """For a model too large for any GPU: the layers that fit on the largest (`budget`), the
        rest on the host (what llama.cpp's -ngl does). None when the runner or device cannot split.
        """
        if (
            layers >= 0
            or budget is None
            or not runner_class(resolve_kind(entry.runner, self.settings)).supports_offload
            or entry.config.memory is not None
        ):
            return None
        from residency.estimate import fit_layers

        fit = await asyncio.to_thread(
            fit_layers, entry.path, budget, **self.estimate_options(entry, want)
        )
        if fit.layers <= 0 or fit.gpu_bytes >= needed:
            return None
        log.info(
            "%s does not fit on one GPU (%s): %d layers on the GPU (%s), the rest on the host (%s)",
            entry.name,
            gib(needed),
            fit.layers,
            gib(fit.gpu_bytes),
            gib(fit.host_bytes),
        )
        return fit.gpu_bytes, fit.layers

    def estimate_options(self, entry: ModelEntry, want: LoadOptions) -> dict[str, Any]:
        """The estimator's options for the command line the runner kind will use (its own)."""
        return runner_class(resolve_kind(entry.runner, self.settings)).estimate_options(
            ctx=want.ctx,
            parallel=want.parallel,
            kv_type=want.kv_type,
            embedding=entry.config.embedding,
            flash_attention=entry.config.flash_attention,
            kv_persist=self.settings.kv_persist and entry.config.kv_persist,
        )


def _projector_bytes(entry: ModelEntry) -> int:
    """A projector's weights go where the model goes (llama-server offloads --mmproj); its
    file's size stands for them (its compute buffer is not estimated)."""
    if not entry.config.projectors or runner_class(entry.runner).kind != "llama-server":
        return 0
    try:
        return entry.config.projectors[0].stat().st_size
    except OSError:
        return 0


def _layers(want: LoadOptions) -> int:
    return -1 if want.gpu_layers == "auto" else int(want.gpu_layers)


def _estimate(entry: ModelEntry, **options: Any) -> Any:
    """residency.estimate for a configured model; a precise error for files it cannot read."""
    from residency.estimate import estimate

    try:
        return estimate(entry.path, **options)
    except EstimateError as err:
        if entry.runner == "command":
            raise EstimateError(
                f"{err}; give model {entry.name!r} a `memory` (bytes to reserve) in the config"
            ) from None
        raise


def _opt_int(opts: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in opts and opts[name] is not None:
            value = opts[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(
                    f"option {name} must be a positive integer, not {value!r}"
                )
            return value
    return None


def gib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
