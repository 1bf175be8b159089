"""The package as users get it: version, console script, the stub matching the compiled module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import residency

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_the_distribution() -> None:
    from importlib.metadata import version

    assert residency.__version__ == version("residency")


@pytest.mark.timeout(60)
def test_console_script_prints_the_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "residency", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"residency {residency.__version__}"


@pytest.mark.timeout(300)
def test_stub_matches_the_compiled_module() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "residency._core",
            "--allowlist",
            str(ROOT / "tests" / "stubtest_allowlist.txt"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_error_is_a_residency_error() -> None:
    from residency import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), residency.ResidencyError), name
