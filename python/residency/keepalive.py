"""Keep-alive values as Ollama accepts them, turned into the core's nanoseconds.

Ollama takes a duration string (``"5m"``, ``"1h30m"``, ``"300ms"``), a number of seconds (``300``,
``"300"``), a negative value for "keep forever" and ``0`` for "unload as soon as the request ends".
"""

from __future__ import annotations

import math
import re

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
