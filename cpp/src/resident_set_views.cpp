// The resident set's read-only queries: expiries due, snapshots for /api/ps, device usage, stats.
// Each takes the set's lock; none changes it (the decisions are in resident_set.cpp).
#include <algorithm>

#include "residency/resident_set.hpp"

namespace residency {

const char* to_string(AdmitOutcome outcome) {
  switch (outcome) {
    case AdmitOutcome::Hit: return "hit";
    case AdmitOutcome::Load: return "load";
    case AdmitOutcome::Wait: return "wait";
    case AdmitOutcome::TooLarge: return "too_large";
  }
  return "?";
}

const char* to_string(ReservationState state) {
  switch (state) {
    case ReservationState::Loading: return "loading";
    case ReservationState::Ready: return "ready";
    case ReservationState::Unloading: return "unloading";
  }
  return "?";
}

std::vector<std::string> ResidentSet::expired(Nanos now) const {
  std::lock_guard lock(mutex_);
  std::vector<const Reservation*> due;
  for (const auto& [k, slot] : reservations_) {
    const Reservation& r = slot.r;
    if (r.state == ReservationState::Ready && r.refcount == 0 && r.expires_at <= now) {
      due.push_back(&r);
    }
  }
  std::sort(due.begin(), due.end(), [](const Reservation* a, const Reservation* b) {
    return a->expires_at != b->expires_at ? a->expires_at < b->expires_at : a->key < b->key;
  });
  std::vector<std::string> keys;
  keys.reserve(due.size());
  for (const auto* r : due) keys.push_back(r->key);
  return keys;
}

std::optional<Nanos> ResidentSet::next_expiry() const {
  std::lock_guard lock(mutex_);
  std::optional<Nanos> next;
  for (const auto& [k, slot] : reservations_) {
    const Reservation& r = slot.r;
    if (r.state == ReservationState::Ready && r.refcount == 0 && r.expires_at != kNever) {
      if (!next || r.expires_at < *next) next = r.expires_at;
    }
  }
  return next;
}

std::optional<Reservation> ResidentSet::reservation(const std::string& key) const {
  std::lock_guard lock(mutex_);
  auto it = reservations_.find(key);
  if (it == reservations_.end()) return std::nullopt;
  return it->second.r;
}

std::vector<Reservation> ResidentSet::snapshot() const {
  std::lock_guard lock(mutex_);
  std::vector<Reservation> out;
  out.reserve(reservations_.size());
  for (const auto& [k, slot] : reservations_) out.push_back(slot.r);
  std::sort(out.begin(), out.end(),
            [](const Reservation& a, const Reservation& b) { return a.key < b.key; });
  return out;
}

std::vector<DeviceUsage> ResidentSet::devices() const {
  std::lock_guard lock(mutex_);
  std::vector<DeviceUsage> out;
  out.reserve(devices_.size());
  for (const auto& d : devices_) out.push_back(usage_locked(d));
  return out;
}

std::optional<ModelStats> ResidentSet::stats(const std::string& key) const {
  std::lock_guard lock(mutex_);
  auto it = stats_.find(key);
  if (it == stats_.end()) return std::nullopt;
  return it->second;
}

void ResidentSet::set_host_warm(const std::string& key, std::uint64_t bytes) {
  std::lock_guard lock(mutex_);
  stats_[key].host_warm_bytes = bytes;
}

std::string ResidentSet::policy_name() const {
  std::lock_guard lock(mutex_);
  return std::string(policy_->name());
}

}  // namespace residency
