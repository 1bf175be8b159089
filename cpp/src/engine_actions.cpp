#include <algorithm>

#include "residency/engine.hpp"

/// The engine's bookkeeping: emitting Grant, Reject and Stop actions and keeping the queue's and
/// the residents' records straight as requests move through them (the events are in engine.cpp).

namespace residency {

// ---- bookkeeping -------------------------------------------------------------------------------

void Engine::grant_locked(std::vector<Action>& out, Request& r, Nanos now) {
  Resident& res = residents_.at(r.key);
  const Nanos idle = set_.acquire(r.key, now);
  if (r.phase == Phase::Queued) dequeue_locked(r);
  r.phase = Phase::Granted;
  res.granted.insert(r.id);
  if (res.loading) {
    r.joining = true;
    ++joining_;
  }
  Action a;
  a.kind = ActionKind::Grant;
  a.request = r.id;
  a.key = r.key;
  a.joined_load = res.loading;
  a.idle_for = idle;
  emit_locked(out, std::move(a), now);
}

void Engine::reject_locked(std::vector<Action>& out, Request& r, RejectCode code,
                           const std::string& reason, Nanos now) {
  if (r.phase == Phase::Queued) dequeue_locked(r);
  unjoin_locked(r);
  Action a;
  a.kind = ActionKind::Reject;
  a.request = r.id;
  a.key = r.key;
  a.code = code;
  a.reason = reason;
  requests_.erase(r.id);
  emit_locked(out, std::move(a), now);
}

void Engine::unjoin_locked(Request& r) {
  if (!r.joining) return;
  r.joining = false;
  --joining_;
}

void Engine::dequeue_locked(const Request& r) {
  queue_.erase({r.arrival, r.id});
  auto it = queue_by_model_.find(r.key);
  if (it == queue_by_model_.end()) return;
  it->second.erase({r.arrival, r.id});
  if (it->second.empty()) queue_by_model_.erase(it);
}

void Engine::stop_locked(std::vector<Action>& out, const std::string& key, StopCause cause,
                         const std::string& why, Nanos now) {
  auto it = residents_.find(key);
  if (it == residents_.end()) return;
  Resident res = std::move(it->second);
  residents_.erase(it);
  if (res.loading) --loads_in_flight_;
  // Forced only when requests still hold it: the runner failed under them, their grants are void.
  set_.begin_unload(key, !res.granted.empty());
  std::vector<std::uint64_t> voided(res.granted.begin(), res.granted.end());
  std::sort(voided.begin(), voided.end());
  for (std::uint64_t id : voided) {
    reject_locked(out, requests_.at(id), RejectCode::Failed, why, now);
  }
  Action a;
  a.kind = ActionKind::Stop;
  a.key = key;
  a.evicted = cause == StopCause::Reload;  // idle and wanted again at once: no grace needed
  a.cause = cause;
  a.reason = why;
  emit_locked(out, std::move(a), now);
}

void Engine::emit_locked(std::vector<Action>& out, Action action, Nanos now) {
  if (options_.journal) journal_.push_back(std::to_string(now) + " " + describe(action));
  out.push_back(std::move(action));
}

}  // namespace residency
