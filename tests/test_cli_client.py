"""The client verbs' formatting (as Ollama prints) and where they look for the server."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from residency.cli import main
from residency.cli_client import Client, human_bytes, human_time, parse_time, processor

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1_000, "1 KB"),
        (291_554_930, "291 MB"),
        (1_200_000_000, "1.2 GB"),
        (3_000_000_000, "3 GB"),
        (17_300_000_000, "17 GB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(minutes=4, seconds=30), "4 minutes from now"),
        (timedelta(seconds=70), "About a minute from now"),
        (timedelta(seconds=20), "20 seconds from now"),
        (timedelta(hours=1, minutes=5), "About an hour from now"),
        (-timedelta(days=3, hours=1), "3 days ago"),
        (timedelta(days=292 * 365), "Forever"),  # keep_alive -1
    ],
)
def test_human_time(delta: timedelta, text: str) -> None:
    iso = (NOW + delta).isoformat().replace("+00:00", "Z")
    assert human_time(iso, now=NOW) == text
    assert human_time(None) == "Never"


def test_parse_time_takes_gos_rfc3339() -> None:
    when = parse_time("2026-01-01T12:00:00.123456789Z")
    assert when == NOW.replace(microsecond=123456)
    offset = parse_time("2024-06-04T14:38:31.83753-07:00")
    assert offset is not None
    assert offset.utcoffset() == timedelta(hours=-7)
    assert parse_time("yesterday") is None


def test_processor() -> None:
    assert processor(1000, 0) == "100% CPU"
    assert processor(1000, 1000) == "100% GPU"
    assert processor(1000, 520) == "48%/52% CPU/GPU"


def test_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OLLAMA_HOST", "RESIDENCY_HOST", "RESIDENCY_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert Client().url == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:11500")  # a server on every interface
    assert Client().url == "http://127.0.0.1:11500"
    monkeypatch.setenv("RESIDENCY_HOST", "http://box.lan")
    assert Client().url == "http://box.lan:11434"
    monkeypatch.setenv("RESIDENCY_PORT", "9000")
    assert Client().url == "http://box.lan:9000"
    assert Client("https://[::1]:8443").url == "https://[::1]:8443"


def test_pull_explains_that_models_are_managed_on_disk(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "llama3.2"]) == 1
    err = capsys.readouterr().err
    assert "serves the models already on disk" in err
    assert "ollama pull" in err


def test_a_bad_host_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ps", "--host", "ftp://x"]) == 1
    assert "only http:// and https://" in capsys.readouterr().err
