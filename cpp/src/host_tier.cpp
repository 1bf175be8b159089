#include "residency/host_tier.hpp"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "residency/errors.hpp"

namespace residency {

HostTier::HostTier(std::uint64_t budget, Nanos half_life) : budget_(budget), half_life_(half_life) {
  if (half_life <= 0) throw InvalidArgument("host tier: the half-life must be > 0");
}

double HostTier::value_locked(const File& f, Nanos now) const {
  const double elapsed = static_cast<double>(std::max<Nanos>(0, now - f.at));
  return f.score * std::exp2(-elapsed / static_cast<double>(half_life_));
}

void HostTier::use_locked(File& f, Nanos now) {
  f.score = value_locked(f, now) + 1.0;
  f.at = std::max(f.at, now);
}

bool HostTier::admit_locked(std::vector<HostAction>& out, const std::string& key, File& f,
                            Nanos now) {
  if (f.kept) return true;
  if (f.bytes > budget_) return false;
  const double mine = value_locked(f, now);
  // Candidates to displace, least valuable first (ties by name: deterministic).
  std::vector<std::tuple<double, std::string>> others;
  for (const auto& [k, o] : files_) {
    if (o.kept && k != key) others.emplace_back(value_locked(o, now), k);
  }
  std::sort(others.begin(), others.end());
  std::uint64_t room = budget_ - kept_bytes_;
  std::size_t take = 0;
  while (room < f.bytes && take < others.size()) {
    if (std::get<0>(others[take]) >= mine) return false;  // would displace a better file
    room += files_.at(std::get<1>(others[take])).bytes;
    ++take;
  }
  if (room < f.bytes) return false;
  for (std::size_t i = 0; i < take; ++i) {
    const std::string& victim = std::get<1>(others[i]);
    release_locked(out, victim, files_.at(victim));
  }
  f.kept = true;
  kept_bytes_ += f.bytes;
  return true;
}

void HostTier::release_locked(std::vector<HostAction>& out, const std::string& key, File& f) {
  if (f.kept) {
    f.kept = false;
    kept_bytes_ -= f.bytes;
  }
  // A mapped file stays: the kernel would not drop pages in use anyway; unmapping drops it.
  if (!f.mapped && f.warm > 0) {
    out.push_back({HostActionKind::Drop, key, f.warm});
    f.warm = 0;
  }
}

void HostTier::resize_locked(File& f, std::uint64_t bytes) {
  if (f.bytes == bytes) return;
  if (f.kept) {  // admitted at another size: admit again
    f.kept = false;
    kept_bytes_ -= f.bytes;
  }
  f.bytes = bytes;
  f.warm = std::min(f.warm, bytes);
}

std::vector<HostAction> HostTier::loaded(const std::string& key, std::uint64_t bytes, Nanos now) {
  const std::lock_guard lock(mutex_);
  std::vector<HostAction> out;
  File& f = files_[key];
  resize_locked(f, bytes);
  use_locked(f, now);
  f.warm = bytes;  // the load read it all
  if (!admit_locked(out, key, f, now)) release_locked(out, key, f);
  return out;
}

std::vector<HostAction> HostTier::waiting(const std::string& key, std::uint64_t bytes, Nanos now) {
  const std::lock_guard lock(mutex_);
  std::vector<HostAction> out;
  File& f = files_[key];
  resize_locked(f, bytes);
  // No use counted: the load that follows counts it (once per load, prefetched or not).
  if (admit_locked(out, key, f, now) && f.warm < f.bytes) {
    out.push_back({HostActionKind::Warm, key, f.bytes});
    f.warm = f.bytes;
  }
  return out;
}

std::vector<HostAction> HostTier::mapped(const std::string& key, bool is_mapped, Nanos /*now*/) {
  const std::lock_guard lock(mutex_);
  std::vector<HostAction> out;
  File& f = files_[key];
  f.mapped = is_mapped;
  if (!is_mapped && !f.kept) release_locked(out, key, f);
  return out;
}

std::vector<HostAction> HostTier::measured(const std::string& key, std::uint64_t warm_bytes,
                                           Nanos /*now*/) {
  const std::lock_guard lock(mutex_);
  std::vector<HostAction> out;
  File& f = files_[key];
  f.warm = f.bytes > 0 ? std::min(warm_bytes, f.bytes) : warm_bytes;
  if (!f.kept) release_locked(out, key, f);
  return out;
}

bool HostTier::kept(const std::string& key) const {
  const std::lock_guard lock(mutex_);
  const auto it = files_.find(key);
  return it != files_.end() && it->second.kept;
}

std::uint64_t HostTier::warm_bytes(const std::string& key) const {
  const std::lock_guard lock(mutex_);
  const auto it = files_.find(key);
  return it == files_.end() ? 0 : it->second.warm;
}

std::uint64_t HostTier::kept_bytes() const {
  const std::lock_guard lock(mutex_);
  return kept_bytes_;
}

double HostTier::frequency(const std::string& key, Nanos now) const {
  const std::lock_guard lock(mutex_);
  const auto it = files_.find(key);
  return it == files_.end() ? 0.0 : value_locked(it->second, now);
}

const char* to_string(HostActionKind kind) {
  return kind == HostActionKind::Warm ? "warm" : "drop";
}

}  // namespace residency
