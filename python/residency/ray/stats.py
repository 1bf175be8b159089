"""What a model-server replica tells the router, and how the router ranks replicas by it.

Pure code, no Ray: a replica's state is a plain dict (Ray Serve carries it from the replica's
``record_routing_stats`` to every router), and :func:`rank` orders replicas for one model from
those dicts alone, so the policy is tested without a cluster.

A replica's stats::

    {"at": wall seconds, "replica": id, "node": node id, "queued": waiting requests,
     "in_flight": requests holding a runner,
     "models": {name: {"state": "ready"|"loading"|"unloading", "device", "bytes", "refcount"}},
     "devices": [{"id", "budget", "reserved", "idle", "models", "max_models"}],
     "warm": [names whose file is in the host's page cache],
     "need": {name: bytes it needs here}, "cannot_fit": [names larger than every device here]}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Tier", "rank", "tier_of"]

K = TypeVar("K")
Stats = Mapping[str, Any]


@dataclass(frozen=True, order=True)
class Tier:
    """Where a replica stands for one model; lower sorts first.

    level: 0 ready, 1 loading, 2 warm in host RAM and fits, 3 fits in free budget, 4 fits by
    evicting idle models, 5 fits only once busy models finish (it queues), 6 no stats yet.
    Within a level, more free budget first; Serve breaks the remaining ties by queue length.
    """

    level: int
    free_rank: int = 0  # minus the free bytes: most free first

    @property
    def name(self) -> str:
        return _LEVELS[self.level]


_LEVELS = ("ready", "loading", "warm", "fits", "evicts idle", "waits", "unknown")
UNKNOWN = Tier(6)


def _fit(need: int, devices: Iterable[Stats]) -> tuple[int, int] | None:
    """(level, free bytes) of the best device for `need` bytes; None if it can never fit."""
    best: tuple[int, int] | None = None
    for d in devices:
        budget, reserved, idle = int(d["budget"]), int(d["reserved"]), int(d["idle"])
        if need > budget:
            continue
        free = budget - reserved
        has_slot = int(d["models"]) < int(d["max_models"])
        if need <= free and has_slot:
            level = 3
        elif need <= free + idle:
            level = 4  # room once idle models are unloaded (and a slot frees with them)
        else:
            level = 5  # busy models hold the room: the request waits for them
        cand = (level, free)
        if best is None or (cand[0], -cand[1]) < (best[0], -best[1]):
            best = cand
    return best


def tier_of(model: str, stats: Stats | None) -> Tier | None:
    """The replica's tier for `model`; None when it reported the model cannot fit there."""
    if not stats:
        return UNKNOWN
    if model in stats.get("cannot_fit", ()):
        return None
    held = stats.get("models", {}).get(model)
    if held is not None and held.get("state") == "ready":
        return Tier(0)
    if held is not None and held.get("state") == "loading":
        return Tier(1)
    need = stats.get("need", {}).get(model)
    if need is None:
        return Tier(5)  # not sized yet: it fits somewhere, nothing says where
    fit = _fit(int(need), stats.get("devices", ()))
    if fit is None:
        return None
    level, free = fit
    if model in stats.get("warm", ()) and level <= 4:
        level = 2
    return Tier(level, -free)


def rank(
    model: str,
    replicas: Mapping[K, Stats | None],
    placed: K | None = None,
    queue: Mapping[K, int] | None = None,
) -> list[list[K]]:
    """Replicas for `model`, best first; those that reported the model cannot fit are left out.

    Replicas holding it (ready, or loading) come in groups of equal tier, among which Serve
    takes the shortest queue. The others come one per rank, by tier, free budget, then queue
    length (`queue`, else the stats' own count): a model nobody holds is loaded on exactly one
    replica, the best. `placed`: a replica the router sent the model to since that replica's
    last stats (it is loading there even if its stats do not say so yet)."""

    def waiting(key: K) -> int:
        if queue is not None and key in queue:
            return queue[key]
        s = replicas.get(key) or {}
        return int(s.get("queued", 0)) + int(s.get("in_flight", 0))

    tiers: dict[Tier, list[K]] = {}
    for key, stats in replicas.items():
        tier = tier_of(model, stats)
        if tier is not None and key == placed and tier > Tier(1):
            tier = Tier(1)
        if tier is not None:
            tiers.setdefault(tier, []).append(key)
    if len(tiers) > 1:
        # A replica without stats yet (just started: a roll, a restart) may be one that cannot
        # fit the model; while any replica is known to take it, the unknown ones are not tried.
        tiers.pop(UNKNOWN, None)
    ranks: list[list[K]] = []
    for tier in sorted(tiers):
        keys = sorted(tiers[tier], key=lambda k: (waiting(k), str(k)))
        ranks.extend([keys] if tier.level <= 1 else [[k] for k in keys])
    return ranks


def holders(model: str, replicas: Mapping[K, Stats | None]) -> Sequence[K]:
    """Replicas whose stats show `model` ready."""
    return [k for k, s in replicas.items() if tier_of(model, s) == Tier(0)]
