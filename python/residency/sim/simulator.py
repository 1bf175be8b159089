"""Replays a trace against the real C++ resident set with a virtual clock.

The event loop plays the scheduler's part the way ``scheduler.py`` does with real runners: admit,
then on Load stop the victims, wait for their memory to come back (the recovery lag), load (taking
the model's load cost), serve, release, and expire idle models when the core says their keep-alive
ran out. Requests that get Wait queue in arrival order (as Ollama's pending queue does) and retry
whenever a model goes idle or finishes unloading. Each runner serves ``parallel`` requests at a
time; more queue at the runner. Every decision is the core's: the simulator only keeps time.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from residency import AdmitOutcome, Device, ResidentSet
from residency.errors import ConfigError
from residency.sim.trace import GB, Trace

NS = 1_000_000_000

# Event kinds, ordered so that at equal times completions free things before others need them.
_SERVED, _UNLOADED, _LOADED, _EXPIRE = 0, 1, 2, 3
_NO_EXPIRY = 1 << 63


@dataclass(frozen=True)
class SimConfig:
    policy: str = "ollama"
    #: The keep-alive every request carries (Ollama's default 5 minutes); < 0 forever, 0 none.
    keep_alive_s: float = 300.0
    #: Seconds between a runner's exit and its memory showing free again (driver lag).
    recovery_lag_s: float = 1.0
    #: Requests one runner serves at once (llama.cpp slots); more wait at the runner.
    parallel: int = 4
    #: Models one device may hold (Ollama's OLLAMA_MAX_LOADED_MODELS per GPU).
    max_models: int = 3

    def __post_init__(self) -> None:
        if self.recovery_lag_s < 0 or self.parallel < 1 or self.max_models < 1:
            raise ConfigError("sim: need recovery_lag_s ≥ 0, parallel ≥ 1 and max_models ≥ 1")


@dataclass(frozen=True)
class SimResult:
    policy: str
    requests: int
    served: int
    rejected: int
    cold_loads: int
    load_seconds: float
    #: Models chosen as victims to make room, and models unloaded because their keep-alive ran out.
    evictions: int
    expirations: int
    #: Requests that got Wait at least once.
    waited: int
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    #: ∫ bytes of ready models serving no request dt, in GB·s (memory held in vain).
    idle_gb_s: float
    #: ∫ bytes of loading and ready models dt, in GB·s.
    resident_gb_s: float
    #: Virtual seconds from the first arrival to the last completion.
    duration_s: float

    def row(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


class _Model:
    """What the simulator tracks of one model beside the core (the runner's side of things)."""

    __slots__ = (
        "busy",
        "bytes",
        "idle_since",
        "key",
        "load_seconds",
        "queue",
        "ready",
        "refcount",
        "resident_since",
    )

    def __init__(self, key: str, nbytes: int, load_seconds: float) -> None:
        self.key = key
        self.bytes = nbytes
        self.load_seconds = load_seconds
        self.ready = False
        self.refcount = 0  # mirrors the core's: requests admitted and not yet done
        self.busy = 0  # requests being served now (≤ parallel)
        self.queue: deque[int] = deque()  # admitted requests waiting for a slot or the load
        self.idle_since = -1.0  # ready and refcount 0 since then; -1 otherwise
        self.resident_since = -1.0  # loading or ready since then; -1 otherwise


def simulate(trace: Trace, cfg: SimConfig) -> SimResult:
    """Replays ``trace`` under ``cfg`` and measures the outcome. Deterministic."""
    rs = ResidentSet([Device("gpu0", trace.budget_bytes, 0, cfg.max_models)], cfg.policy)
    models = [_Model(m.key, m.bytes, m.load_seconds) for m in trace.models]
    index = {m.key: i for i, m in enumerate(models)}
    keep_alive_ns = -1 if cfg.keep_alive_s < 0 else int(cfg.keep_alive_s * NS)
    lag = cfg.recovery_lag_s
    times = trace.times.tolist()
    which = trace.model.tolist()
    service = trace.service.tolist()
    n = len(times)
    start = [0.0] * n  # when each request began being served

    heap: list[tuple[float, int, int, int]] = []  # (time, kind, seq, payload)
    seq = 0
    waiting: deque[int] = deque()  # requests that got Wait, in arrival order
    waited = set()
    unloading: dict[int, float] = {}  # model → time its memory is back
    # The earliest expiry an _EXPIRE event is queued for, in the core's ns: checked exactly, since a
    # float time converted back to ns can fall a nanosecond short of the deadline.
    expiry_armed = _NO_EXPIRY

    served = rejected = cold_loads = evictions = expirations = 0
    load_seconds = idle_gb_s = resident_gb_s = 0.0

    def push(t: float, kind: int, payload: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, kind, seq, payload))

    def end_idle(m: _Model, t: float) -> None:
        nonlocal idle_gb_s
        if m.idle_since >= 0:
            idle_gb_s += m.bytes / GB * (t - m.idle_since)
            m.idle_since = -1.0

    def leave(mi: int, t: float) -> None:
        # The core moved the model to Unloading: its runner stops, its memory returns after the lag.
        nonlocal resident_gb_s
        m = models[mi]
        end_idle(m, t)
        resident_gb_s += m.bytes / GB * (t - m.resident_since)
        m.resident_since = -1.0
        m.ready = False
        unloading[mi] = t + lag
        push(t + lag, _UNLOADED, mi)

    def arm_expiry() -> None:
        nonlocal expiry_armed
        nxt = rs.next_expiry()
        if nxt is not None and nxt < expiry_armed:
            expiry_armed = nxt
            push(nxt / NS, _EXPIRE, nxt)

    def begin_service(mi: int, t: float) -> None:
        m = models[mi]
        while m.queue and m.busy < cfg.parallel:
            r = m.queue.popleft()
            m.busy += 1
            start[r] = t
            push(t + service[r], _SERVED, r)

    def try_admit(r: int, t: float) -> bool:
        """False if the request must wait."""
        nonlocal rejected, cold_loads, evictions, load_seconds
        mi = which[r]
        m = models[mi]
        d = rs.admit(m.key, m.bytes, int(t * NS), keep_alive_ns)
        outcome = d.outcome
        if outcome is AdmitOutcome.WAIT:
            waited.add(r)
            return False
        if outcome is AdmitOutcome.TOO_LARGE:
            rejected += 1
            return True
        rs.acquire(m.key, int(t * NS))
        m.refcount += 1
        end_idle(m, t)
        m.queue.append(r)
        if outcome is AdmitOutcome.HIT:
            if m.ready:
                begin_service(mi, t)
            return True
        # Load: victims leave now; the load starts once the memory it needs is physically back.
        for v in d.victims:
            leave(index[v], t)
        evictions += len(d.victims)
        cold_loads += 1
        load_seconds += m.load_seconds
        m.resident_since = t
        begin = t
        usage = rs.devices()[0]
        excess = usage.reserved_bytes + usage.unloading_bytes - usage.budget_bytes
        for back, vi in sorted((tb, vi) for vi, tb in unloading.items()):
            if excess <= 0:
                break
            begin = max(begin, back)
            excess -= models[vi].bytes
        push(begin + m.load_seconds, _LOADED, mi)
        return True

    def drain_waiting(t: float) -> None:
        while waiting and try_admit(waiting[0], t):
            waiting.popleft()

    i = 0
    now = 0.0
    while i < n or heap:
        if i < n and (not heap or times[i] <= heap[0][0]):
            now = times[i]
            # Behind queued loads a new load waits its turn; a resident model serves at once.
            mi = which[i]
            if (waiting and models[mi].resident_since < 0) or not try_admit(i, now):
                waiting.append(i)
            i += 1
            continue
        now, kind, _, payload = heapq.heappop(heap)
        if kind == _SERVED:
            mi = which[payload]
            m = models[mi]
            m.busy -= 1
            m.refcount -= 1
            served += 1
            rs.release(m.key, int(now * NS))
            if served + rejected == n:
                break  # the last request is done: what happens after is not charged
            begin_service(mi, now)
            if m.refcount == 0:
                m.idle_since = now
                arm_expiry()
                drain_waiting(now)
        elif kind == _LOADED:
            m = models[payload]
            rs.loaded(m.key, int(now * NS), m.load_seconds)
            m.ready = True
            if m.refcount == 0:
                m.idle_since = now
                arm_expiry()
            begin_service(payload, now)
        elif kind == _UNLOADED:
            m = models[payload]
            rs.unloaded(m.key)
            del unloading[payload]
            drain_waiting(now)
        else:  # _EXPIRE
            if payload != expiry_armed:
                continue  # superseded by an earlier one that already ran
            expiry_armed = _NO_EXPIRY
            for key in rs.expired(payload):
                rs.begin_unload(key)
                expirations += 1
                leave(index[key], now)
            arm_expiry()
            drain_waiting(now)

    # Close the books at the last completion.
    end = now
    for m in models:
        end_idle(m, end)
        if m.resident_since >= 0:
            resident_gb_s += m.bytes / GB * (end - m.resident_since)
    ttft = np.asarray([start[r] - times[r] for r in range(n)], dtype=np.float64)
    admitted = np.ones(n, dtype=bool) if not rejected else None
    if admitted is None:
        ttft = ttft[ttft >= 0]
    return SimResult(
        policy=cfg.policy,
        requests=n,
        served=served,
        rejected=rejected,
        cold_loads=cold_loads,
        load_seconds=load_seconds,
        evictions=evictions,
        expirations=expirations,
        waited=len(waited),
        ttft_p50_s=float(np.percentile(ttft, 50)) if len(ttft) else 0.0,
        ttft_p99_s=float(np.percentile(ttft, 99)) if len(ttft) else 0.0,
        ttft_mean_s=float(ttft.mean()) if len(ttft) else 0.0,
        idle_gb_s=idle_gb_s,
        resident_gb_s=resident_gb_s,
        duration_s=end - (times[0] if n else 0.0),
    )
