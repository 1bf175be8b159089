"""How users start residency on Ray: the Serve config file, and ``residency serve --ray``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from residency.runners import free_port
from scheduler_helpers import FAKE_RUNNER, alive
from serve_process import wait_until

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "deploy" / "ray-serve.yaml"

MODEL = f"""
discover = false
host_cache_bytes = 0
[[models]]
name = "fake"
path = "{FAKE_RUNNER}"
runner = "command"
memory = 8000000
ctx = 512
command = ["{sys.executable}", "{FAKE_RUNNER}", "--port", "{{port}}", "--name", "{{name}}"]
"""


def test_serve_config_file_is_valid_and_builds(tmp_path: Path) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from residency.ray.app import app_builder

    data = yaml.safe_load(CONFIG_FILE.read_text())
    schema = ServeDeploySchema.model_validate(data)
    [app] = schema.applications
    assert app.import_path == "residency.ray.app:app_builder"
    config = tmp_path / "residency.toml"
    config.write_text(MODEL)
    args = {**app.args, "config": str(config)}
    built = app_builder(args)
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown residency args"):
        app_builder({**args, "replica": 3})


@pytest.mark.timeout(240)
def test_residency_serve_ray_starts_a_local_cluster_serves_and_stops(tmp_path: Path) -> None:
    config = tmp_path / "residency.toml"
    config.write_text(MODEL)
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "residency",
                "serve",
                "--ray",
                "--config",
                str(config),
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(url + "/api/version", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 180, "residency serve --ray to answer")
        # Deployed (serve.run returned), not only answering: SIGINT now tests the stop path.
        wait_until(lambda: b"residency on Ray:" in log.read_bytes(), 180, "the deploy")
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text + log.read_text(errors="replace")[-3000:]
        assert r.json()["choices"][0]["message"]["content"].startswith("reply from fake")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert not [p for p in _fake_runners() if alive(p)]


def _fake_runners() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(FAKE_RUNNER).encode() in cmd and b"fake" in cmd:
                pids.append(int(entry))
    return pids
