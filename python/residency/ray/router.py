"""The residency request router: Ray Serve's RequestRouter, ranking replicas by bytes and state.

Ray's stock multiplexed routing knows only which model ids each replica has loaded (and how many);
this router ranks by what each replica's scheduler reported (:mod:`residency.ray.stats`): ready,
then loading, then warm in host RAM, then the most free budget that fits without evicting a busy
model; Serve itself breaks the remaining ties by queue length (it probes the replicas of one rank
and takes the shortest queue). A replica that reported the model cannot fit is never chosen.

Stats arrive every ``request_routing_stats_period_s``; a burst for a model nobody holds would
otherwise spread over replicas before the first load shows up in them, so the router remembers
where it sent each model since that replica's last stats, and treats it as loading there.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from residency.ray.stats import rank

__all__ = ["ResidencyRouter", "routers"]

log = logging.getLogger("residency.ray")


def routers() -> dict[str, ResidencyRouter]:
    """This process's routers by deployment name (read-only use)."""
    from residency.ray import registry

    return registry.ROUTERS


class ResidencyRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """See the module's doc. Configure with ``RequestRouterConfig(request_router_class=…)``."""

    def initialize_state(self, **kwargs: Any) -> None:
        #: model → (replica it was last sent to, when): trusted until its stats are newer.
        self._placed: dict[str, tuple[ReplicaID, float]] = {}
        # Imported here, not at the top: Serve ships this class by value (see registry.py).
        from residency.ray import registry

        registry.ROUTERS[self._deployment_id.name] = self

    def view(self) -> list[tuple[ReplicaID, dict[str, Any]]]:
        """Each running replica and its last stats ({} before its first)."""
        return [(r.replica_id, dict(r.routing_stats or {})) for r in self.curr_replicas.values()]

    def _placed_on(self, model: str, replicas: dict[ReplicaID, dict[str, Any]]) -> ReplicaID | None:
        placed = self._placed.get(model)
        if placed is None:
            return None
        replica, at = placed
        stats = replicas.get(replica)
        if stats is None or float(stats.get("at", 0.0)) > at + 0.05:
            del self._placed[model]  # its stats have caught up (or it is gone)
            return None
        return replica

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        model = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not model:
            # No model (pings): any replica, nearest first.
            ids = self.apply_locality_routing(pending_request=pending_request)
            return [[r for r in candidate_replicas if r.replica_id in ids]]
        by_id = {r.replica_id: r for r in candidate_replicas}
        stats = {r.replica_id: dict(r.routing_stats or {}) for r in candidate_replicas}
        queue = {i: n for i in by_id if (n := self.replica_queue_len_cache.get(i)) is not None}
        placed = self._placed_on(model, stats)
        ranks = rank(model, stats, placed=placed, queue=queue)
        if ranks and placed is None and len(ranks[0]) == 1:
            first = ranks[0][0]
            if model not in stats[first].get("models", {}):
                # It loads there: later requests follow it before its stats say so.
                self._placed[model] = (first, time.time())
        if not ranks:
            # Every replica here reported it cannot fit the model (one being replaced may not have
            # reported yet): Serve would wait for a choice forever. Any replica answers at once that
            # it cannot fit, and the ingress resends or refuses within FIT_WAIT_S.
            return [candidate_replicas]
        return [[by_id[i] for i in ids] for ids in ranks]
