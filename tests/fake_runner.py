"""A fake runner: a real process that speaks enough of the OpenAI API over HTTP for the scheduler.

It allocates its memory on a simulated device (residency.memory.SimulatedDevice), prints
llama.cpp-style buffer lines as its memory report, and can be told to misbehave:

    python tests/fake_runner.py --port 8080 --name m --bytes 1000000 --sim /tmp/dev
        [--load-s 0.5] [--fail-load] [--hang-health] [--crash-after-s 1] [--crash-on-request]
        [--request-s 0.2 [--spin]] [--chunk-s 0.5] [--fail-load-while FILE] [--child]
        [--ignore-term] [--no-report]
        [--offloaded 10/25 --host-bytes 300000000]   (a partial offload, as llama.cpp reports it)

Only the test suite uses it (through the `command` runner kind), never the package.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MIB = 1024 * 1024


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="fake")
    p.add_argument("--bytes", type=int, default=0, help="memory to allocate on the device")
    p.add_argument("--sim", default=None, help="simulated device file")
    p.add_argument("--load-s", type=float, default=0.0, help="busy loading this long")
    p.add_argument("--fail-load", action="store_true", help="exit 3 while loading")
    p.add_argument("--hang-health", action="store_true", help="never answer health checks")
    p.add_argument(
        "--hang-after-s", type=float, default=None, help="health hangs after this long (wedged)"
    )
    p.add_argument("--crash-after-s", type=float, default=None, help="exit 7 after this long")
    p.add_argument("--crash-on-request", action="store_true", help="die mid-request")
    p.add_argument("--request-s", type=float, default=0.0, help="each request takes this long")
    p.add_argument("--spin", action="store_true", help="busy (CPU) for --request-s, not asleep")
    p.add_argument("--chunk-s", type=float, default=0.0, help="pause between streamed chunks")
    p.add_argument("--fail-load-while", default=None, help="fail loading while this file exists")
    p.add_argument("--child", action="store_true", help="start a child that outlives SIGTERM")
    p.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (needs SIGKILL)")
    p.add_argument("--no-report", action="store_true", help="print no buffer-size lines")
    p.add_argument("--ctx", type=int, default=0)
    p.add_argument("--offloaded", default=None, help="report N/M layers offloaded to the GPU")
    p.add_argument("--host-bytes", type=int, default=0, help="report this much in CPU buffers")
    args = p.parse_args()

    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
    print(
        f"fake runner {args.name} starting (pid {os.getpid()}, ctx {args.ctx}, gpus {gpus})",
        flush=True,
    )
    deadline = time.monotonic() + args.load_s
    while time.monotonic() < deadline:  # a busy, talkative load: progress for the stall timer
        print("loading ...", flush=True)
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    if args.fail_load or (args.fail_load_while and os.path.exists(args.fail_load_while)):
        print("error: failed to load model: invalid magic number", flush=True)
        return 3

    device: Any = None
    handle: int | None = None
    if args.sim and args.bytes:
        from residency.memory import SimulatedDevice

        device = SimulatedDevice.open(args.sim)
        handle = device.allocate(args.bytes)
    if not args.no_report and args.bytes:
        # Like llama.cpp: buffers on the GPU it was given, or on the CPU when run on the host.
        where = "CPU" if os.environ.get("RESIDENCY_DEVICE", "host") == "host" else "CUDA0"
        mib = args.bytes / MIB
        print(f"load_tensors: {where:>10} model buffer size = {mib:.4f} MiB", flush=True)
    if args.host_bytes:  # the layers a partial offload left on the CPU
        mib = args.host_bytes / MIB
        print(f"load_tensors: CPU_Mapped model buffer size = {mib:.4f} MiB", flush=True)
    if args.offloaded:
        print(f"load_tensors: offloaded {args.offloaded} layers to GPU", flush=True)

    if args.child:
        # Same process group: stopping the runner must take it down too.
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal,time; signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN); time.sleep(600)",
            ]
        )

    def release_and_exit(code: int) -> None:
        if device is not None and handle is not None:
            device.free(handle)
        os._exit(code)

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: release_and_exit(0))
    if args.crash_after_s is not None:

        def crash() -> None:
            print("fatal: simulated crash (CUDA error: an illegal memory access)", flush=True)
            os._exit(7)  # no clean-up: the device reclaims a dead owner's memory, late

        threading.Timer(args.crash_after_s, crash).start()

    wedge_at = time.monotonic() + (args.hang_after_s or 0.0)
    state = {"requests": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: Any) -> None:
            pass

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in ("/v1/models", "/health"):
                wedged = args.hang_after_s is not None and time.monotonic() > wedge_at
                if args.hang_health or wedged:
                    time.sleep(3600)
                self._json(200, {"object": "list", "data": [{"id": args.name, "object": "model"}]})
            elif self.path == "/stats":
                self._json(200, {"pid": os.getpid(), "requests": state["requests"]})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            with lock:
                state["requests"] += 1
            if args.crash_on_request:
                print("fatal: simulated crash while serving a request", flush=True)
                os._exit(9)
            if args.request_s and args.spin:  # a prefill: the CPU is busy, nothing is sent yet
                until = time.monotonic() + args.request_s
                while time.monotonic() < until:
                    sum(range(10_000))
            elif args.request_s:
                time.sleep(args.request_s)
            text = f"reply from {args.name}"
            if self.path == "/v1/chat/completions":
                if body.get("stream"):
                    self._stream(text)
                    return
                self._json(
                    200,
                    {
                        "object": "chat.completion",
                        "model": args.name,
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                    },
                )
            elif self.path == "/v1/completions":
                self._json(
                    200,
                    {
                        "object": "text_completion",
                        "model": args.name,
                        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                    },
                )
            elif self.path == "/v1/embeddings":
                self._json(
                    200,
                    {
                        "object": "list",
                        "model": args.name,
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    },
                )
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def _stream(self, text: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for word in text.split():
                chunk = {
                    "object": "chat.completion.chunk",
                    "model": args.name,
                    "choices": [{"index": 0, "delta": {"content": word + " "}}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(args.chunk_s)
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"fake runner {args.name} listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
