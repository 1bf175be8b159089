"""Replays a trace through the real scheduling engine (``residency.Engine``) on a virtual clock.

The simulator is a second driver of the engine the server runs: it reports events (arrivals, loads
finished, requests served, runners gone, time passing) and carries out the actions the engine
returns with simulated runners — a Load takes the model's load cost once the memory it needs is
physically back (victims' memory returns ``recovery_lag_s`` after their stop), a Stop frees memory
after the lag, a Grant is served as soon as the runner is ready and one of its ``parallel`` slots
is free. It makes no decision of its own: queue order, admission, eviction and expiry are the
engine's. A trace of conversations also charges each turn's earlier context to a runner that does
not hold it — prefilled, or restored from a slot saved at the stop (sim.conversations).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

import numpy as np

from residency._core import Action, ActionKind, Device, Engine, LoadShape
from residency.sim.config import SimConfig, SimResult
from residency.sim.conversations import ConversationCosts
from residency.sim.disk import Disk
from residency.sim.host import HostCache, ManagedHost
from residency.sim.trace import GB, Trace

NS = 1_000_000_000

# Event kinds, ordered so that at equal times completions free things before others need them.
_SERVED, _GONE, _DISK, _BEGIN, _READY, _TICK, _ARRIVE = range(7)
#: Every simulated request asks for the same runner shape: the trace varies models, not options.
SHAPE = LoadShape(ctx=4096)


class _Model:
    """The simulated runner of one model (what a real runner process would be)."""

    __slots__ = ("busy", "bytes", "granted", "idle_since", "key", "load_s", "queue", "ready")

    def __init__(self, key: str, nbytes: int, load_s: float) -> None:
        self.key = key
        self.bytes = nbytes
        self.load_s = load_s
        self.ready = False
        self.granted = 0  # requests granted and not yet done
        self.busy = 0  # requests being served now (≤ parallel)
        self.queue: deque[int] = deque()  # granted requests waiting for the load or a slot
        self.idle_since = -1  # ns; ready with no request since then; -1 otherwise


#: Called after every event with the engine, the virtual time, the event ("arrive", "served",
#: "ready", "gone", "tick"), its request or model index, and the actions (tests check invariants).
Observer = Callable[[Engine, int, str, int, list[Action]], None]
_EVENT_NAMES = {_SERVED: "served", _GONE: "gone", _DISK: "disk", _BEGIN: "begin", _READY: "ready",
                _TICK: "tick", _ARRIVE: "arrive"}  # fmt: skip


def simulate(trace: Trace, cfg: SimConfig, observer: Observer | None = None) -> SimResult:
    """Replays ``trace`` under ``cfg`` through the engine and measures it. Deterministic."""
    engine = Engine(
        [Device("gpu0", trace.budget_bytes, 0, cfg.max_models)],
        cfg.policy,
        cfg.queue,
        max_queue=1 << 31,
        starvation_ns=int(cfg.starvation_s * NS),
        journal=cfg.journal,
        max_loads=cfg.max_loads,
    )
    return _Run(trace, cfg, engine, observer).run()


class _Run:
    def __init__(self, trace: Trace, cfg: SimConfig, engine: Engine, obs: Observer | None) -> None:
        self.trace, self.cfg, self.engine, self.observer = trace, cfg, engine, obs
        self.models = [_Model(m.key, m.bytes, m.load_seconds) for m in trace.models]
        self.index = {m.key: i for i, m in enumerate(self.models)}
        self.arrivals = [round(t * NS) for t in trace.times.tolist()]
        self.which = trace.model.tolist()
        self.service = [round(s * NS) for s in trace.service.tolist()]
        self.start = [-1] * len(self.arrivals)
        self.heap: list[tuple[int, int, int, int]] = []
        self.seq = 0
        self.gone_at: dict[int, int] = {}  # model → when its memory is back
        self.resident_since: dict[int, int] = {}
        self.load_started: dict[int, int] = {}
        self.tick_armed: int | None = None
        self.keep_alive = -1 if cfg.keep_alive_s < 0 else int(cfg.keep_alive_s * NS)
        self.served = self.rejected = self.cold = self.evictions = self.expirations = 0
        self.waited = 0
        self.load_s = self.idle = self.resident = 0.0
        self.now = 0
        self.host = _host(trace, cfg)
        self.disk = None if self.host is None else self.host.disk
        self.disk_armed = -1  # the disk's version the pending completion event was computed at
        self.reading: dict[int, tuple[int, float]] = {}  # model → (read began, RAM part's seconds)
        if isinstance(self.host, ManagedHost):
            self.host.on_warm = engine.resident_set.set_host_warm
        self.conversations = _conversations(trace, cfg)
        self.conversation = [] if trace.conversation is None else trace.conversation.tolist()
        self.context = [] if trace.context is None else trace.context.tolist()

    def push(self, t: int, kind: int, payload: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, payload))

    def run(self) -> SimResult:
        n = len(self.arrivals)
        for i, t in enumerate(self.arrivals):
            self.push(t, _ARRIVE, i)
        engine = self.engine
        while self.heap and self.served + self.rejected < n:
            self.now, kind, _, p = heapq.heappop(self.heap)
            now = self.now
            if kind == _ARRIVE:
                m = self.models[self.which[p]]
                rid = p + 1  # the server numbers its requests from 1
                actions = engine.arrive(rid, m.key, SHAPE, m.bytes, self.keep_alive, now)
                if not any(a.kind == ActionKind.GRANT and a.request == rid for a in actions):
                    self.waited += 1
            elif kind == _SERVED:
                m = self.models[self.which[p]]
                m.busy -= 1
                m.granted -= 1
                self.served += 1
                actions = engine.done(p + 1, now)
                if self.served + self.rejected == n:
                    break  # the last request is done: what happens after is not charged
                if m.granted == 0:
                    m.idle_since = now
                self.begin_service(m)
            elif kind == _READY:
                m = self.models[p]
                m.ready = True
                if m.granted == 0:
                    m.idle_since = now
                # As the server measures it: from the Load action to ready (victims' stop included).
                load_s = (now - self.load_started.pop(p)) / NS
                if self.host is not None:
                    self.host.ready(m.key, now)
                actions = engine.ready(m.key, now, load_s)
                self.begin_service(m)
            elif kind == _GONE:
                del self.gone_at[p]
                actions = engine.gone(self.models[p].key, now)
            elif kind == _BEGIN:
                self.begin_read(p)
                actions = []
            elif kind == _DISK:
                if p != self.disk_armed:
                    continue  # the disk changed since: a later event has the right time
                self.disk_armed = -1
                self.disk_done()
                actions = []
            else:  # _TICK
                if p != self.tick_armed:
                    continue  # superseded by an earlier one that already ran
                self.tick_armed = None
                actions = engine.tick(now)
            self.execute(actions)
            self.arm_tick()
            self.arm_disk()
            if self.observer is not None:
                self.observer(engine, now, _EVENT_NAMES[kind], p, actions)
        return self.result()

    def execute(self, actions: list[Action]) -> None:
        for a in actions:
            if a.kind == ActionKind.GRANT:
                m = self.models[self.index[a.key]]
                if m.granted == 0:
                    self.end_idle(m)
                m.granted += 1
                m.queue.append(a.request - 1)
                self.begin_service(m)
            elif a.kind == ActionKind.LOAD:
                self.load(self.index[a.key], [self.index[v] for v in a.victims])
            elif a.kind == ActionKind.STOP:
                self.stop(self.index[a.key], expired=a.reason == "keep-alive expired")
            elif a.kind == ActionKind.REJECT:
                self.rejected += 1
            elif a.kind == ActionKind.PREFETCH:
                if self.host is not None:
                    self.host.waiting(a.key, a.bytes, self.now)
            else:  # ESTIMATE: the simulator always passes the bytes
                raise AssertionError(f"unexpected {a!r}")

    def load(self, mi: int, victims: list[int]) -> None:
        m = self.models[mi]
        self.cold += 1
        self.evictions += len(victims)
        self.resident_since[mi] = self.now
        self.load_started[mi] = self.now
        # As the server does: the runner starts once its victims have exited and their memory
        # is back (their Stop actions came first, so their gone times are known).
        begin = max([self.now, *(self.gone_at[v] for v in victims)])
        if self.host is None:  # no page cache: the trace's own load cost, as before
            self.load_s += m.load_s
            self.push(begin + round(m.load_s * NS), _READY, mi)
            return
        if begin > self.now:  # the load waits for its victims: prefetch meanwhile
            self.host.waiting(m.key, m.bytes, self.now)
        self.push(begin, _BEGIN, mi)

    def begin_read(self, mi: int) -> None:
        """The load starts reading its file: what is in RAM at host speed, the rest from disk."""
        assert self.host is not None
        assert self.disk is not None
        m = self.models[mi]
        hit = self.host.begin_read(m.key, m.bytes, self.now)
        self.reading[mi] = (self.now, hit / (self.cfg.host_gb_per_s * GB))
        if hit < m.bytes:
            self.disk.start(f"load:{mi}", m.bytes - hit, self.now, background=False)
        else:
            self.read_done(mi)

    def read_done(self, mi: int) -> None:
        began, ram_s = self.reading.pop(mi)
        start = self.cfg.engine_start_s
        rest = ram_s + (self.trace.config.engine_start_s if start is None else start)
        self.load_s += (self.now - began) / NS + rest
        self.push(self.now + round(rest * NS), _READY, mi)

    def disk_done(self) -> None:
        assert self.disk is not None
        assert self.host is not None
        self.disk.advance(self.now)
        nxt = self.disk.next_done()
        while nxt is not None and nxt[0] <= self.now:
            job = nxt[1]
            if job.startswith("load:"):
                self.disk.finish(job, self.now)
                self.read_done(int(job.removeprefix("load:")))
            else:
                self.host.prefetched(job, self.now)
            nxt = self.disk.next_done()

    def arm_disk(self) -> None:
        if self.disk is None or self.disk.version == self.disk_armed:
            return
        nxt = self.disk.next_done()
        self.disk_armed = self.disk.version
        if nxt is not None:
            self.push(nxt[0], _DISK, self.disk.version)

    def stop(self, mi: int, *, expired: bool) -> None:
        m = self.models[mi]
        self.expirations += expired
        self.end_idle(m)
        self.resident += m.bytes / GB * (self.now - self.resident_since.pop(mi)) / NS
        m.ready = False
        saving = self.conversations.stopped(mi) if self.conversations is not None else 0.0
        back = self.now + round((saving + self.cfg.recovery_lag_s) * NS)
        self.gone_at[mi] = back
        self.push(back, _GONE, mi)

    def begin_service(self, m: _Model) -> None:
        while m.ready and m.queue and m.busy < self.cfg.parallel:
            r = m.queue.popleft()
            m.busy += 1
            first = self.now  # its first token: at once, or once its earlier turns are back
            if self.conversations is not None:
                wait = self.conversations.turn(self.which[r], self.conversation[r], self.context[r])
                first += round(wait * NS)
            self.start[r] = first
            self.push(first + self.service[r], _SERVED, r)

    def end_idle(self, m: _Model) -> None:
        if m.idle_since >= 0:
            self.idle += m.bytes / GB * (self.now - m.idle_since) / NS
            m.idle_since = -1

    def arm_tick(self) -> None:
        nxt = self.engine.next_deadline()
        if nxt is not None and (self.tick_armed is None or nxt < self.tick_armed):
            self.tick_armed = nxt
            self.push(nxt, _TICK, nxt)

    def result(self) -> SimResult:
        end = self.now
        for m in self.models:
            self.end_idle(m)
        for mi, since in self.resident_since.items():
            self.resident += self.models[mi].bytes / GB * (end - since) / NS
        starts = np.asarray(self.start, dtype=np.int64)
        arrivals = np.asarray(self.arrivals, dtype=np.int64)
        served = starts >= 0
        ttft = (starts[served] - arrivals[served]) / NS
        n = len(self.arrivals)
        conv = self.conversations

        def pct(q: float) -> float:
            return float(np.percentile(ttft, q)) if len(ttft) else 0.0

        return SimResult(
            policy=self.cfg.policy,
            queue=self.cfg.queue,
            requests=n,
            served=self.served,
            rejected=self.rejected,
            cold_loads=self.cold,
            load_seconds=self.load_s,
            evictions=self.evictions,
            expirations=self.expirations,
            waited=self.waited,
            ttft_p50_s=pct(50),
            ttft_p99_s=pct(99),
            ttft_max_s=float(ttft.max()) if len(ttft) else 0.0,
            ttft_mean_s=float(ttft.mean()) if len(ttft) else 0.0,
            idle_gb_s=self.idle,
            resident_gb_s=self.resident,
            duration_s=(end - (self.arrivals[0] if n else 0)) / NS,
            host_hit_gb=self.host.hit_bytes / GB if self.host is not None else 0.0,
            context_s=conv.seconds if conv is not None else 0.0,
            context_prefills=conv.prefills if conv is not None else 0,
            context_restores=conv.restores if conv is not None else 0,
            journal=tuple(self.engine.journal()),
        )


def _host(trace: Trace, cfg: SimConfig) -> HostCache | None:
    if not cfg.host_cache_x:
        return None
    budget = int(trace.budget_bytes * cfg.host_cache_x)
    # A byte read from disk reaches the runner through the page cache too: the slower of the two
    # sets the pace (with a disk faster than the host's copy, a cached byte is no dearer).
    disk = Disk(min(trace.config.disk_gb_per_s, cfg.host_gb_per_s) * GB)
    if cfg.host_tier == "managed":
        return ManagedHost(budget, disk, cfg.host_half_life_s)
    return HostCache(budget, disk)


def _conversations(trace: Trace, cfg: SimConfig) -> ConversationCosts | None:
    if trace.context is None or trace.conversation is None:
        return None
    return ConversationCosts(
        [m.bytes for m in trace.models],
        parallel=cfg.parallel,
        kv_persist=cfg.kv_persist,
        prefill_tokens_per_s=cfg.prefill_tokens_per_s,
        kv_bytes_per_token=cfg.kv_bytes_per_token,
        # Conservatively read from disk: a file saved long ago has left the page cache.
        restore_gb_per_s=min(cfg.kv_restore_gb_per_s, trace.config.disk_gb_per_s),
        save_gb_per_s=cfg.kv_save_gb_per_s,
        save_timeout_s=cfg.kv_save_timeout_s,
    )
