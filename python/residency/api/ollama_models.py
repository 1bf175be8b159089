"""Ollama's model endpoints: what is on offer (``/api/tags``), what is loaded (``/api/ps``), one
model's metadata (``/api/show``), the version, and the management verbs residency leaves to files.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic_core import to_json
from starlette.responses import PlainTextResponse, Response

from residency import __version__
from residency.api._types import EntryLike, HostTierLike, ResidentLike
from residency.api.capabilities import traits
from residency.api.digests import DIGESTS
from residency.api.errors import ApiError
from residency.api.limits import check_model_name, parse_body, read_body
from residency.api.proxy import json_response
from residency.api.schemas import ShowRequest
from residency.api.security import key_allows
from residency.api.state import State, api_state, body_schema
from residency.registry import model_info
from residency.runners.kvcache import kv_stats_json

__all__ = ["ollama_details", "router", "tagged"]

router = APIRouter(tags=["ollama"])

# Go's time.Now().Add(math.MaxInt64): what Ollama reports for a model kept forever.
_FOREVER_NS = 2**63 - 1


# ---- models ----------------------------------------------------------------------------------


def ollama_details(entry: EntryLike) -> dict[str, Any]:
    """Ollama's ``details`` object (only its keys: clients validate it)."""
    d = entry.details
    family = d.get("family", "")
    return {
        "parent_model": "",
        "format": d.get("format", "gguf"),
        "family": family,
        "families": d.get("families") or ([family] if family else None),
        "parameter_size": d.get("parameter_size", ""),
        "quantization_level": d.get("quantization_level", ""),
    }


def _expires_at(r: ResidentLike) -> str:
    if r.expires_at is not None:
        return r.expires_at.isoformat().replace("+00:00", "Z")
    # Kept forever (or pinned): Ollama shows time.Now() + MaxInt64, about 292 years ahead.
    from datetime import datetime, timedelta, timezone

    far = datetime.now(timezone.utc) + timedelta(microseconds=_FOREVER_NS // 1000)
    return far.isoformat().replace("+00:00", "Z")


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else (-1 if ns < 0 else ns / 1e9)


def _keep_alive_json(r: ResidentLike) -> dict[str, Any]:
    """The model's keep-alive, where it came from (request, model, server, policy) and which
    client set it last (its key's name and its address)."""
    origin = r.keep_alive_origin
    if origin is None:  # loaded with its default, by no request (a preload)
        configured = getattr(getattr(r.entry, "config", None), "keep_alive", None)
        source, requested, client = ("server" if configured is None else "model"), None, None
    else:
        source, requested, client = origin.choice.source, origin.choice.requested_ns, origin.client
    return {
        "seconds": _seconds(r.keep_alive_ns),
        "source": source,
        "requested_seconds": _seconds(requested),
        "set_by": None if client is None else {"key": client.key, "peer": client.peer},
    }


@router.get("/api/ps")
async def ps(request: Request, state: State) -> Response:
    """Resident models, with residency's own accounting beside Ollama's fields (with a key: those
    the key may use, as /api/tags lists them)."""
    models = []
    for r in state.scheduler.resident():
        if not key_allows(request.scope, r.name):
            continue
        models.append(
            {
                "name": tagged(r.name),
                "model": tagged(r.name),
                "size": r.size,
                "digest": DIGESTS.digest(r.entry.path),
                "details": ollama_details(r.entry),
                "expires_at": _expires_at(r),
                "size_vram": r.size_vram,
                "context_length": r.context_length,
                # residency's additions: where it lives, what was promised, what was measured.
                "device": r.device,
                "state": r.state,
                "reserved_bytes": r.bytes,
                "estimated_bytes": r.estimated_bytes,
                "measured_bytes": r.measured_bytes,
                "refcount": r.refcount,
                # Bytes of its model file in the host's page cache now (mincore); None: unknown.
                "warm_bytes": r.warm_bytes,
                # Where the runner really put it, and its decode speed against its history.
                "placement": None if r.placement is None else r.placement.as_json(),
                "decode": None if r.decode_speed is None else r.decode_speed.as_json(),
                "keep_alive": _keep_alive_json(r),
            }
        )
    # residency's addition: KV slots saved before runners stopped and restored after, by model.
    # And models whose runner failed lately: backoff or circuit state, failures, last error.
    failing = [dict(f, name=tagged(f["name"])) for f in state.scheduler.failing()]
    return json_response(
        {
            "models": models,
            "kv_cache": kv_stats_json(),
            "failing": failing,
            "host_tier": _host_tier_json(request, state.scheduler.host_tier()),
        }
    )


def _host_tier_json(request: Request, tier: HostTierLike | None) -> dict[str, Any] | None:
    """residency's addition: the host page cache, with the files of models loaded or not that
    are warm in RAM (those the key may use); None when the page cache is left to the kernel."""
    if tier is None:
        return None
    files = [
        {"name": tagged(f.name), "warm_bytes": f.warm_bytes, "kept": f.kept}
        for f in tier.files
        if key_allows(request.scope, f.name)
    ]
    return {"budget_bytes": tier.budget_bytes, "kept_bytes": tier.kept_bytes, "files": files}


@router.get("/api/tags")
async def tags(request: Request, state: State) -> Response:
    """Every model clients may ask for (with a key: those the key may use)."""
    return json_response(
        {
            "models": [
                {
                    "name": tagged(e.name),
                    "model": tagged(e.name),
                    "modified_at": e.modified_at.isoformat().replace("+00:00", "Z"),
                    "size": e.size_bytes,
                    "digest": DIGESTS.digest(e.path),
                    "details": ollama_details(e),
                }
                for e in state.scheduler.models()
                if key_allows(request.scope, e.name)
            ]
        }
    )


@router.post("/api/show", openapi_extra=body_schema(ShowRequest))
async def show(request: Request) -> Response:
    """A model's details, GGUF metadata (``model_info``), template and parameters."""
    state = api_state(request)
    req = parse_body(ShowRequest, await read_body(request, state.settings), state.settings)
    check_model_name(req.model_name)
    entry = state.scheduler.resolve(req.model_name)
    if not key_allows(request.scope, entry.name):
        raise ApiError(403, f"this API key may not use model {entry.name!r}")
    info: dict[str, Any] = {}
    template = ""
    if entry.details.get("format") == "gguf":
        try:
            info, template = await asyncio.to_thread(model_info, entry.path, verbose=req.verbose)
        except (OSError, ValueError) as err:  # the file changed or broke since start-up
            raise ApiError(500, f"cannot read {entry.path}: {err}") from err
    config = getattr(entry, "config", None)  # a registry entry's ModelConfig (store fields)
    params = _parameters(entry.options, getattr(config, "parameters", None) or {})
    template = getattr(config, "template", None) or template
    system = getattr(config, "system", None) or ""
    license_text = getattr(config, "license", None) or str(info.get("general.license") or "")
    modelfile = f'# Modelfile generated by "residency"\nFROM {entry.path}\n'
    if template:
        modelfile += f'TEMPLATE """{template}"""\n'
    if system:
        modelfile += f'SYSTEM """{system}"""\n'
    modelfile += "".join(f"PARAMETER {name} {value}\n" for name, value in params)
    if license_text:
        modelfile += f'LICENSE """{license_text}"""\n'
    out: dict[str, Any] = {
        "license": license_text,
        "modelfile": modelfile,
        "parameters": "\n".join(f"{name:<30} {value}" for name, value in params),
        "template": template,
        "details": ollama_details(entry),
        "model_info": info,
        "capabilities": list(traits(entry).capabilities),
        "modified_at": entry.modified_at.isoformat().replace("+00:00", "Z"),
    }
    if system:
        out["system"] = system
    return json_response(out)


def _parameters(options: Any, stored: dict[str, Any]) -> list[tuple[str, str]]:
    """Ollama's parameter lines: the store's (sampling defaults, stop words) and the load
    options residency runs the model with."""
    out: list[tuple[str, str]] = []
    for name, value in stored.items():
        for v in value if isinstance(value, list) else [value]:
            out.append((name, to_json(v).decode() if isinstance(v, str) else str(v)))
    for key, name in (("ctx", "num_ctx"), ("gpu_layers", "num_gpu"), ("parallel", "num_parallel")):
        value = dict(options).get(key)
        if value is not None and value != "auto":
            out.append((name, str(value)))
    return out


def tagged(name: str) -> str:
    """`name` as Ollama lists it: ``name:tag``, ``:latest`` when it has none."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


# ---- management residency leaves to the files (and to Ollama) ---------------------------------

_NOT_HERE = {
    "pull": "residency does not download models: run `ollama pull NAME` (residency serves "
    "Ollama's model store) or put a GGUF file in models_dir",
    "push": "residency does not push models: run `ollama push NAME`",
    "create": "residency does not create models: put a GGUF file in models_dir (per-model "
    "options go in residency.toml) or run `ollama create`",
    "copy": "residency does not copy models: copy the GGUF file in models_dir or run `ollama cp`",
    "delete": "residency does not delete models: remove the GGUF file from models_dir or run "
    "`ollama rm NAME`",
    "blobs": "residency does not store blobs: put a GGUF file in models_dir",
}


def _not_served(what: str) -> Callable[[], Awaitable[Response]]:
    async def refuse() -> Response:
        raise ApiError(501, _NOT_HERE[what], code="not_implemented")

    refuse.__name__ = f"{what}_not_served"
    return refuse


for _verb, _method in (
    ("pull", "POST"),
    ("push", "POST"),
    ("create", "POST"),
    ("copy", "POST"),
    ("delete", "DELETE"),
):
    # Not published: the schema lists what residency serves.
    router.add_api_route(
        f"/api/{_verb}", _not_served(_verb), methods=[_method], include_in_schema=False
    )
router.add_api_route(
    "/api/blobs/{digest}", _not_served("blobs"), methods=["HEAD", "POST"], include_in_schema=False
)


@router.get("/api/version")
async def version() -> Response:
    # Semver build metadata: clients that compare versions read 0.x.y; people read residency.
    return json_response({"version": f"{__version__}+residency", "residency": __version__})


@router.get("/", response_class=PlainTextResponse)
async def root() -> Response:
    # Clients probe this text to find a server; residency answers as Ollama does.
    return PlainTextResponse("Ollama is running")


@router.head("/", include_in_schema=False)
async def root_head() -> Response:
    return Response(media_type="text/plain")
