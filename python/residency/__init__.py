"""residency: keeps the right LLMs resident in GPU (or host) memory and swaps them on demand."""

from __future__ import annotations

from residency._core import (
    AdmitDecision,
    AdmitOutcome,
    BudgetExceededError,
    Device,
    DeviceUsage,
    InvalidArgumentError,
    InvalidStateError,
    ModelBusyError,
    ModelStats,
    NotAcquiredError,
    Reservation,
    ReservationState,
    ResidencyError,
    ResidentSet,
    UnknownDeviceError,
    UnknownModelError,
    __version__,
    policy_names,
)
from residency.keepalive import KEEP_FOREVER, parse_keep_alive

__all__ = [
    "KEEP_FOREVER",
    "AdmitDecision",
    "AdmitOutcome",
    "BudgetExceededError",
    "Device",
    "DeviceUsage",
    "InvalidArgumentError",
    "InvalidStateError",
    "ModelBusyError",
    "ModelStats",
    "NotAcquiredError",
    "Reservation",
    "ReservationState",
    "ResidencyError",
    "ResidentSet",
    "UnknownDeviceError",
    "UnknownModelError",
    "__version__",
    "parse_keep_alive",
    "policy_names",
]
