#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>

#include "residency/policy.hpp"

namespace residency {

namespace {
// Ollama sorts by the configured keep-alive; "forever" (negative) sorts last.
Nanos sort_key(Nanos keep_alive) {
  return keep_alive < 0 ? std::numeric_limits<Nanos>::max() : keep_alive;
}

// Takes candidates in `order` until the incoming model fits; nullopt if even all do not free enough.
std::optional<VictimChoice> take_in_order(const std::vector<std::size_t>& order,
                                          const std::vector<Candidate>& candidates,
                                          const EvictionNeed& need) {
  VictimChoice choice;
  std::uint64_t freed = 0;
  std::uint32_t slots = 0;
  for (std::size_t i : order) {
    if (freed >= need.bytes_to_free && slots >= need.slots_to_free) break;
    choice.victims.push_back(i);
    freed += candidates[i].reservation->bytes;
    ++slots;
  }
  if (freed < need.bytes_to_free || slots < need.slots_to_free) return std::nullopt;
  // Fewer evictions is better; among equals, the device order decides.
  choice.cost = static_cast<double>(choice.victims.size());
  return choice;
}

std::vector<std::size_t> indices(std::size_t n) {
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  return order;
}
}  // namespace

std::optional<VictimChoice> OllamaPolicy::choose_victims(const std::vector<Candidate>& candidates,
                                                         const EvictionNeed& need) {
  std::vector<std::size_t> order = indices(candidates.size());
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const Reservation& ra = *candidates[a].reservation;
    const Reservation& rb = *candidates[b].reservation;
    return std::make_tuple(sort_key(ra.keep_alive), std::cref(ra.key)) <
           std::make_tuple(sort_key(rb.keep_alive), std::cref(rb.key));
  });
  return take_in_order(order, candidates, need);
}

std::optional<VictimChoice> TieredPolicy::choose_victims(const std::vector<Candidate>& candidates,
                                                         const EvictionNeed& need) {
  // Bytes a reload would read from disk: what the host tier does not hold warm. Only whether a
  // victim is wholly warm decides, not how many cold bytes: ranking by cold bytes would favour
  // evicting small models and hold more GPU memory (bench_policies: resident GB·s +10 %).
  auto cold_bytes = [&](std::size_t i) {
    const std::uint64_t bytes = candidates[i].reservation->bytes;
    return bytes - std::min(bytes, candidates[i].stats->host_warm_bytes);
  };
  std::vector<std::size_t> order = indices(candidates.size());
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const Reservation& ra = *candidates[a].reservation;
    const Reservation& rb = *candidates[b].reservation;
    return std::make_tuple(sort_key(ra.keep_alive), cold_bytes(a) > 0, ra.last_used,
                           std::cref(ra.key)) <
           std::make_tuple(sort_key(rb.keep_alive), cold_bytes(b) > 0, rb.last_used,
                           std::cref(rb.key));
  });
  return take_in_order(order, candidates, need);
}

}  // namespace residency
