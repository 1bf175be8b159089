"""The verbs Ollama users type — ``ps``, ``list``, ``show``, ``stop``, ``run``, ``pull``, ``rm`` —
as clients of a running server (``--host``, else ``OLLAMA_HOST``/``RESIDENCY_HOST``, else
127.0.0.1:11434). Tables read as Ollama prints them; ``--json`` prints the server's JSON for
scripts. Only the standard library: the CLI must start fast and need nothing the server does not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import sys
from collections.abc import Generator, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO
from urllib.parse import urlsplit

from residency.errors import ResidencyError

__all__ = [
    "Client",
    "ServerError",
    "add_commands",
    "human_bytes",
    "human_time",
    "parse_time",
    "processor",
    "table",
]

DEFAULT_HOST = "127.0.0.1:11434"
_TIMEOUT_S = 30.0
#: A model load may take minutes (a large model from disk); generation streams may be long too.
LONG_TIMEOUT_S = 600.0


class ServerError(Exception):
    """The server answered with an error, or could not be reached."""


class Client:
    """A tiny Ollama API client over http.client (one connection per call)."""

    def __init__(self, host: str | None = None) -> None:
        env = os.environ.get("RESIDENCY_HOST") or os.environ.get("OLLAMA_HOST")
        text = host or env or DEFAULT_HOST
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            raise ServerError(f"host {text!r}: only http:// and https:// are supported")
        # A server listening on every interface is reached through loopback, as Ollama's CLI does.
        hostname = parts.hostname or "127.0.0.1"
        self.hostname = "127.0.0.1" if hostname in ("0.0.0.0", "::") else hostname
        try:
            # `residency serve` also reads RESIDENCY_PORT when the host names no port.
            port_env = os.environ.get("RESIDENCY_PORT", "")
            default = 443 if parts.scheme == "https" else 11434
            self.port = parts.port or (int(port_env) if port_env.isdigit() else default)
        except ValueError as err:
            raise ServerError(f"host {text!r}: {err}") from None
        self.https = parts.scheme == "https"
        shown = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        self.url = f"{parts.scheme}://{shown}:{self.port}"

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.hostname, self.port, timeout=timeout)

    def _send(
        self, method: str, path: str, body: Any, timeout: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connection(timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise ServerError(f"no answer from {self.url} within {timeout:.0f} s") from None
        except OSError as err:
            conn.close()
            raise ServerError(
                f"could not connect to residency at {self.url} ({err.strerror or err}); "
                "is `residency serve` running? (--host or OLLAMA_HOST say where)"
            ) from None
        if response.status >= 400:
            text = response.read().decode(errors="replace")
            conn.close()
            try:
                message = json.loads(text).get("error") or text
            except (ValueError, AttributeError):
                message = text
            raise ServerError(str(message).strip() or f"HTTP {response.status}")
        return conn, response

    def call(self, method: str, path: str, body: Any = None, *, long: bool = False) -> Any:
        """One request's JSON answer; `long` for loads and generations (minutes, not seconds)."""
        conn, response = self._send(method, path, body, LONG_TIMEOUT_S if long else _TIMEOUT_S)
        try:
            return json.loads(response.read() or b"null")
        finally:
            conn.close()

    def stream(self, path: str, body: Any) -> Generator[dict[str, Any], None, None]:
        """The NDJSON objects of a streamed answer; closing the generator closes the connection
        (which is how a generation is cancelled: the server stops the runner's request)."""
        conn, response = self._send("POST", path, body, LONG_TIMEOUT_S)
        try:
            for line in response:
                if line.strip():
                    chunk: dict[str, Any] = json.loads(line)
                    if chunk.get("error"):
                        raise ServerError(str(chunk["error"]))
                    yield chunk
        finally:
            conn.close()


# ---- formatting as Ollama prints -------------------------------------------------------------
def human_bytes(n: int) -> str:
    """Decimal units as Ollama's format.HumanBytes: 291 MB, 1.2 GB, 17 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            if value >= 10 or value == math.trunc(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    steps = (
        (60, 1, "second"),
        (3600, 60, "minute"),
        (86400, 3600, "hour"),
        (86400 * 7 * 2, 86400, "day"),
        (86400 * 30 * 2, 86400 * 7, "week"),
        (86400 * 365 * 2, 86400 * 30, "month"),
    )
    for limit, unit, name in steps:
        if s < limit:
            count = s // unit
            if count == 1 and name in ("minute", "hour"):
                return f"About {'an' if name == 'hour' else 'a'} {name}"
            return f"{count} {name}{'s' if count != 1 else ''}"
    return f"{s // (86400 * 365)} years"


def human_time(iso: str | None, now: datetime | None = None, zero: str = "Never") -> str:
    """ "4 minutes from now", "3 days ago", "Forever" (more than 20 years ahead), as Ollama."""
    if not iso:
        return zero
    when = parse_time(iso)
    if when is None:
        return iso
    delta = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if delta > 20 * 365 * 86400:
        return "Forever"
    return f"{_duration(delta)} from now" if delta > 0 else f"{_duration(-delta)} ago"


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?")


def parse_time(text: str) -> datetime | None:
    """RFC 3339 as Go writes it (nanosecond fractions, "Z"), which fromisoformat rejects in 3.10."""
    m = _RFC3339.fullmatch(text.strip())
    if m is None:
        return None
    head, frac, zone = m.groups()
    micro = (frac or "0")[:6].ljust(6, "0")
    offset = "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(f"{head}.{micro}{offset}")


def processor(size: int, size_vram: int) -> str:
    """100% GPU, 100% CPU, or the split "48%/52% CPU/GPU", from /api/ps's sizes."""
    if size <= 0 or size_vram <= 0:
        return "100% CPU"
    if size_vram >= size:
        return "100% GPU"
    gpu = round(size_vram * 100 / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        out.write("    ".join(cells).rstrip() + "\n")


# ---- the verbs -------------------------------------------------------------------------------
def cmd_ps(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    data = client.call("GET", "/api/ps")
    if args.json:
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL", "DEVICE", "WARM", "STATE"]]
    for m in data.get("models", []):
        until = human_time(m.get("expires_at"))
        if m.get("refcount"):
            until = "In use"
        rows.append(
            [
                m["name"],
                str(m.get("digest", ""))[:12],
                human_bytes(int(m.get("size", 0))),
                processor(int(m.get("size", 0)), int(m.get("size_vram", 0))),
                str(m.get("context_length", "")),
                until,
                str(m.get("device", "")),
                _warm(m.get("warm_bytes")),
                _state(m),
            ]
        )
    table(rows, out)
    _warm_not_loaded(data, out)
    return 0


def _warm(n: Any) -> str:
    """Bytes of the model's file in host RAM (mincore), "-" when the server measures none."""
    return "-" if n is None else human_bytes(int(n))


def _warm_not_loaded(data: dict[str, Any], out: TextIO) -> None:
    """Below the table: the models whose file is warm in host RAM though they are not loaded (a
    load of one reads RAM, not disk); nothing when there are none."""
    tier = data.get("host_tier") or {}
    loaded = {m.get("name") for m in data.get("models", [])}
    files = [f for f in tier.get("files", []) if f["name"] not in loaded and f["warm_bytes"] > 0]
    if not files:
        return
    budget, kept = human_bytes(int(tier["budget_bytes"])), human_bytes(int(tier["kept_bytes"]))
    out.write(f"\nWarm in host RAM, not loaded (host cache {kept} kept of {budget}):\n")
    rows = [["NAME", "WARM", "KEPT"]]
    rows += [[f["name"], _warm(f["warm_bytes"]), "yes" if f["kept"] else "no"] for f in files]
    table(rows, out)


def _state(m: dict[str, Any]) -> str:
    """The model's state, and what the CPU-fallback checks found (see /api/ps)."""
    notes = [str(m.get("state", ""))]
    fallback = (m.get("placement") or {}).get("cpu_fallback", "none")
    if fallback != "none":
        notes.append(f"CPU fallback ({fallback})")
    if (m.get("decode") or {}).get("slowdown"):
        notes.append("slow")
    return ", ".join(notes)


def cmd_list(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    if args.local:
        from residency.cli_local import cmd_list_local

        return cmd_list_local(args, out)
    data = client.call("GET", "/api/tags")
    if args.json:
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in data.get("models", []):
        rows.append(
            [
                m["name"],
                str(m.get("digest", ""))[:12],
                human_bytes(int(m.get("size", 0))),
                human_time(m.get("modified_at")),
            ]
        )
    table(rows, out)
    return 0


def cmd_show(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    data = client.call("POST", "/api/show", {"model": args.model})
    if args.json:
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0
    details = data.get("details") or {}
    info = data.get("model_info") or {}
    arch = details.get("family") or info.get("general.architecture", "")
    rows = [
        ("architecture", arch),
        ("parameters", details.get("parameter_size", "")),
        ("context length", info.get(f"{arch}.context_length", "")),
        ("embedding length", info.get(f"{arch}.embedding_length", "")),
        ("quantization", details.get("quantization_level", "")),
    ]
    out.write("  Model\n")
    for key, value in rows:
        if value not in ("", None):
            out.write(f"    {key:<20}{value}\n")
    if data.get("capabilities"):
        out.write("\n  Capabilities\n")
        out.writelines(f"    {c}\n" for c in data["capabilities"])
    if data.get("parameters"):
        out.write("\n  Parameters\n")
        out.writelines(f"    {line}\n" for line in str(data["parameters"]).splitlines())
    for title, key in (("System", "system"), ("License", "license")):
        if data.get(key):
            lines = str(data[key]).strip().splitlines()
            out.write(f"\n  {title}\n")
            out.writelines(f"    {line}\n" for line in lines[:2])
            if len(lines) > 2:
                out.write("    ...\n")
    return 0


def cmd_stop(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    # What `ollama stop` sends: a request with keep_alive 0 and nothing to generate.
    body = {"model": args.model, "keep_alive": 0, "stream": False}
    client.call("POST", "/api/generate", body, long=True)
    if args.json:
        json.dump({"model": args.model, "stopped": True}, out)
        out.write("\n")
    return 0


def cmd_managed_on_disk(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    sys.stderr.write(
        f"Error: residency does not {args.command} models: it serves the models already on disk "
        "(Ollama's store, the Hugging Face cache, models_dir, the config file) and notices new or "
        f"removed files without a restart. Use `ollama {args.command}` or `hf download` and the "
        "server picks the change up.\n"
    )
    return 1


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ps, list, show, stop, run, pull, rm, push, cp and create to `residency`'s parser."""
    from residency.cli_run import cmd_run

    def verb(name: str, help: str, handler: Any, *, aliases: Sequence[str] = ()) -> Any:
        p = sub.add_parser(name, help=help, description=help, aliases=list(aliases))
        p.add_argument("--host", help="the server (default: OLLAMA_HOST or 127.0.0.1:11434)")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(handler=_run_verb(handler), command=name)
        return p

    verb("ps", "list the models in memory", cmd_ps)
    listing = verb("list", "list the models the server can serve", cmd_list, aliases=["ls"])
    listing.add_argument(
        "--local",
        action="store_true",
        help="no server: the models found on this machine, their sources and duplicates",
    )
    listing.add_argument("--config", help="the config file, for --local")
    verb("show", "show a model's information", cmd_show).add_argument("model")
    verb("stop", "unload a model now", cmd_stop).add_argument("model")
    run = verb("run", "chat with a model (interactive without a prompt)", cmd_run)
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="one prompt to answer, then exit")
    run.add_argument("--keepalive", help="how long the model stays loaded after (e.g. 10m)")
    run.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request option, as /set parameter does (num_predict=64, temperature=0)",
    )
    for name in ("pull", "rm", "push", "cp", "create"):
        p = verb(name, "(models are managed on disk)", cmd_managed_on_disk)
        p.add_argument("model", nargs="*")


def _run_verb(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            client = Client(args.host)
            rc: int = handler(args, client, sys.stdout)
            return rc
        except (ServerError, ResidencyError) as err:
            sys.stderr.write(f"Error: {err}\n")
            return 1

    return run
