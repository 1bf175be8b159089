"""Settings for the queue's timeout and the watchdog (read by ``residency.scheduler.watchdog``);
``config.Settings`` inherits them."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

__all__ = ["OperationsSettings"]


class OperationsSettings(BaseSettings):
    """How long a request may wait, and what the watchdog calls unhealthy."""

    #: A request still queued after this long gets 503 + Retry-After (0: waits as long as it
    #: takes, as in Ollama). Requests waiting for a load in progress are bounded by load_timeout.
    queue_timeout_s: float = Field(default=600.0, ge=0)
    #: How often the watchdog looks (the event loop's heartbeat, idle runners, the watcher).
    watchdog_interval_s: float = Field(default=1.0, gt=0)
    #: The event loop answering later than this is a stall (a blocking call on the loop).
    watchdog_loop_lag_s: float = Field(default=2.0, gt=0)
    #: Idle ready runners are pinged this often (0: only before their next request).
    idle_ping_interval_s: float = Field(default=30.0, ge=0)
    #: Thrash: more than this many reloads of models evicted to make room ...
    thrash_reloads: int = Field(default=20, gt=0)
    #: ... within this many seconds.
    thrash_window_s: float = Field(default=60.0, gt=0)
    #: A failure the watchdog saw keeps /health red this long after it ended, so a prober
    #: polling every few seconds sees it.
    watchdog_hold_s: float = Field(default=10.0, ge=0)
