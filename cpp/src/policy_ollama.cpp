#include <algorithm>
#include <limits>
#include <numeric>

#include "residency/policy.hpp"

namespace residency {

namespace {
// Ollama sorts by the configured keep-alive; "forever" (negative) sorts last.
Nanos sort_key(Nanos keep_alive) {
  return keep_alive < 0 ? std::numeric_limits<Nanos>::max() : keep_alive;
}
}  // namespace

std::optional<VictimChoice> OllamaPolicy::choose_victims(const std::vector<Candidate>& candidates,
                                                         const EvictionNeed& need) {
  std::vector<std::size_t> order(candidates.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const Reservation& ra = *candidates[a].reservation;
    const Reservation& rb = *candidates[b].reservation;
    const Nanos ka = sort_key(ra.keep_alive);
    const Nanos kb = sort_key(rb.keep_alive);
    if (ka != kb) return ka < kb;
    return ra.key < rb.key;
  });

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

}  // namespace residency
