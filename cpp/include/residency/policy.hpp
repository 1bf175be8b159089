#pragma once
/// Eviction policies: which idle models leave a device so that another can load.

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "residency/types.hpp"

namespace residency {

/// An idle, unpinned, ready model the policy may evict.
struct Candidate {
  const Reservation* reservation;
  const ModelStats* stats;
};

/// What must be freed on one device for the incoming model to fit.
struct EvictionNeed {
  const DeviceUsage* device;
  std::uint64_t bytes_to_free = 0;
  std::uint32_t slots_to_free = 0;
  Nanos now = 0;
};

/// A policy's answer for one device: indices into the candidates, and a cost to compare devices by.
struct VictimChoice {
  std::vector<std::size_t> victims;
  /// Lower is better; the resident set loads on the device whose choice costs least.
  double cost = 0.0;
};

/// Pluggable eviction. Called with the resident set's lock held, so implementations need no locking
/// of their own; they must be deterministic given their inputs (ties broken by a total order).
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  [[nodiscard]] virtual std::string_view name() const = 0;

  /// Victims among `candidates` that free at least `need.bytes_to_free` bytes and `need.slots_to_free`
  /// model slots; nullopt if even all of them would not.
  [[nodiscard]] virtual std::optional<VictimChoice> choose_victims(
      const std::vector<Candidate>& candidates, const EvictionNeed& need) = 0;

  /// Hooks for policies that learn; the defaults do nothing.
  virtual void on_request(const std::string& /*key*/, const ModelStats& /*stats*/, Nanos /*now*/) {}
  virtual void on_loaded(const Reservation& /*reservation*/, const ModelStats& /*stats*/) {}
  virtual void on_evicted(const Reservation& /*reservation*/, const ModelStats& /*stats*/) {}
};

/// Ollama's choice: idle models by configured keep-alive, shortest first, ties by name; taken in that
/// order until the incoming model fits. The baseline every other policy is measured against.
class OllamaPolicy final : public EvictionPolicy {
 public:
  [[nodiscard]] std::string_view name() const override { return "ollama"; }
  [[nodiscard]] std::optional<VictimChoice> choose_victims(const std::vector<Candidate>& candidates,
                                                           const EvictionNeed& need) override;
};

/// The policies selectable by name.
[[nodiscard]] std::vector<std::string> policy_names();
/// Makes a policy by name; throws InvalidArgument for an unknown name.
[[nodiscard]] std::unique_ptr<EvictionPolicy> make_policy(std::string_view name);

}  // namespace residency
