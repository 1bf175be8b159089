"""Every error residency raises is a ResidencyError; the core's come from C++, the rest from here.

Each one fails the request it belongs to with a message fit for the user; none leaves state behind.
"""

from __future__ import annotations

from residency._core import (
    BudgetExceededError,
    InvalidArgumentError,
    InvalidStateError,
    ModelBusyError,
    NotAcquiredError,
    ResidencyError,
    UnknownDeviceError,
    UnknownModelError,
)

__all__ = [
    "BudgetExceededError",
    "ConfigError",
    "EstimateError",
    "InvalidArgumentError",
    "InvalidStateError",
    "ModelBusyError",
    "ModelNotFoundError",
    "ModelTooLargeError",
    "NotAcquiredError",
    "ResidencyError",
    "RunnerError",
    "ServerBusyError",
    "UnknownDeviceError",
    "UnknownModelError",
]


class ConfigError(ResidencyError):
    """A configuration file, variable or option that cannot be used."""


class EstimateError(ResidencyError):
    """A model file whose memory cannot be estimated: not GGUF, truncated, unsupported."""


class ModelNotFoundError(ResidencyError):
    """No model by that name is configured (HTTP 404)."""


class ModelTooLargeError(ResidencyError):
    """The model fits on no device, even partially offloaded."""


class ServerBusyError(ResidencyError):
    """The pending queue is full (HTTP 503 with Retry-After)."""

    #: The error code clients see.
    code = "server_busy"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RunnerError(ResidencyError):
    """A runner failed to start, crashed, or stopped answering; carries its last output lines."""

    def __init__(self, message: str, output_tail: str = "") -> None:
        super().__init__(
            f"{message}\n--- runner output ---\n{output_tail}" if output_tail else message
        )
        #: What went wrong, without the runner's output (which may hold other requests' text).
        self.summary = message
        self.output_tail = output_tail
