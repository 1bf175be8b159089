#include <algorithm>
#include <numeric>

#include "residency/policy.hpp"

namespace residency {

namespace {
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
}  // namespace

double GdsfPolicy::priority(const Candidate& candidate) const {
  const Reservation& r = *candidate.reservation;
  const auto it = entries_.find(r.key);
  const Entry entry = it == entries_.end() ? Entry{} : it->second;
  // At least one request: a model that is resident was asked for once, even if only by a preload.
  const double frequency = static_cast<double>(std::max<std::uint64_t>(entry.frequency, 1));
  // A model never loaded yet (no measured cost) is priced as if it took a second per GiB.
  const double gib = std::max(static_cast<double>(r.bytes) / kGiB, 1e-9);
  const double cost = r.load_seconds > 0.0 ? r.load_seconds : gib;
  return entry.clock_at_access + frequency * cost / gib;
}

std::optional<VictimChoice> GdsfPolicy::choose_victims(const std::vector<Candidate>& candidates,
                                                       const EvictionNeed& need) {
  std::vector<double> prio(candidates.size());
  for (std::size_t i = 0; i < candidates.size(); ++i) prio[i] = priority(candidates[i]);
  std::vector<std::size_t> order(candidates.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  // Cheapest to lose first; candidates arrive in no particular order, so ties go by key.
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (prio[a] != prio[b]) return prio[a] < prio[b];
    return candidates[a].reservation->key < candidates[b].reservation->key;
  });

  std::vector<std::size_t> taken;
  std::uint64_t freed = 0;
  std::uint32_t slots = 0;
  for (std::size_t i : order) {
    if (freed >= need.bytes_to_free && slots >= need.slots_to_free) break;
    taken.push_back(i);
    freed += candidates[i].reservation->bytes;
    ++slots;
  }
  if (freed < need.bytes_to_free || slots < need.slots_to_free) return std::nullopt;

  // Greedy by priority can overshoot: a large cheap model taken last may make earlier, smaller
  // victims unnecessary. Drop the most valuable victims that are not needed, so the set is minimal
  // (without any one of them the model would not fit).
  for (std::size_t j = taken.size(); j-- > 0;) {
    const std::uint64_t b = candidates[taken[j]].reservation->bytes;
    if (freed - b >= need.bytes_to_free && slots - 1 >= need.slots_to_free) {
      freed -= b;
      --slots;
      taken.erase(taken.begin() + static_cast<std::ptrdiff_t>(j));
    }
  }

  VictimChoice choice;
  choice.victims = std::move(taken);
  // What the device loses: the priority the victims hold above the clock, weighted by their bytes
  // (frequency × load cost), so devices compare by the load time their victims are worth.
  for (std::size_t i : choice.victims) {
    const double gib = static_cast<double>(candidates[i].reservation->bytes) / kGiB;
    choice.cost += std::max(prio[i] - clock_, 0.0) * gib;
  }
  return choice;
}

void GdsfPolicy::on_request(const std::string& key, const ModelStats& /*stats*/, Nanos /*now*/) {
  Entry& e = entries_[key];
  ++e.frequency;
  e.clock_at_access = clock_;
}

void GdsfPolicy::on_evicted(const Reservation& reservation, const ModelStats& stats) {
  // Inflation: the clock rises to the victim's priority, so every model must be used again to stay
  // ahead of the ones that come in after it.
  clock_ = std::max(clock_, priority(Candidate{&reservation, &stats}));
  entries_.erase(reservation.key);
}

void GdsfPolicy::on_unloaded(const Reservation& reservation, const ModelStats& /*stats*/) {
  // Gone without being chosen (expired, unloaded by hand): its frequency starts over next time.
  entries_.erase(reservation.key);
}

}  // namespace residency
