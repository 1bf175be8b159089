"""What the scheduler hands out: a lease on a ready runner, the options it was loaded with, and
the rows of /api/ps."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from residency.errors import RunnerError
from residency.keepalive import KeepAliveOrigin
from residency.registry import ModelEntry
from residency.runners import Runner
from residency.runners.http import RunnerClient
from residency.runners.protocol import RunnerApi
from residency.scheduler.fallback import Placement, SpeedState

__all__ = ["Lease", "LoadOptions", "ResidentModel"]


@dataclass(frozen=True)
class LoadOptions:
    """The options that decide a runner's memory; a runner serves any request it satisfies."""

    ctx: int
    parallel: int
    kv_type: str
    gpu_layers: int | Literal["auto"]

    def satisfies(self, want: LoadOptions) -> bool:
        """A larger context or more slots serve smaller requests without a reload."""
        return (
            self.ctx >= want.ctx
            and self.parallel >= want.parallel
            and self.kv_type == want.kv_type
            and want.gpu_layers in ("auto", self.gpu_layers)
        )


@dataclass
class Lease:
    """A ready runner, held for one request: it cannot be evicted or expire until released."""

    model: str
    entry: ModelEntry
    #: The request loaded its model or joined a load under way (it waited for the load).
    cold: bool
    #: A cold request's whole wait (queueing + eviction + recovery + start), as Ollama counts it.
    load_duration_ns: int
    #: How long the request waited for its grant (behind a busy model or other loads).
    queue_duration_ns: int
    ctx: int
    device: str
    runner: Runner = field(repr=False)
    #: Told each finished generation's (tokens, decode ns): the slowdown detector's samples.
    on_decoded: Callable[[int, int], None] | None = field(default=None, repr=False)
    #: The runner's protocol for this request alone (made at first use): its calls share one
    #: place at the runner, held until release().
    _api: RunnerApi | None = field(default=None, init=False, repr=False)
    _released: bool = field(default=False, init=False, repr=False)

    def release(self) -> None:
        """The request is done with the runner: its place goes to the next request."""
        self._released = True
        if self._api is not None:
            self._api.give_back_place()

    def decoded(self, tokens: int, ns: int) -> None:
        """One generation's decode: `tokens` generated in `ns` (first to last token)."""
        if self.on_decoded is not None:
            self.on_decoded(tokens, ns)

    @property
    def base_url(self) -> str:
        return self.runner.base_url

    @property
    def client(self) -> RunnerClient:
        """Pooled and shared by every request to this runner: reuse it, never create one."""
        return self.runner.client

    @property
    def api(self) -> RunnerApi:
        """The runner's protocol: what the API layer uses (never the process or its socket)."""
        if self._released:  # used after its session (Scheduler.load's lease): each call its own
            return self.runner.api
        if self._api is None:
            self._api = self.runner.api.for_request()
        return self._api

    def output_tail(self, lines: int = 40) -> str:
        """The runner's last output lines, for error messages."""
        return self.runner.output_tail(lines)

    @property
    def alive(self) -> bool:
        return not self.runner.exited

    def error(self, what: str) -> RunnerError:
        """A RunnerError for a failed proxied request, saying whether the runner died."""
        if self.runner.exited:
            what = f"{what}; the runner exited ({self.runner.exit_description()})"
        return self.runner.error(what)


@dataclass(frozen=True)
class ResidentModel:
    """One row of /api/ps."""

    name: str
    entry: ModelEntry
    device: str
    state: str
    #: Bytes reserved (the measurement once the runner reported one, else the estimate).
    bytes: int
    estimated_bytes: int
    measured_bytes: int | None
    size_vram: int
    expires_at: datetime | None
    context_length: int
    refcount: int
    #: Measures the bytes of its model file in the host's page cache (mincore); None: no cache.
    measure_warm: Callable[[], int | None] = field(default=lambda: None, repr=False, compare=False)
    #: Ollama's "size": the reservation, or what the runner placed on GPU and host together
    #: when part of the model runs on the CPU (size_vram then is its GPU part).
    size: int = 0
    #: Where the runner put the model (GPU devices), and its decode speed against its history.
    placement: Placement | None = None
    decode_speed: SpeedState | None = None
    #: The keep-alive now (ns, < 0 forever), where it came from and who set it.
    keep_alive_ns: int | None = None
    keep_alive_origin: KeepAliveOrigin | None = None

    @functools.cached_property
    def warm_bytes(self) -> int | None:
        """Bytes of its model file in the host's page cache now. Measured only when asked
        (mincore takes milliseconds for a large file): /health and /v1/models never pay it."""
        return self.measure_warm()
