"""Who may call the server: API keys, browser origins and Host names, checked before any route.

- **Keys** (off until one is configured): ``Authorization: Bearer <key>`` on both APIs, compared in
  constant time; each key has a name (what logs and metrics show) and optionally the models it
  may use. ``/`` (the banner clients probe) is always open; ``/metrics`` and ``/health`` follow
  ``auth_metrics`` / ``auth_health``.
- **Origins**, as Ollama's ``OLLAMA_ORIGINS``: a request carrying an ``Origin`` header (a browser)
  passes only for loopback origins, the app schemes Ollama allows, and the configured patterns
  (``*`` wildcards). A web page on another site cannot drive the server through the user's
  browser, whatever Content-Type it sends.
- **Host**, as Ollama: bound to loopback, only local names and addresses are accepted in ``Host``,
  so a DNS-rebinding page (its own name resolving to 127.0.0.1) is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter
from starlette.types import Message, Receive, Scope, Send

from residency.api.errors import ApiError, error_response, is_openai_path
from residency.config import Settings
from residency.errors import ConfigError
from residency.keepalive import KeepAliveClient, KeepAliveRule
from residency.metrics import ResidencyMetrics

__all__ = [
    "ApiKey",
    "Guard",
    "keep_alive_client",
    "key_allows",
    "load_keys",
    "origin_allowed",
    "warn_if_exposed",
    "with_cors",
]

log = logging.getLogger("residency.security")

#: Where the key a request authenticated with is kept in its ASGI scope.
SCOPE_KEY = "residency.key"

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
#: Ollama's defaults beside loopback: desktop apps and editors' webviews.
_APP_ORIGINS = ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key: equal lengths for compare_digest, no secret kept in memory
    models: frozenset[str] | None
    #: The key's keep-alive limits (over the model's and the server's); None: it has none.
    keep_alive: KeepAliveRule | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def keep_alive_client(scope: Scope) -> KeepAliveClient:
    """Who sent the request, as /api/ps names the client that set a keep-alive: its key's name
    (with the key's keep-alive rule) and its peer address."""
    key: ApiKey | None = scope.get(SCOPE_KEY)
    peer = scope.get("client")
    return KeepAliveClient(
        key=None if key is None else key.name,
        peer=None if not peer else str(peer[0]),
        rule=None if key is None else key.keep_alive,
    )


def key_allows(scope: Scope, model: str) -> bool:
    """Whether the request's key (if any) may use `model` (a configured name)."""
    key: ApiKey | None = scope.get(SCOPE_KEY)
    return key is None or key.allows(model)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def load_keys(settings: Settings) -> list[ApiKey]:
    """Every configured key: settings' list, ``$RESIDENCY_API_KEY`` (named "env"), the key file."""
    keys = [
        ApiKey(
            k.name,
            _digest(k.key),
            frozenset(k.models) if k.models is not None else None,
            k.keep_alive_rule(),
        )
        for k in settings.api_keys
    ]
    if settings.api_key:
        keys.append(ApiKey("env", _digest(settings.api_key), None))
    if settings.api_keys_file is not None:
        keys += _read_key_file(settings.api_keys_file)
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError(f"API key names must be unique: {', '.join(sorted(names))}")
    return keys


_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def _read_key_file(path: Path) -> list[ApiKey]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"api_keys_file {path}: {err}") from None
    keys = []
    for number, text in enumerate(lines, 1):
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        secret, _, models = rest.partition(":")
        if not _NAME.match(name) or len(secret) < 16:
            # Never echo the line: it holds a secret.
            raise ConfigError(
                f"api_keys_file {path}, line {number}: expected name:key[:model,model] with a "
                "name of letters, digits, _.@- and a key of at least 16 characters"
            )
        allowed = frozenset(m.strip() for m in models.split(",") if m.strip()) if models else None
        keys.append(ApiKey(name, _digest(secret), allowed))
    return keys


def origin_allowed(origin: str, extra: Sequence[str]) -> bool:
    """Ollama's rule: loopback and app origins always, plus `extra` patterns (``*`` matches any
    run of characters; a lone ``*`` allows every origin)."""
    origin = origin.lower()
    for host in _LOOPBACK_NAMES:
        for scheme in ("http://", "https://"):
            base = scheme + host
            if origin == base or (
                origin.startswith(base + ":") and origin[len(base) + 1 :].isdigit()
            ):
                return True
    return any(_wildcard_match(p.strip().lower(), origin) for p in (*_APP_ORIGINS, *extra) if p)


def _wildcard_match(pattern: str, text: str) -> bool:
    if pattern == "*":
        return True
    if "*" not in pattern:
        return pattern == text
    head, _, tail = pattern.partition("*")
    return text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)


def _local_host(host: str) -> bool:
    """Ollama's allowedHost: local names, and loopback/private/unspecified addresses."""
    host = host.lower()
    if host.startswith("["):  # [::1]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


def _is_loopback_bind(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: Settings, keys: Sequence[ApiKey]) -> bool:
    """Logs a loud warning when the server listens beyond loopback without keys; True if so."""
    if _is_loopback_bind(settings.host) or keys:
        return False
    log.warning(
        "!!! residency listens on %s WITHOUT API KEYS: anyone who can reach this port can use, "
        "load and unload every model. Configure api_keys (or RESIDENCY_API_KEY) or bind 127.0.0.1.",
        settings.host,
    )
    return True


class Guard:
    """The checks every HTTP request passes before the app sees it (see the module docstring)."""

    def __init__(self, settings: Settings, keys: Sequence[ApiKey], metrics: ResidencyMetrics):
        self.keys = list(keys)
        self.origins = [o for o in settings.origins.split(",") if o.strip()]
        self.check_host = _is_loopback_bind(settings.host)
        self.open_paths = {"/"}
        if not settings.auth_metrics:
            self.open_paths.add("/metrics")
        if not settings.auth_health:
            self.open_paths.add("/health")
        self.refused = Counter(
            "residency_http_refused",
            "Requests refused before any route: bad key, foreign origin or host.",
            ("reason",),
            registry=metrics.registry,
        )
        self.by_key = Counter(
            "residency_http_key_requests",
            "Authenticated requests by key name.",
            ("key",),
            registry=metrics.registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """True if the request may go on; else the refusal has been sent."""
        headers = _headers(scope)
        path: str = scope["path"]
        openai = is_openai_path(path)
        host = headers.get(b"host")
        if self.check_host and host is not None and not _local_host(host.decode("latin-1")):
            return await self._refuse(scope, send, "host", ApiError(403, "host not allowed"))
        origin = headers.get(b"origin")
        if origin is not None and not origin_allowed(origin.decode("latin-1"), self.origins):
            return await self._refuse(scope, send, "origin", ApiError(403, "origin not allowed"))
        if origin is not None and scope["method"] == "OPTIONS":  # a CORS preflight
            await _preflight(send, origin)
            return False
        if self.keys and path not in self.open_paths:
            key = self._authenticate(headers.get(b"authorization"))
            if key is None:
                err = ApiError(
                    401,
                    "missing or invalid API key (send Authorization: Bearer <key>)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await self._refuse(scope, send, "key", err, openai=openai)
            scope[SCOPE_KEY] = key
            self.by_key.labels(key.name).inc()
        return True

    def _authenticate(self, header: bytes | None) -> ApiKey | None:
        if header is None or header[:7].lower() != b"bearer ":
            return None
        digest = hashlib.sha256(header[7:].strip()).digest()
        found = None
        for key in self.keys:  # every key compared: the time says nothing about which matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    async def _refuse(
        self, scope: Scope, send: Send, reason: str, err: ApiError, *, openai: bool = False
    ) -> bool:
        self.refused.labels(reason).inc()
        log.warning("refused %s %s: %s", scope["method"], scope["path"][:200], err.message)
        await error_response(err, openai=openai)(scope, _no_receive, send)
        return False


def with_cors(scope: Scope, send: Send) -> Send:
    """`send`, adding Access-Control-Allow-Origin for a browser request (its origin already
    allowed by the Guard); `send` itself for every other request."""
    origin = next((v for k, v in scope["headers"] if k.lower() == b"origin"), None)
    if origin is None:
        return send

    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            headers += [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
            message = {**message, "headers": headers}
        await send(message)

    return send_with_cors


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _preflight(send: Send, origin: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 204,
            "headers": [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
                (b"access-control-allow-headers", b"Authorization, Content-Type, User-Agent"),
                (b"access-control-max-age", b"43200"),
                (b"vary", b"Origin"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
