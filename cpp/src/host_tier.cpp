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
                            Nanos now, bool displace_any) {
  const std::uint64_t want = std::min(f.bytes, budget_);
  if (f.kept >= want) return f.kept > 0;
  const double mine = value_locked(f, now);
  // Candidates to displace, least valuable first (ties by name: deterministic).
  std::vector<std::tuple<double, std::string>> others;
  for (const auto& [k, o] : files_) {
    if (o.kept > 0 && k != key) others.emplace_back(value_locked(o, now), k);
  }
  std::sort(others.begin(), others.end());
  std::uint64_t room = budget_ - kept_bytes_ + f.kept;
  for (const auto& [value, victim] : others) {
    if (room >= want || (value >= mine && !displace_any)) break;  // else not a better file
    File& o = files_.at(victim);
    const std::uint64_t give = std::min(o.kept, want - room);
    trim_locked(out, victim, o, o.kept - give);  // the last one may keep its first bytes
    room += give;
  }
  const std::uint64_t keep = std::min(want, room);
  kept_bytes_ += keep - f.kept;
  f.kept = keep;
  return keep > 0;
}

void HostTier::trim_locked(std::vector<HostAction>& out, const std::string& key, File& f,
                           std::uint64_t keep) {
  if (keep < f.kept) {
    kept_bytes_ -= f.kept - keep;
    f.kept = keep;
  }
  // A mapped file stays: the kernel would not drop pages in use anyway; unmapping drops it.
  if (!f.mapped && f.warm > f.kept) {
    out.push_back({HostActionKind::Drop, key, f.warm - f.kept, f.kept});
    f.warm = f.kept;
  }
}

void HostTier::resize_locked(File& f, std::uint64_t bytes) {
  if (f.bytes == bytes) return;
  kept_bytes_ -= f.kept;  // admitted at another size: admit again
  f.kept = 0;
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
  admit_locked(out, key, f, now);
  trim_locked(out, key, f, f.kept);  // what is not kept leaves (once unmapped)
  return out;
}

std::vector<HostAction> HostTier::waiting(const std::string& key, std::uint64_t bytes, Nanos now) {
  const std::lock_guard lock(mutex_);
  std::vector<HostAction> out;
  File& f = files_[key];
  resize_locked(f, bytes);
  // No use counted: the load that follows counts it (once per load, prefetched or not).
  if (admit_locked(out, key, f, now, /*displace_any=*/true) && f.warm < f.kept) {
    out.push_back({HostActionKind::Warm, key, f.kept, 0});
    f.warm = f.kept;
  }
  return out;
}

std::vector<HostAction> HostTier::mapped(const std::string& key, bool is_mapped, Nanos /*now*/) {
  const std::lock_guard lock(mutex_);
  std::vector<HostAction> out;
  File& f = files_[key];
  f.mapped = is_mapped;
  if (!is_mapped) trim_locked(out, key, f, f.kept);
  return out;
}

std::vector<HostAction> HostTier::measured(const std::string& key, std::uint64_t warm_bytes,
                                           Nanos /*now*/) {
  const std::lock_guard lock(mutex_);
  std::vector<HostAction> out;
  File& f = files_[key];
  f.warm = f.bytes > 0 ? std::min(warm_bytes, f.bytes) : warm_bytes;
  trim_locked(out, key, f, f.kept);
  return out;
}

bool HostTier::kept(const std::string& key) const {
  const std::lock_guard lock(mutex_);
  const auto it = files_.find(key);
  return it != files_.end() && it->second.kept > 0;
}

std::uint64_t HostTier::kept_of(const std::string& key) const {
  const std::lock_guard lock(mutex_);
  const auto it = files_.find(key);
  return it == files_.end() ? 0 : it->second.kept;
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
