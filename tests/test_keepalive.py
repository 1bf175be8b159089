from __future__ import annotations

import pytest

from residency import KEEP_FOREVER, InvalidArgumentError, parse_keep_alive
from residency.keepalive import format_keep_alive

S = 1_000_000_000
DEFAULT = 300 * S


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, DEFAULT),
        ("5m", 300 * S),
        ("1h30m", 5400 * S),
        ("1.5s", 1_500_000_000),
        ("300ms", 300_000_000),
        ("10", 10 * S),
        (10, 10 * S),
        (2.5, 2_500_000_000),
        (0, 0),
        ("0", 0),
        ("0s", 0),
        (-1, KEEP_FOREVER),
        ("-1", KEEP_FOREVER),
        ("-5m", KEEP_FOREVER),
        (1e12, KEEP_FOREVER),
    ],
)
def test_ollama_keep_alive_forms(value: str | float | None, expected: int) -> None:
    assert parse_keep_alive(value, DEFAULT) == expected


@pytest.mark.parametrize("value", ["", "5 minutes", "m5", "5x", "1h-2m", True, float("nan")])
def test_unparseable_keep_alive_is_refused(value: str | float) -> None:
    with pytest.raises(InvalidArgumentError, match="keep_alive"):
        parse_keep_alive(value, DEFAULT)


def test_format() -> None:
    assert format_keep_alive(-1) == "forever"
    assert format_keep_alive(0) == "0s"
    assert format_keep_alive(5400 * S) == "1h30m0s"
    assert format_keep_alive(1_500_000_000) == "1.5s"


@pytest.mark.parametrize("value", ["99999999999999999999h", "1e30", 1e30, "876000h1s"])
def test_a_duration_beyond_a_century_means_forever(value: str | float) -> None:
    # Never an overflow of the core's int64 nanoseconds: the TOML and OLLAMA_KEEP_ALIVE paths too.
    assert parse_keep_alive(value) == KEEP_FOREVER
