"""What crosses between the ingress and a model-server replica: errors and lease timings.

Exceptions travel through Ray by pickling, and most of residency's (and ApiError) do not survive
it (their constructors take more than their message). A replica therefore sends every failure
as a :class:`RemoteError` carrying the status and message the API would have answered with, and
the ingress raises that as the same :class:`ApiError` a single-node server raises. A replica
that died, or could not be reached, becomes a 502/503 that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from residency.api.errors import ApiError, api_error
from residency.errors import (
    ModelNotFoundError,
    ModelTooLargeError,
    ResidencyError,
    RunnerError,
    ServerBusyError,
)
from residency.runners.protocol import RunnerFailed, RunnerRejected

__all__ = ["RemoteError", "as_api_error", "lease_info"]


#: The residency errors a replica's failure is raised as again at the ingress, most specific
#: first: code there that catches one (a runner that cannot count tokens) behaves as locally.
_KINDS: tuple[type[ResidencyError], ...] = (
    RunnerRejected,
    RunnerFailed,
    RunnerError,
    ServerBusyError,
    ModelNotFoundError,
    ModelTooLargeError,
)


class RemoteError(Exception):
    """A replica's failure: the status and message its API answer would carry, and the kind of
    residency error it was (None: raised again as an ApiError)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        kind: str | None = None,
        text: str = "",
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.kind = kind
        self.text = text

    @classmethod
    def of(cls, err: BaseException) -> RemoteError:
        e = api_error(err)
        kind = next((k.__name__ for k in _KINDS if isinstance(err, k)), None)
        text = err.message if isinstance(err, RunnerRejected) else str(err)
        return cls(e.status, e.message, code=e.code, headers=e.headers, kind=kind, text=text)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickled with its keywords (Exception's own reduce passes only args).
        fields = {"code": self.code, "headers": self.headers, "kind": self.kind, "text": self.text}
        return _rebuild, (self.status, self.message, fields)

    def rebuilt(self) -> Exception:
        """The error as the ingress raises it."""
        for k in _KINDS:
            if k.__name__ == self.kind:
                if k is ServerBusyError:
                    return ServerBusyError(self.text, float(self.headers.get("Retry-After", 1)))
                return k(self.text)
        return ApiError(self.status, self.message, code=self.code, headers=self.headers)

    def __str__(self) -> str:
        return self.message


def _rebuild(status: int, message: str, fields: dict[str, Any]) -> RemoteError:
    return RemoteError(status, message, **fields)


def as_api_error(err: BaseException) -> Exception | None:
    """The error to raise for an exception a call to a replica raised (the replica's own error
    rebuilt, or an ApiError for a replica that died); None if it is not one of Ray's (a local
    error, which the caller lets propagate as it is)."""
    import ray.exceptions as rex

    cause: BaseException | None = err
    if isinstance(err, rex.RayTaskError):
        cause = err.cause
    if isinstance(cause, RemoteError):
        return cause.rebuilt()
    if isinstance(err, rex.ActorDiedError | rex.ActorUnavailableError | rex.RayActorError):
        return ApiError(
            502,
            f"the model-server replica serving this request died or became unreachable "
            f"({type(err).__name__}); Ray Serve restarts it, retry the request",
            code="replica_failed",
        )
    if isinstance(err, rex.RayError):
        return ApiError(502, f"the model-server replica failed: {_first_line(err)}")
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:500] if text else type(err).__name__


def lease_info(lease: Any, replica: str, node: str) -> dict[str, Any]:
    """A replica-side lease's timings and place, for the ingress's lease."""
    return {
        "cold": lease.cold,
        "load_duration_ns": lease.load_duration_ns,
        "queue_duration_ns": lease.queue_duration_ns,
        "device": lease.device,
        "replica": replica,
        "node": node,
    }
