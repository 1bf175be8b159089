"""How soon a client that leaves stops its generation on the runner, through residency, against
the same client talking to llama-server directly, interleaved in one run.

`residency serve` runs the embedded Gemma 3 270M on llama-server with one slot. Each try asks
for a long generation (3,000 tokens, temperature 0) on a raw socket and closes it once the
runner's ``/slots`` shows 5 tokens decoded — a client that disconnects or times out right then.

- ``disconnect_to_idle``: from the close until the runner's slot is idle (``/slots`` polled every
  10 ms), through residency, per API and mode. Not measured for the direct unstreamed request:
  llama-server checks such a request's connection only after a second with no result for any
  task, and a ``/slots`` query is such a result — polling would keep it generating.
- ``tokens_seen_after_disconnect``: the slot's decoded count last seen busy, less its count at
  the close (a lower bound by up to the last token: a released slot's count reads 0).
- ``next_request``: from the close until a 4-token request sent right after it is answered: the
  queue time a runaway generation would add, against the same small request on an idle runner.
  Baselines: the direct unstreamed request (what residency passed on before) and direct streamed.

    python benchmarks/bench_cancel.py [--tries 5] [--quick]

Last stdout line, one JSON object: medians (and maxima) in ms per mode, the most tokens seen
generated for nobody, and the idle runner's small request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from residency.embedded import default_model_path
from residency.runners.build import find_llama_server

LONG = 3000
PROMPT = "Count from 1 to 10000, one number per line."
#: (name, target, path, streamed) — target "residency" or "direct" (the runner itself).
MODES = [
    ("ollama_chat_stream", "residency", "/api/chat", True),
    ("ollama_generate_whole", "residency", "/api/generate", False),
    ("openai_chat_stream", "residency", "/v1/chat/completions", True),
    ("openai_chat_whole", "residency", "/v1/chat/completions", False),
    ("direct_chat_stream", "direct", "/v1/chat/completions", True),
    ("direct_chat_whole", "direct", "/v1/chat/completions", False),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "RESIDENCY_"))}
    if os.environ.get("RESIDENCY_CACHE_DIR"):
        env["RESIDENCY_CACHE_DIR"] = os.environ["RESIDENCY_CACHE_DIR"]
    argv = [sys.executable, "-m", "residency", "serve", "--port", str(port),
            "--config", str(config), "--log-level", "warning"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                sys.exit(f"residency serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"residency serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def runner_port(parent: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"llama-server" in argv[0]:
            return int(argv[argv.index(b"--port") + 1])
    sys.exit("no llama-server runner found")


def slot(runner: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(runner + "/slots", timeout=10).json()[0]
    return data


def long_body(path: str, streamed: bool) -> dict[str, Any]:
    if path.startswith("/api/"):
        body: dict[str, Any] = {"model": "gemma", "stream": streamed}
        body["options"] = {"num_predict": LONG, "temperature": 0}
    else:
        body = {"model": "gemma", "stream": streamed, "max_tokens": LONG, "temperature": 0}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return body


def open_request(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


def wait_generating(runner: str, before: Any) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        s = slot(runner)
        if s["is_processing"] and s.get("id_task") != before and decoded(s) >= 5:
            return
        time.sleep(0.02)
    sys.exit("the runner never started generating")


def decoded(s: dict[str, Any]) -> int:
    return int(s.get("next_token", [{}])[0].get("n_decoded", 0))


def wait_idle(runner: str) -> int:
    """Until the slot is idle; the last count of decoded tokens seen while it was busy (a
    released slot's count reads 0)."""
    deadline = time.monotonic() + 300
    last = 0
    while (s := slot(runner))["is_processing"]:
        last = decoded(s)
        if time.monotonic() > deadline:
            sys.exit("the runner's slot never went idle")
        time.sleep(0.01)
    return last


def small(url: str) -> None:
    body = {"model": "gemma", "prompt": "Say hi.", "stream": False}
    body["options"] = {"num_predict": 4, "temperature": 0}
    r = httpx.post(url + "/api/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text


def small_direct(runner: str) -> None:
    body = {"prompt": "Say hi.", "max_tokens": 4, "temperature": 0}
    r = httpx.post(runner + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text


def disconnect(url: str, runner: str, mode: tuple[str, str, str, bool]) -> tuple[float, int]:
    """Asks for the long generation, closes the socket once it is under way: when (perf s), and
    the tokens decoded by then."""
    _, target, path, streamed = mode
    before = slot(runner).get("id_task")
    sock = open_request(runner if target == "direct" else url, path, long_body(path, streamed))
    wait_generating(runner, before)
    at_close = decoded(slot(runner))
    t0 = time.perf_counter()
    sock.close()
    return t0, at_close


Try = tuple[float | None, int | None, float]


def one_try(url: str, runner: str, mode: tuple[str, str, str, bool]) -> Try:
    """(disconnect → slot idle ms and tokens seen decoded after the close, both None where
    polling would disturb them; disconnect → the next small request answered ms). Two long
    requests: a /slots poll would disturb what the next request measures for an unstreamed
    direct request, so each is measured alone."""
    _, target, _, streamed = mode
    direct = target == "direct"
    to_idle: float | None = None
    extra: int | None = None
    if not (direct and not streamed):
        t0, at_close = disconnect(url, runner, mode)
        last = wait_idle(runner)
        to_idle = (time.perf_counter() - t0) * 1e3
        extra = max(0, last - at_close)
    t0, _ = disconnect(url, runner, mode)
    if direct:
        small_direct(runner)
    else:
        small(url)
    next_ms = (time.perf_counter() - t0) * 1e3
    wait_idle(runner)
    return to_idle, extra, next_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 try")
    args = ap.parse_args()
    if args.quick:
        args.tries = 1
    binary = find_llama_server()
    if binary is None:
        sys.exit("no llama-server: build it with residency build-runner")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "residency.toml"
        config.write_text(
            f'runner = "llama-server"\nllama_server = "{binary}"\nkv_persist = false\n'
            f'keep_alive = "-1"\n[[models]]\nname = "gemma"\npath = "{default_model_path()}"\n'
            "parallel = 1\nctx = 4096\n"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        idle: list[float] = []
        to_idle: dict[str, list[float]] = {m[0]: [] for m in MODES}
        next_ms: dict[str, list[float]] = {m[0]: [] for m in MODES}
        tokens_after: dict[str, list[int]] = {m[0]: [] for m in MODES}
        with serving(config, port, tmp / "residency.log") as proc:
            small(url)  # loads the model
            runner = f"http://127.0.0.1:{runner_port(proc.pid)}"
            for i in range(args.tries):
                t0 = time.perf_counter()
                small(url)
                idle.append((time.perf_counter() - t0) * 1e3)
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    gone, extra, after = one_try(url, runner, mode)
                    if gone is not None and extra is not None:
                        to_idle[mode[0]].append(gone)
                        tokens_after[mode[0]].append(extra)
                    next_ms[mode[0]].append(after)
                print(
                    f"try {i}: idle runner {idle[-1]:.0f} ms; "
                    + ", ".join(
                        f"{m}: idle after {to_idle[m][-1]:.0f} ms, " if to_idle[m] else f"{m}: "
                        for m in to_idle
                    )
                    + "; next request "
                    + ", ".join(f"{m} {v[-1]:.0f} ms" for m, v in next_ms.items()),
                    flush=True,
                )

    def p50(values: list[float]) -> float:
        return round(statistics.median(values), 1)

    result = {
        "disconnect_to_idle_p50_ms": {m: p50(v) for m, v in to_idle.items() if v},
        "disconnect_to_idle_max_ms": {m: round(max(v), 1) for m, v in to_idle.items() if v},
        "tokens_seen_after_disconnect_max": {m: max(v) for m, v in tokens_after.items() if v},
        "next_request_p50_ms": {m: p50(v) for m, v in next_ms.items()},
        "idle_runner_request_p50_ms": p50(idle),
        "next_request_ratio_vs_direct_unstreamed": round(
            p50(next_ms["openai_chat_whole"]) / p50(next_ms["direct_chat_whole"]), 3
        ),
        "tries": args.tries,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
