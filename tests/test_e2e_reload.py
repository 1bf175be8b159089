"""End to end (issue 14, item 6): `residency serve` over real llama-server runners re-reads its
configuration on POST /api/residency/reload and on SIGHUP — only the model whose configuration
changed gets a new runner, a removed model finishes its request in flight and stops, an added one
loads, and an invalid file is refused whole while the old configuration keeps serving."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llama_server_fixtures import Server, require_llama_server, runner_pids, start_server
from residency.embedded import default_model_path
from serve_process import wait_until

require_llama_server()

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def config(models: dict[str, int]) -> str:
    """name → ctx, each the embedded Gemma on llama-server."""
    text = 'runner = "auto"\nkeep_alive = "5m"\n'
    for name, ctx in models.items():
        text += f'[[models]]\nname = "{name}"\npath = "{default_model_path()}"\nctx = {ctx}\n'
    return text


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from start_server(tmp_path, config({"first": 512, "second": 512, "third": 512}))


def rewrite(server: Server, models: dict[str, int] | None, raw: str | None = None) -> None:
    path = server.log_path.with_name("residency.toml")
    kv = f'kv_dir = "{server.kv_dir}"\n'  # as start_server wrote it
    path.write_text(kv + (raw if raw is not None else config(models or {})))


def pids_by_model(server: Server) -> dict[str, int]:
    out = {}
    for pid in runner_pids(server.proc.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        out[argv[argv.index(b"--alias") + 1].decode().removesuffix(":latest")] = pid
    return out


def load(server: Server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/api/generate", json={"model": model}, timeout=180)


def test_reload_restarts_only_what_changed(server: Server) -> None:
    for model in ("first", "second", "third"):
        assert load(server, model).status_code == 200
    before = pids_by_model(server)
    assert set(before) == {"first", "second", "third"}

    # A long answer from `third` is streaming while the reload removes it: it must finish.
    body = {"model": "third", "prompt": "Count from one to one hundred.", "stream": True,
            "options": {"temperature": 0, "num_predict": 64}}  # fmt: skip
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=180) as stream:
        lines = stream.iter_lines()
        assert json.loads(next(lines))["done"] is False
        rewrite(server, {"first": 1024, "second": 512, "fourth": 512})
        r = httpx.post(server.url + "/api/residency/reload", timeout=60)
        assert r.status_code == 200, r.text
        report = r.json()
        assert (report["added"], report["removed"], report["changed"]) == (
            ["fourth"], ["third"], ["first"]
        )  # fmt: skip
        assert report["restart_required"] == []
        *_, last = (json.loads(line) for line in lines)
    assert last["done"] is True  # served to the end by the runner being removed

    # The removed model's runner stops once drained; the changed one's idle runner at once.
    wait_until(lambda: set(pids_by_model(server)) == {"second"}, 60, "first and third stopped")
    assert pids_by_model(server)["second"] == before["second"]  # untouched
    assert load(server, "third").status_code == 404
    assert load(server, "first").status_code == 200
    first = pids_by_model(server)["first"]
    assert first != before["first"]
    argv = Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--ctx-size") + 1] == b"1024"  # the new configuration
    assert load(server, "fourth").status_code == 200
    kept = pids_by_model(server)
    assert kept["second"] == before["second"]

    # An invalid file is refused whole: a clear 4xx, and nothing changes.
    rewrite(server, None, raw='[[models]]\nname = "first"\npath = \n')
    r = httpx.post(server.url + "/api/residency/reload", timeout=60)
    assert r.status_code == 422
    assert "the one in use is unchanged" in r.json()["error"]
    assert "residency.toml" in r.json()["error"]
    # So is a valid file naming a model file that does not exist (checked before any change).
    ghost = '[[models]]\nname = "ghost"\npath = "/nonexistent.gguf"\n'
    rewrite(server, None, raw=config({"first": 1024, "second": 512}) + ghost)
    r = httpx.post(server.url + "/api/residency/reload", timeout=60)
    assert r.status_code == 422
    assert "/nonexistent.gguf does not exist" in r.json()["error"]
    assert pids_by_model(server) == kept
    tags = {m["name"] for m in httpx.get(server.url + "/api/tags", timeout=10).json()["models"]}
    assert tags == {"first:latest", "second:latest", "fourth:latest"}

    # SIGHUP applies a valid file the same way: `fourth` removed, the rest untouched.
    rewrite(server, {"first": 1024, "second": 512})
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_until(lambda: "fourth" not in pids_by_model(server), 60, "fourth stopped on SIGHUP")
    assert pids_by_model(server) == {"first": first, "second": before["second"]}
    assert "reloaded (SIGHUP)" in server.log()
    assert "refused, the configuration in use is unchanged" in server.log()
