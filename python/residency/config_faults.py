"""Settings for runners that stop answering and models that keep failing (``config.Settings``
inherits them; ``runners.upstream`` and ``scheduler.circuit`` read them)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from residency.runners.upstream import UpstreamTimeouts

__all__ = ["FaultSettings"]


class FaultSettings(BaseSettings):
    """Upstream timeouts (seconds, 0 = off) and the crash-loop backoff and circuit."""

    #: A request fails (504) when its runner sent it nothing and did no work (no CPU time, I/O
    #: or page faults) for this long: stopped or deadlocked. A busy prefill is never cut short.
    upstream_stall_timeout_s: float = Field(default=60.0, ge=0)
    #: The first byte of an answer however busy the runner looks; off by default, since the
    #: prefill of a long prompt on a CPU may take many minutes.
    upstream_first_byte_timeout_s: float = Field(default=0.0, ge=0)
    #: Between two chunks of a started answer however busy the runner looks (a spinning runner).
    upstream_chunk_timeout_s: float = Field(default=300.0, ge=0)
    #: After the 2nd consecutive failure of a model's runner (failed load, crash, hang) its next
    #: load waits this long, doubling with each further failure (the 1st reloads at once).
    failure_backoff_s: float = Field(default=1.0, ge=0)
    #: This many consecutive failures open the model's circuit: requests get 503 + Retry-After
    #: with the last failure's reason until the cool-down ends; then one trial load decides.
    circuit_failures: int = Field(default=5, ge=1)
    circuit_cooldown_s: float = Field(default=30.0, ge=0)
    #: The longest any backoff or cool-down grows to.
    failure_backoff_max_s: float = Field(default=600.0, ge=0)

    def upstream_timeouts(self) -> UpstreamTimeouts:
        return UpstreamTimeouts(
            stall_s=self.upstream_stall_timeout_s,
            first_byte_s=self.upstream_first_byte_timeout_s,
            chunk_s=self.upstream_chunk_timeout_s,
        )
