"""How a call to a runner can fail on the way (runners.http raises them; the protocol and the
upstream watch tell them apart)."""

from __future__ import annotations

__all__ = ["TransportError", "Unanswered", "UpstreamTimeout"]


class TransportError(Exception):
    """The runner could not be reached, or the connection failed before the answer was complete
    (refused, reset, closed early, timed out, or an answer that is not HTTP)."""


class UpstreamTimeout(TransportError):
    """The runner sent nothing for a request for too long (see runners.upstream): never resent."""


class Unanswered(TransportError):
    """The runner refused or dropped a new connection without a byte of answer (it is dead or
    dying, as a rule: the caller may ask a fresh runner)."""
