"""`pip wheel .` gives a wheel that imports and works in a clean virtualenv (no sources)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import residency
from residency import AdmitOutcome, Device, ResidentSet
assert "site-packages" in residency.__file__, residency.__file__
rs = ResidentSet([Device("gpu0", 10 << 30, 1 << 30, 3)])
assert rs.admit("m", 1 << 30, 0, -1).outcome is AdmitOutcome.LOAD
print(residency.__version__)
"""


@pytest.mark.timeout(900)
def test_wheel_imports_in_a_clean_virtualenv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "-w",
            str(wheels),
            f"-Cbuild-dir={tmp_path / 'build'}",
            "-q",
        ],
        check=True,
    )
    (wheel,) = wheels.glob("residency-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    out = subprocess.run(
        [python, "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == wheel.name.split("-")[1]
