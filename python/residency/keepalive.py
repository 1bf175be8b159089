"""Keep-alive values as Ollama accepts them, turned into the core's nanoseconds.

Ollama takes a duration string (``"5m"``, ``"1h30m"``, ``"300ms"``), a number of seconds (``300``,
``"300"``), a negative value for "keep forever" and ``0`` for "unload as soon as the request ends".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from residency._core import InvalidArgumentError

#: The core's "never expires" keep-alive.
KEEP_FOREVER = -1

_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
# Go's time.ParseDuration grammar, which Ollama uses: an optional sign, then number+unit pairs.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: str | float | None, default_ns: int = 5 * 60 * 1_000_000_000) -> int:
    """Returns the keep-alive in nanoseconds: < 0 forever, 0 unload when idle.

    ``None`` gives ``default_ns``. Raises InvalidArgumentError for anything unparseable.
    """
    if value is None:
        return default_ns
    if isinstance(value, bool):
        raise InvalidArgumentError(f"keep_alive must be a duration or a number, not {value!r}")
    if isinstance(value, int | float):
        return _seconds_to_ns(float(value), value)
    text = value.strip()
    try:
        return _seconds_to_ns(float(text), value)
    except ValueError:
        pass
    sign = 1
    if text and text[0] in "+-":
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if not text:
        raise InvalidArgumentError(f"keep_alive {value!r} is not a duration")
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _NS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise InvalidArgumentError(
            f"keep_alive {value!r} is not a duration (use e.g. '5m', '1h30m', '300', '-1', '0')"
        )
    if sign < 0 and total > 0:
        return KEEP_FOREVER
    return _seconds_to_ns(total / 1e9, value)


#: A century is forever for a process (and anything longer would overflow the core's int64).
_FOREVER_AFTER_S = 100 * 365 * 24 * 3600


def _seconds_to_ns(seconds: float, original: object) -> int:
    if math.isnan(seconds):
        raise InvalidArgumentError(f"keep_alive {original!r} is not a duration")
    if seconds < 0 or seconds > _FOREVER_AFTER_S:  # +inf included
        return KEEP_FOREVER
    return int(seconds * 1_000_000_000)


def format_keep_alive(ns: int) -> str:
    """The inverse for display: ``"forever"``, ``"0s"``, ``"5m0s"``-style."""
    if ns < 0:
        return "forever"
    seconds, rest = divmod(ns, 1_000_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}h" if hours else ""
    text += f"{minutes}m" if minutes or hours else ""
    return text + (f"{seconds}.{rest:09d}".rstrip("0").rstrip(".") + "s")


# ---- governance: what a client's keep_alive may do ----------------------------------------
#: What to do with the keep_alive a client sends: "clamp" it into [min, max] (with no bounds set,
#: the value is used as sent, as Ollama does), "honour" it as sent whatever the bounds (a trusted
#: key or model), or "ignore" it (the model's or the server's default applies).
ClientKeepAlive = Literal["honour", "clamp", "ignore"]
CLIENT_KEEP_ALIVE_MODES: tuple[ClientKeepAlive, ...] = ("honour", "clamp", "ignore")

#: Where a model's keep-alive came from, as /api/ps shows it.
KeepAliveSource = Literal["request", "model", "server", "policy"]


@dataclass(frozen=True)
class KeepAliveRule:
    """The operator's rule for clients' keep_alive; None fields defer to the next level
    (key → model → server, most specific first)."""

    client: ClientKeepAlive | None = None
    #: Bounds in ns (< 0: forever); None = unbounded on that side.
    min_ns: int | None = None
    max_ns: int | None = None

    def over(self, base: KeepAliveRule) -> KeepAliveRule:
        """This rule's fields where set, `base`'s elsewhere."""
        return KeepAliveRule(
            client=self.client if self.client is not None else base.client,
            min_ns=self.min_ns if self.min_ns is not None else base.min_ns,
            max_ns=self.max_ns if self.max_ns is not None else base.max_ns,
        )

    @classmethod
    def parse(
        cls, client: ClientKeepAlive | None, min_text: str | None, max_text: str | None
    ) -> KeepAliveRule:
        lo = None if min_text is None else parse_keep_alive(min_text)
        hi = None if max_text is None else parse_keep_alive(max_text)
        if lo is not None and hi is not None and _longer(lo, hi):
            raise InvalidArgumentError(
                f"keep_alive_min {min_text!r} is longer than keep_alive_max {max_text!r}"
            )
        return cls(client, lo, hi)


@dataclass(frozen=True)
class KeepAliveClient:
    """Who sent a request, for "which client set it last": its API key's name and its peer."""

    key: str | None = None
    peer: str | None = None
    #: The key's own rule (the most specific level), if it has one.
    rule: KeepAliveRule | None = None


@dataclass(frozen=True)
class KeepAliveChoice:
    """The keep-alive one request applies when it ends, and why."""

    #: ns to apply (< 0 forever, 0 unload when idle); None = keep the model's current value.
    ns: int | None
    source: KeepAliveSource
    #: What the client asked for (ns), when it asked.
    requested_ns: int | None = None


@dataclass(frozen=True)
class KeepAliveOrigin:
    """Where a resident model's keep-alive came from, and which client set it (/api/ps)."""

    choice: KeepAliveChoice
    client: KeepAliveClient | None = None

    @classmethod
    def of(cls, choice: KeepAliveChoice, client: KeepAliveClient | None) -> KeepAliveOrigin:
        """The client counts as its setter only when its own value (bounded or not) applied."""
        return cls(choice, client if choice.source in ("request", "policy") else None)


def govern(
    asked_ns: int | None, default_ns: int, default_source: KeepAliveSource, rule: KeepAliveRule
) -> KeepAliveChoice:
    """The keep-alive a request applies: its own, bounded or replaced as `rule` says.

    The bounds apply to what clients ask; the operator's own defaults are taken as configured.
    """
    if asked_ns is None:
        return KeepAliveChoice(None, default_source)
    mode = rule.client or "clamp"
    if mode == "honour":
        return KeepAliveChoice(asked_ns, "request", asked_ns)
    if mode == "ignore":
        return KeepAliveChoice(default_ns, default_source, asked_ns)
    ns = asked_ns
    if rule.min_ns is not None and _longer(rule.min_ns, ns):
        ns = rule.min_ns
    if rule.max_ns is not None and _longer(ns, rule.max_ns):
        ns = rule.max_ns
    return KeepAliveChoice(ns, "request" if ns == asked_ns else "policy", asked_ns)


def _longer(a: int, b: int) -> bool:
    """Whether keep-alive `a` keeps a model longer than `b` (negative = forever)."""
    if a < 0:
        return b >= 0
    return b >= 0 and a > b
