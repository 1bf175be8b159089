"""The model-server deployment: one residency scheduler per replica, in library mode.

Every replica builds the same :class:`~residency.scheduler.Scheduler` that ``residency serve``
builds, from the same TOML configuration (plus per-node overrides, see :func:`node_overrides`),
and serves one request per call for the model named by the request's multiplexed model id: no
HTTP inside the replica except to its runners. Ray Serve calls :meth:`record_routing_stats`
periodically; what it returns is what :mod:`residency.ray.router` routes by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from residency import pagecache
from residency._core import ReservationState
from residency.config import Settings, load_settings
from residency.ray.transport import RemoteError, lease_info
from residency.runners.protocol import Body, Embeddings
from residency.scheduler import Lease, Scheduler
from residency.scheduler.executor import HOST_DEVICE
from residency.scheduler.sizing import Sizing

__all__ = ["ModelServer", "node_overrides", "replica_stats"]

log = logging.getLogger("residency.ray")

#: A model file at least this much in the page cache counts as warm in host RAM.
WARM_FRACTION = 0.9
KeepAlive = str | float | None


def node_overrides(node_settings: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """Settings for this node: every entry of `node_settings` whose key is a custom resource the
    node has (``ray start --resources '{"big_gpu": 1}'``), merged in order. How nodes with other
    devices, or a test's two "nodes" on one machine, get other budgets from one configuration."""
    if not node_settings:
        return {}
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    resources: Mapping[str, Any] = next(
        (n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id),  # type: ignore[no-untyped-call]
        {},
    )
    merged: dict[str, Any] = {}
    for resource, values in node_settings.items():
        if resource in resources:
            merged.update(values)
    return merged


class ModelServer:
    """A Serve deployment class (``serve.deployment(ModelServer)``); see the module's doc."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        config: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        node_settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        import ray
        from ray import serve

        settings = load_settings(config, **{**(overrides or {}), **node_overrides(node_settings)})
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        self.scheduler = Scheduler(settings)
        self._sizing = Sizing(settings)
        self._needs: dict[str, int] = {}
        self._in_flight = 0
        await self.scheduler.start()
        self._sizer = asyncio.create_task(self._size_models(), name="residency-ray-sizing")
        log.info("replica %s on node %s serves %d model(s)", self.replica, self.node[:8],
                 len(self.scheduler.models()))  # fmt: skip

    async def __del__(self) -> None:  # Serve awaits an async __del__
        """Serve's graceful shutdown: every runner process group stopped before the actor goes."""
        self._sizer.cancel()
        await self.scheduler.stop()

    # ---- requests --------------------------------------------------------------------------------
    def _model(self) -> str:
        from ray import serve

        model = serve.get_multiplexed_model_id()
        if not model:
            raise RemoteError(400, "no model: call with the multiplexed model id set")
        return model

    @contextlib.asynccontextmanager
    async def _lease(self, keep_alive: KeepAlive, options: Any) -> AsyncIterator[Lease]:
        self._in_flight += 1
        try:
            async with self.scheduler.session(
                self._model(), keep_alive=keep_alive, options=options
            ) as lease:
                yield lease
        finally:
            self._in_flight -= 1

    def _info(self, lease: Lease) -> dict[str, Any]:
        info = lease_info(lease, self.replica, self.node)
        # What this replica has ready now: a caller can check the router's choices against it.
        info["resident"] = [
            r.key for r in self.scheduler.core.snapshot() if r.state == ReservationState.READY
        ]
        return info

    async def complete(
        self, path: str, body: Body, keep_alive: KeepAlive = None, options: Any = None
    ) -> tuple[bytes, dict[str, Any]]:
        """One unstreamed runner call: (the runner's JSON answer, the lease's timings)."""
        try:
            async with self._lease(keep_alive, options) as lease:
                return await lease.api.complete(path, body), self._info(lease)
        except RemoteError:
            raise
        except Exception as err:
            raise RemoteError.of(err) from None

    async def embed(
        self, body: Body, keep_alive: KeepAlive = None, options: Any = None
    ) -> tuple[Embeddings, dict[str, Any]]:
        try:
            async with self._lease(keep_alive, options) as lease:
                return await lease.api.embed(body), self._info(lease)
        except RemoteError:
            raise
        except Exception as err:
            raise RemoteError.of(err) from None

    async def load(self, keep_alive: KeepAlive = None, options: Any = None) -> dict[str, Any]:
        """Makes the model resident (Ollama's load-only requests); the lease's timings."""
        try:
            async with self._lease(keep_alive, options) as lease:
                return self._info(lease)
        except RemoteError:
            raise
        except Exception as err:
            raise RemoteError.of(err) from None

    async def stream(
        self, path: str, body: Body, keep_alive: KeepAlive = None, options: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        """A streamed runner call: first the lease's timings, then each event's JSON payload.
        The lease is held until the stream ends or the caller closes it."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                lease = await stack.enter_async_context(self._lease(keep_alive, options))
                events = await lease.api.stream(path, body)
                stack.push_async_callback(events.aclose)
            except RemoteError:
                raise
            except Exception as err:
                raise RemoteError.of(err) from None
            yield self._info(lease)
            try:
                async for payload, _at in events:
                    yield payload
            except Exception as err:
                raise RemoteError.of(err) from None

    async def unload(self) -> None:
        try:
            await self.scheduler.unload(self._model())
        except RemoteError:
            raise
        except Exception as err:
            raise RemoteError.of(err) from None

    def ping(self) -> dict[str, str]:
        """Who answered (the ingress waits for one answer before serving)."""
        return {"replica": self.replica, "node": self.node}

    # ---- what the router sees --------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve's routing-stats hook: this replica's state (see residency.ray.stats)."""
        return replica_stats(self.scheduler, self._needs, self.replica, self.node, self._in_flight)

    async def _size_models(self) -> None:
        """Each configured model's bytes here with its default options, worked out once (reading
        each GGUF's header) so the router can tell where it fits before anyone asks for it."""
        on_gpu = any(d.id != HOST_DEVICE for d, _ in self.scheduler.device_usage())
        for entry in self.scheduler.models():
            try:
                want = self._sizing.options(entry, None)
                self._needs[entry.name] = (await self._sizing.needed(entry, want, on_gpu))[0]
            except Exception as err:  # an unreadable file: the router learns nothing of it
                log.warning("cannot size %s for routing: %s", entry.name, err)


def _warm(path: Path, size: int) -> bool:
    if size <= 0:
        return False
    try:
        return pagecache.resident_bytes(path) >= WARM_FRACTION * size
    except OSError:
        return False


def replica_stats(
    scheduler: Scheduler, needs: Mapping[str, int], replica: str, node: str, in_flight: int
) -> dict[str, Any]:
    """The routing stats of a replica running `scheduler` (the shape is in residency.ray.stats).

    Also the rows the ingress shows in /api/ps, so the cluster view is what the router sees."""
    rows = scheduler.resident()
    idle: dict[str, int] = {}
    models: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.state == "ready" and r.refcount == 0:
            idle[r.device] = idle.get(r.device, 0) + r.bytes
        models[r.name] = {
            "state": r.state,
            "device": r.device,
            "bytes": r.bytes,
            "estimated_bytes": r.estimated_bytes,
            "measured_bytes": r.measured_bytes,
            "size_vram": r.size_vram,
            "expires_at": None if r.expires_at is None else r.expires_at.isoformat(),
            "context_length": r.context_length,
            "refcount": r.refcount,
            "warm_bytes": r.warm_bytes,
        }
    devices: list[dict[str, Any]] = []
    for usage, _free in scheduler.device_usage():
        held = sum(1 for r in rows if r.device == usage.id)
        devices.append(
            {
                "id": usage.id,
                "total": usage.total_bytes,
                "budget": usage.budget_bytes,
                "reserved": usage.reserved_bytes,
                "idle": idle.get(usage.id, 0),
                "models": held,
                "max_models": usage.max_models,
            }
        )
    largest = max((int(d["budget"]) for d in devices), default=0)
    entries = scheduler.models()
    try:
        queued = scheduler.engine.queued()
    except Exception:  # not started yet
        queued = 0
    loads = sum(
        s.value
        for m in scheduler.metrics.loads.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
    return {
        "at": time.time(),
        "loads": int(loads),
        "replica": replica,
        "node": node,
        "queued": queued,
        "in_flight": in_flight,
        "models": models,
        "devices": devices,
        "warm": [e.name for e in entries if e.name not in models and _warm(e.path, e.size_bytes)],
        "need": dict(needs),
        "cannot_fit": [name for name, need in needs.items() if devices and need > largest],
    }


def settings_of(config: str | None, overrides: Mapping[str, Any] | None) -> Settings:
    """The settings every replica starts from (before its node's overrides)."""
    return load_settings(config, **(overrides or {}))
