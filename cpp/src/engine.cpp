#include "residency/engine.hpp"

#include <algorithm>
#include <cstdio>

#include "residency/errors.hpp"

namespace residency {

Engine::Engine(std::vector<DeviceSpec> devices, std::unique_ptr<EvictionPolicy> policy,
               EngineOptions options)
    : set_(std::move(devices), std::move(policy)), options_(options) {
  if (options_.max_queue == 0) throw InvalidArgument("max_queue must be at least 1");
  if (options_.starvation < 0) throw InvalidArgument("the starvation deadline must be ≥ 0");
}

// ---- events ------------------------------------------------------------------------------------

std::vector<Action> Engine::arrive(std::uint64_t request, const std::string& key,
                                   const LoadShape& shape, std::uint64_t bytes_needed,
                                   Nanos keep_alive, Nanos now) {
  if (key.empty()) throw InvalidArgument("model key must not be empty");
  std::lock_guard lock(mutex_);
  if (requests_.count(request) != 0) {
    throw InvalidArgument("request id " + std::to_string(request) + " is already in use");
  }
  std::vector<Action> out;
  Request& r = requests_[request];
  r = Request{request, key, shape, bytes_needed, keep_alive, now, Phase::Queued};
  // The fast path: a resident model serves at once, unless the oldest waiter is overdue (then even
  // a ready model's requests line up behind it, so it cannot be starved by their traffic).
  bool servable = servable_locked(r);
  if (servable && head_overdue_locked(now)) {
    servable = false;
    held_back_ = true;
  }
  const std::size_t waiting = queue_.size() + joining_;
  if (servable && (!residents_.at(key).loading || waiting < options_.max_queue)) {
    grant_locked(out, r, now);
    return out;
  }
  if (waiting >= options_.max_queue) {
    reject_locked(out, r, RejectCode::Busy,
                  "server busy: " + std::to_string(waiting) +
                      " requests are already waiting (max_queue " +
                      std::to_string(options_.max_queue) + "); retry later",
                  now);
    return out;
  }
  queue_.emplace(now, request);
  queue_by_model_[key].emplace(now, request);
  if (bytes_needed == 0) {
    Action a;
    a.kind = ActionKind::Estimate;
    a.request = request;
    a.key = key;
    emit_locked(out, std::move(a), now);
  }
  // Behind others it changes nothing (an arrival frees no room, and only the oldest loads): the
  // queue is worked on when it becomes the head, so an arrival costs O(log n) with n queued.
  if (queue_.size() == 1) schedule_locked(out, now);
  if (bytes_needed > 0) prefetch_if_waiting_locked(out, request, now);  // else once sized
  return out;
}

std::vector<Action> Engine::sized(std::uint64_t request, std::uint64_t bytes_needed, Nanos now) {
  if (bytes_needed == 0) throw InvalidArgument("bytes needed must be positive");
  std::lock_guard lock(mutex_);
  std::vector<Action> out;
  auto it = requests_.find(request);
  if (it == requests_.end() || it->second.phase != Phase::Queued) return out;  // served meanwhile
  it->second.bytes = bytes_needed;
  schedule_locked(out, now);
  prefetch_if_waiting_locked(out, request, now);
  return out;
}

void Engine::prefetch_if_waiting_locked(std::vector<Action>& out, std::uint64_t request,
                                        Nanos now) {
  const auto it = requests_.find(request);  // the schedule may have served or refused it
  if (it == requests_.end() || it->second.phase != Phase::Queued) return;
  const Request& r = it->second;
  if (residents_.count(r.key) != 0) return;  // loading or ready: its runner reads the file
  const auto peers = queue_by_model_.find(r.key);
  if (peers == queue_by_model_.end() || peers->second.size() != 1) return;  // asked for already
  Action a;
  a.kind = ActionKind::Prefetch;
  a.request = request;
  a.key = r.key;
  a.bytes = r.bytes;
  emit_locked(out, std::move(a), now);
}

std::vector<Action> Engine::ready(const std::string& key, Nanos now, double load_seconds,
                                  std::optional<std::uint64_t> measured_bytes) {
  std::lock_guard lock(mutex_);
  std::vector<Action> out;
  auto it = residents_.find(key);
  if (it == residents_.end() || !it->second.loading) {
    throw InvalidState("model '" + key + "' is not loading");
  }
  try {
    set_.loaded(key, now, load_seconds, measured_bytes);
  } catch (const BudgetExceeded&) {
    // The measurement does not fit beside the others: keep the estimate the load was admitted with.
    set_.loaded(key, now, load_seconds);
  }
  it->second.loading = false;
  --loads_in_flight_;
  for (std::uint64_t id : it->second.granted) unjoin_locked(requests_.at(id));
  load_seconds_sum_ += load_seconds;
  ++loads_done_;
  if (it->second.unload_when_idle && it->second.granted.empty()) {
    stop_locked(out, key, StopCause::Unload, "unloaded on request", now);
  }
  schedule_locked(out, now);
  return out;
}

std::vector<Action> Engine::done(std::uint64_t request, Nanos now, std::optional<Nanos> keep_alive) {
  std::lock_guard lock(mutex_);
  std::vector<Action> out;
  auto it = requests_.find(request);
  if (it == requests_.end()) return out;  // voided by a failure: nothing to give back
  if (it->second.phase == Phase::Queued) {
    dequeue_locked(it->second);
    requests_.erase(it);
  } else {
    release_locked(out, it->second, now, keep_alive);
  }
  schedule_locked(out, now);
  return out;
}

std::vector<Action> Engine::cancel(std::uint64_t request, Nanos now) {
  return done(request, now, std::nullopt);
}

std::vector<Action> Engine::gone(const std::string& key, Nanos now) {
  std::lock_guard lock(mutex_);
  std::vector<Action> out;
  set_.unloaded(key);
  schedule_locked(out, now);
  return out;
}

std::vector<Action> Engine::failed(const std::string& key, const std::string& reason, Nanos now) {
  std::lock_guard lock(mutex_);
  std::vector<Action> out;
  if (residents_.count(key) == 0) return out;  // already leaving
  stop_locked(out, key, StopCause::Failed, reason, now);
  schedule_locked(out, now);
  return out;
}

std::vector<Action> Engine::unload(const std::string& key, Nanos now, bool fresh) {
  std::lock_guard lock(mutex_);
  std::vector<Action> out;
  auto it = residents_.find(key);
  if (it == residents_.end()) return out;
  it->second.retiring = it->second.retiring || fresh;
  if (!it->second.loading && it->second.granted.empty()) {
    stop_locked(out, key, StopCause::Unload, "unloaded on request", now);
    schedule_locked(out, now);
  } else {
    it->second.unload_when_idle = true;
  }
  return out;
}

std::vector<Action> Engine::tick(Nanos now) {
  std::lock_guard lock(mutex_);
  std::vector<Action> out;
  expire_locked(out, now);
  schedule_locked(out, now);
  return out;
}

// ---- decisions ---------------------------------------------------------------------------------

Nanos Engine::starvation_locked() const {
  if (options_.starvation > 0) return options_.starvation;
  if (loads_done_ == 0) return kDefaultStarvation;
  return static_cast<Nanos>(load_seconds_sum_ / static_cast<double>(loads_done_) * 1e9);
}

bool Engine::head_overdue_locked(Nanos now) const {
  if (options_.discipline != Discipline::Affinity || queue_.empty()) return false;
  // Only a head that waits for busy models to go idle is hurt by new grants (they keep them
  // busy); a head that is merely far back in a long queue is not, and riding keeps loads few.
  if (queue_.begin()->second != blocked_head_) return false;
  return now - queue_.begin()->first >= starvation_locked();
}

bool Engine::servable_locked(const Request& r) const {
  auto it = residents_.find(r.key);
  if (it == residents_.end() || it->second.retiring) return false;
  // Ollama's fast path sees only loaded runners; affinity also lets requests join a load.
  if (it->second.loading && options_.discipline == Discipline::Ollama) return false;
  return it->second.shape.satisfies(r.shape);
}

void Engine::schedule_locked(std::vector<Action>& out, Nanos now) {
  expire_locked(out, now);
  time_out_locked(out, now);
  if (options_.discipline == Discipline::Affinity && head_overdue_locked(now)) {
    held_back_ = true;
  } else if (options_.discipline == Discipline::Affinity && held_back_) {
    // Requests held back while an overdue head waited ride on resident models now (a copy of
    // the keys: granting edits the map). Only then can a resident model have queued riders.
    held_back_ = false;
    std::vector<std::string> keys;
    for (const auto& [key, orders] : queue_by_model_) {
      if (residents_.count(key) != 0) keys.push_back(key);
    }
    for (const auto& key : keys) grant_riders_locked(out, key, now);
  }
  // Loads start in the order of the oldest waiting request; Ollama allows one in flight.
  while (!queue_.empty()) {
    if (options_.discipline == Discipline::Ollama && loads_in_flight_ > 0) return;
    if (options_.max_loads > 0 && loads_in_flight_ >= options_.max_loads &&
        !servable_locked(requests_.at(queue_.begin()->second))) {
      return;  // the head needs a load and enough are under way: it starts when one is done
    }
    Request& head = requests_.at(queue_.begin()->second);
    if (!serve_head_locked(out, head, now)) return;
  }
}

void Engine::grant_riders_locked(std::vector<Action>& out, const std::string& key, Nanos now) {
  auto queued = queue_by_model_.find(key);
  auto resident = residents_.find(key);
  if (queued == queue_by_model_.end() || resident == residents_.end()) return;
  if (resident->second.retiring) return;
  std::vector<std::uint64_t> riders;
  for (const auto& [arrival, id] : queued->second) {
    if (resident->second.shape.satisfies(requests_.at(id).shape)) riders.push_back(id);
  }
  for (std::uint64_t id : riders) grant_locked(out, requests_.at(id), now);
}

bool Engine::serve_head_locked(std::vector<Action>& out, Request& head, Nanos now) {
  if (servable_locked(head)) {
    grant_locked(out, head, now);
    return true;
  }
  if (auto it = residents_.find(head.key); it != residents_.end()) {
    // Resident with options that cannot serve this request: reload once nobody uses it.
    if (!it->second.loading && it->second.granted.empty()) {
      stop_locked(out, head.key, StopCause::Reload, "options changed", now);
    } else {
      blocked_head_ = head.id;  // its reload waits for the runner's requests to finish
    }
    return false;
  }
  if (head.bytes == 0) return false;  // its estimate is on the way
  AdmitDecision d = set_.admit(head.key, head.bytes, now, head.keep_alive);
  switch (d.outcome) {
    case AdmitOutcome::Load: {
      residents_[head.key] = Resident{head.shape, true, false, false, {}};
      ++loads_in_flight_;
      for (const auto& v : d.victims) {
        // The resident set moved each victim to Unloading; only the runner remains to stop.
        residents_.erase(v);
        Action stop;
        stop.kind = ActionKind::Stop;
        stop.key = v;
        stop.evicted = true;
        stop.cause = StopCause::MakeRoom;
        stop.reason = "evicted for " + head.key;
        emit_locked(out, std::move(stop), now);
      }
      Action load;
      load.kind = ActionKind::Load;
      load.request = head.id;
      load.key = head.key;
      load.device = d.device;
      load.victims = std::move(d.victims);
      load.freed_bytes = d.freed_bytes;
      load.bytes = head.bytes;
      emit_locked(out, std::move(load), now);
      grant_locked(out, head, now);
      // Affinity: every queued request this load can serve rides on it, unless someone waiting
      // is overdue (then they line up like everyone else).
      if (options_.discipline == Discipline::Affinity) {
        if (head_overdue_locked(now)) {
          held_back_ = true;
        } else {
          grant_riders_locked(out, head.key, now);
        }
      }
      return true;
    }
    case AdmitOutcome::TooLarge:
      reject_locked(out, head, RejectCode::TooLarge, d.reason, now);
      return true;
    case AdmitOutcome::Wait:
      blocked_head_ = head.id;  // busy models hold the room it needs
      return false;
    case AdmitOutcome::Hit:  // not among residents_: it is still unloading
      return false;
  }
  return false;
}

void Engine::expire_locked(std::vector<Action>& out, Nanos now) {
  for (const auto& key : set_.expired(now)) {
    if (residents_.count(key) != 0) {
      stop_locked(out, key, StopCause::Expired, "keep-alive expired", now);
    }
  }
}

void Engine::time_out_locked(std::vector<Action>& out, Nanos now) {
  if (options_.queue_timeout <= 0) return;
  // The queue is in arrival order: only its front can be overdue.
  while (!queue_.empty() && now - queue_.begin()->first >= options_.queue_timeout) {
    Request& r = requests_.at(queue_.begin()->second);
    const double waited = static_cast<double>(now - r.arrival) / 1e9;
    char text[160];
    std::snprintf(text, sizeof text, "waited %.1f s in the queue for '%s' (queue_timeout %.0f s)",
                  waited, r.key.c_str(), static_cast<double>(options_.queue_timeout) / 1e9);
    reject_locked(out, r, RejectCode::TimedOut, text, now);
  }
}

void Engine::release_locked(std::vector<Action>& out, Request& r, Nanos now,
                            std::optional<Nanos> keep_alive) {
  const std::string key = r.key;
  auto it = residents_.find(key);
  if (it != residents_.end()) {
    set_.release(key, now, keep_alive);
    it->second.granted.erase(r.id);
  }
  unjoin_locked(r);
  requests_.erase(r.id);
  if (it != residents_.end() && it->second.unload_when_idle && !it->second.loading &&
      it->second.granted.empty()) {
    stop_locked(out, key, StopCause::Unload, "unloaded on request", now);
  }
}

}  // namespace residency
