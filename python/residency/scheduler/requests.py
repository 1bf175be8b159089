"""A request between its arrival and its grant, as the driver tracks it (its queue place is the
engine's), and the engine's view of the options it asks for."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from residency._core import Action, LoadShape
from residency.errors import ModelTooLargeError, ResidencyError, RunnerError
from residency.keepalive import KeepAliveOrigin
from residency.registry import ModelEntry
from residency.scheduler.executor import Instance
from residency.scheduler.lease import LoadOptions
from residency.scheduler.sizing import gib

__all__ = ["PendingRequest", "copy_error", "shape_of"]


@dataclass(eq=False)
class PendingRequest:
    """One request's wait for its grant: what a Load for it starts, and the future it awaits."""

    id: int
    entry: ModelEntry
    want: LoadOptions
    keep_alive_ns: int
    granted: asyncio.Future[tuple[Instance, Action]]
    #: Bytes to reserve and GPU layers (-1 = all), once estimated (0 bytes: not yet).
    bytes: int = 0
    gpu_layers: int = -1
    #: Where keep_alive_ns came from (the loading request's is the model's first).
    keep_alive_origin: KeepAliveOrigin | None = None

    def too_large(self, reason: str) -> ModelTooLargeError:
        return ModelTooLargeError(
            f"model {self.entry.name!r} needs {gib(self.bytes)} with context {self.want.ctx}, "
            f"which fits on no device: {reason}"
        )


@functools.lru_cache(maxsize=1024)
def shape_of(want: LoadOptions) -> LoadShape:
    """The engine's LoadShape for these options (made once per distinct options)."""
    layers = None if want.gpu_layers == "auto" else int(want.gpu_layers)
    return LoadShape(want.ctx, want.parallel, want.kv_type, layers)


def copy_error(err: ResidencyError) -> ResidencyError:
    """A fresh exception per waiting request (one object raised in many tasks mixes tracebacks)."""
    if isinstance(err, RunnerError):
        copy = RunnerError.__new__(RunnerError)
        ResidencyError.__init__(copy, *err.args)
        copy.output_tail = err.output_tail
        copy.summary = err.summary
        return copy
    try:
        return type(err)(*err.args)
    except TypeError:
        return ResidencyError(str(err))
