#include "residency/resident_set.hpp"

#include <algorithm>
#include <limits>

#include "residency/errors.hpp"

namespace residency {

namespace {

// Anything beyond an exbibyte is a unit mistake, not a model.
constexpr std::uint64_t kMaxBytes = std::uint64_t{1} << 60;

std::string bytes_text(std::uint64_t bytes) { return std::to_string(bytes) + " bytes"; }

void check_key(const std::string& key) {
  if (key.empty()) throw InvalidArgument("model key must not be empty");
}

void check_bytes(std::uint64_t bytes, const char* what) {
  if (bytes == 0) throw InvalidArgument(std::string(what) + " must be positive");
  if (bytes > kMaxBytes) {
    throw InvalidArgument(std::string(what) + " of " + bytes_text(bytes) +
                          " is absurd (more than 1 EiB)");
  }
}

Nanos saturating_add(Nanos a, Nanos b) {
  if (b > 0 && a > std::numeric_limits<Nanos>::max() - b) return std::numeric_limits<Nanos>::max();
  return a + b;
}

}  // namespace

ResidentSet::ResidentSet(std::vector<DeviceSpec> devices, std::unique_ptr<EvictionPolicy> policy)
    : policy_(std::move(policy)) {
  if (!policy_) throw InvalidArgument("an eviction policy is required");
  for (const auto& spec : devices) add_device_locked(spec);
}

void ResidentSet::add_device(const DeviceSpec& spec) {
  std::lock_guard lock(mutex_);
  add_device_locked(spec);
}

void ResidentSet::add_device_locked(const DeviceSpec& spec) {
  if (spec.id.empty()) throw InvalidArgument("device id must not be empty");
  check_bytes(spec.total_bytes, "device total");
  if (spec.overhead_bytes >= spec.total_bytes) {
    throw InvalidArgument("device '" + spec.id + "': overhead (" + bytes_text(spec.overhead_bytes) +
                          ") leaves no budget of its total (" + bytes_text(spec.total_bytes) + ")");
  }
  if (spec.max_models == 0) {
    throw InvalidArgument("device '" + spec.id + "': max_models must be at least 1");
  }
  for (const auto& d : devices_) {
    if (d.spec.id == spec.id) throw InvalidArgument("device '" + spec.id + "' already exists");
  }
  devices_.push_back(DeviceState{spec});
}

ResidentSet::Slot& ResidentSet::find_locked(const std::string& key) {
  auto it = reservations_.find(key);
  if (it == reservations_.end()) throw UnknownModel("model '" + key + "' is not resident");
  return it->second;
}

const ResidentSet::Slot& ResidentSet::find_locked(const std::string& key) const {
  auto it = reservations_.find(key);
  if (it == reservations_.end()) throw UnknownModel("model '" + key + "' is not resident");
  return it->second;
}

DeviceUsage ResidentSet::usage_locked(const DeviceState& d) const {
  return DeviceUsage{d.spec.id,  d.spec.total_bytes, d.spec.overhead_bytes, d.spec.max_models,
                     d.budget(), d.reserved,         d.unloading,           d.models};
}

void ResidentSet::start_keep_alive_locked(Reservation& r, Nanos now) const {
  if (r.pinned || r.keep_alive < 0) {
    r.expires_at = kNever;
  } else if (r.keep_alive == 0) {
    r.expires_at = now;  // an explicit 0 is honoured exactly, whatever the policy
  } else {
    // The policy may adapt a positive keep-alive to what it has learnt of this model.
    const Nanos window = policy_->keep_alive_for(r, now);
    r.expires_at = window < 0 ? kNever : saturating_add(now, window);
  }
}

void ResidentSet::move_to_unloading_locked(Slot& slot, bool evicted) {
  Reservation& r = slot.r;
  DeviceState& d = devices_[slot.device];
  d.reserved -= r.bytes;
  d.unloading += r.bytes;
  --d.models;
  r.state = ReservationState::Unloading;
  r.expires_at = kNever;
  if (evicted) {
    policy_->on_evicted(r, *slot.stats);
  } else {
    policy_->on_unloaded(r, *slot.stats);
  }
}

AdmitDecision ResidentSet::admit(const std::string& key, std::uint64_t bytes_needed, Nanos now,
                                 Nanos keep_alive) {
  check_key(key);
  check_bytes(bytes_needed, "bytes needed");
  std::lock_guard lock(mutex_);

  if (auto it = reservations_.find(key); it != reservations_.end()) {
    const Reservation& r = it->second.r;
    if (r.state == ReservationState::Unloading) {
      return {AdmitOutcome::Wait, r.device, {}, 0, "model '" + key + "' is still unloading"};
    }
    return {AdmitOutcome::Hit, r.device, {}, 0, {}};
  }
  if (devices_.empty()) {
    return {AdmitOutcome::TooLarge, {}, {}, 0, "no devices are configured"};
  }

  // 1. A device where it fits as things are: the one with the most free budget (spreads load).
  std::optional<std::size_t> target;
  for (std::size_t i = 0; i < devices_.size(); ++i) {
    const DeviceState& d = devices_[i];
    if (d.reserved + bytes_needed <= d.budget() && d.models < d.spec.max_models) {
      const auto& best = devices_[target.value_or(i)];
      if (!target || d.budget() - d.reserved > best.budget() - best.reserved) target = i;
    }
  }

  std::vector<std::string> victims;
  std::uint64_t freed = 0;

  // 2. Otherwise the device whose eviction the policy rates cheapest. One pass buckets the idle,
  //    unpinned, ready models by device; candidates arrive in no particular order, so policies
  //    break ties by a total order of their own.
  if (!target) {
    std::vector<std::vector<Candidate>> idle(devices_.size());
    for (auto& [k, slot] : reservations_) {
      const Reservation& r = slot.r;
      if (r.state == ReservationState::Ready && r.refcount == 0 && !r.pinned) {
        idle[slot.device].push_back(Candidate{&r, slot.stats});
      }
    }
    double best_cost = std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < devices_.size(); ++i) {
      const DeviceState& d = devices_[i];
      if (bytes_needed > d.budget()) continue;
      const DeviceUsage usage = usage_locked(d);
      EvictionNeed need{&usage, 0, 0, now};
      if (d.reserved + bytes_needed > d.budget()) {
        need.bytes_to_free = d.reserved + bytes_needed - d.budget();
      }
      if (d.models + 1 > d.spec.max_models) need.slots_to_free = d.models + 1 - d.spec.max_models;
      auto choice = policy_->choose_victims(idle[i], need);
      if (!choice || !(choice->cost < best_cost)) continue;
      best_cost = choice->cost;
      target = i;
      victims.clear();
      freed = 0;
      for (std::size_t v : choice->victims) {
        victims.push_back(idle[i][v].reservation->key);
        freed += idle[i][v].reservation->bytes;
      }
    }
  }

  if (target) {
    DeviceState& d = devices_[*target];
    for (const auto& v : victims) move_to_unloading_locked(reservations_.at(v), true);
    Slot slot{Reservation{}, *target, &stats_[key]};
    Reservation& r = slot.r;
    r.key = key;
    r.device = d.spec.id;
    r.state = ReservationState::Loading;
    r.bytes = r.estimated_bytes = bytes_needed;
    r.keep_alive = keep_alive;
    r.admitted_at = r.last_used = now;
    d.reserved += bytes_needed;
    ++d.models;
    reservations_.emplace(key, std::move(slot));
    return {AdmitOutcome::Load, d.spec.id, std::move(victims), freed, {}};
  }

  // 3. Would it fit once busy and loading models go idle? Pinned models never leave.
  std::vector<std::uint64_t> pinned_bytes(devices_.size(), 0);
  std::vector<std::uint32_t> pinned_models(devices_.size(), 0);
  for (const auto& [k, slot] : reservations_) {
    if (slot.r.pinned && slot.r.state != ReservationState::Unloading) {
      pinned_bytes[slot.device] += slot.r.bytes;
      ++pinned_models[slot.device];
    }
  }
  std::uint64_t largest_budget = 0;
  for (std::size_t i = 0; i < devices_.size(); ++i) {
    const DeviceState& d = devices_[i];
    largest_budget = std::max(largest_budget, d.budget());
    if (pinned_bytes[i] + bytes_needed <= d.budget() && pinned_models[i] < d.spec.max_models) {
      return {AdmitOutcome::Wait, d.spec.id, {}, 0,
              "model '" + key + "' fits on device '" + d.spec.id + "' once busy models go idle"};
    }
  }
  if (bytes_needed > largest_budget) {
    return {AdmitOutcome::TooLarge, {}, {}, 0,
            "model '" + key + "' needs " + bytes_text(bytes_needed) +
                " but the largest device budget is " + bytes_text(largest_budget)};
  }
  return {AdmitOutcome::TooLarge, {}, {}, 0,
          "model '" + key + "' needs " + bytes_text(bytes_needed) +
              " and fits on no device beside its pinned models"};
}

void ResidentSet::loaded(const std::string& key, Nanos now, double load_seconds,
                         std::optional<std::uint64_t> measured_bytes) {
  if (!(load_seconds >= 0.0)) throw InvalidArgument("load_seconds must be ≥ 0");
  if (measured_bytes) check_bytes(*measured_bytes, "measured bytes");
  std::lock_guard lock(mutex_);
  Slot& slot = find_locked(key);
  Reservation& r = slot.r;
  if (r.state != ReservationState::Loading) {
    throw InvalidState("model '" + key + "' is " + to_string(r.state) + ", not loading");
  }
  DeviceState& d = devices_[slot.device];
  if (measured_bytes) {
    if (d.reserved - r.bytes + *measured_bytes > d.budget()) {
      throw BudgetExceeded("model '" + key + "' measured " + bytes_text(*measured_bytes) +
                           ", more than device '" + d.spec.id + "' can hold beside the others");
    }
    d.reserved = d.reserved - r.bytes + *measured_bytes;
    r.bytes = *measured_bytes;
    r.measured = true;
  }
  r.state = ReservationState::Ready;
  r.loaded_at = r.last_used = now;
  r.load_seconds = load_seconds;
  if (r.refcount == 0) start_keep_alive_locked(r, now);
  ModelStats& s = *slot.stats;
  ++s.loads;
  s.last_load_seconds = load_seconds;
  s.last_bytes = r.bytes;
  policy_->on_loaded(r, s);
}

Nanos ResidentSet::acquire(const std::string& key, Nanos now) {
  std::lock_guard lock(mutex_);
  Slot& slot = find_locked(key);
  Reservation& r = slot.r;
  if (r.state == ReservationState::Unloading) {
    throw InvalidState("model '" + key + "' is unloading");
  }
  const Nanos idle = r.state == ReservationState::Ready && r.refcount == 0 ? now - r.last_used : 0;
  ++r.refcount;
  ++r.hits;
  r.last_used = now;
  r.expires_at = kNever;
  ModelStats& s = *slot.stats;
  ++s.requests;
  s.last_used = now;
  policy_->on_request(key, s, now);
  return idle;
}

void ResidentSet::release(const std::string& key, Nanos now, std::optional<Nanos> keep_alive) {
  std::lock_guard lock(mutex_);
  Slot& slot = find_locked(key);
  Reservation& r = slot.r;
  if (r.refcount == 0) throw NotAcquired("model '" + key + "' released more often than acquired");
  --r.refcount;
  r.last_used = now;
  if (keep_alive) r.keep_alive = *keep_alive;
  if (r.refcount == 0) policy_->on_idle(r, *slot.stats, now);
  if (r.refcount == 0 && r.state == ReservationState::Ready) start_keep_alive_locked(r, now);
}

std::uint64_t ResidentSet::begin_unload(const std::string& key, bool force) {
  std::lock_guard lock(mutex_);
  Slot& slot = find_locked(key);
  Reservation& r = slot.r;
  if (r.state == ReservationState::Unloading) {
    throw InvalidState("model '" + key + "' is already unloading");
  }
  if (r.refcount > 0 && !force) {
    throw ModelBusy("model '" + key + "' is in use by " + std::to_string(r.refcount) +
                    " request(s)");
  }
  // A forced unload means the runner is gone: the references held on it die with it.
  r.refcount = 0;
  move_to_unloading_locked(slot, false);
  return r.bytes;
}

void ResidentSet::unloaded(const std::string& key) {
  std::lock_guard lock(mutex_);
  Slot& slot = find_locked(key);
  const Reservation& r = slot.r;
  if (r.state != ReservationState::Unloading) {
    throw InvalidState("model '" + key + "' is " + to_string(r.state) +
                       ": call begin_unload() first");
  }
  devices_[slot.device].unloading -= r.bytes;
  reservations_.erase(key);
}

void ResidentSet::update_measured_bytes(const std::string& key, std::uint64_t bytes) {
  check_bytes(bytes, "measured bytes");
  std::lock_guard lock(mutex_);
  Slot& slot = find_locked(key);
  Reservation& r = slot.r;
  if (r.state == ReservationState::Unloading) {
    throw InvalidState("model '" + key + "' is unloading");
  }
  DeviceState& d = devices_[slot.device];
  if (d.reserved - r.bytes + bytes > d.budget()) {
    throw BudgetExceeded("model '" + key + "' measured " + bytes_text(bytes) + ", more than device '" +
                         d.spec.id + "' can hold beside the others");
  }
  d.reserved = d.reserved - r.bytes + bytes;
  r.bytes = bytes;
  r.measured = true;
  slot.stats->last_bytes = bytes;
}

void ResidentSet::set_pinned(const std::string& key, bool pinned, Nanos now) {
  std::lock_guard lock(mutex_);
  Reservation& r = find_locked(key).r;
  r.pinned = pinned;
  if (r.state == ReservationState::Ready && r.refcount == 0) start_keep_alive_locked(r, now);
}

}  // namespace residency
