#pragma once
/// Eviction policies: which idle models leave a device so that another can load.

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
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

  /// How long `reservation` stays resident once it goes idle (its keep-alive clock starts at `now`).
  /// Consulted only for a positive configured keep-alive: the core honours 0 (unload when idle),
  /// forever (< 0) and pinning itself. A result < 0 means forever. The default is the configured one.
  [[nodiscard]] virtual Nanos keep_alive_for(const Reservation& reservation, Nanos /*now*/) const {
    return reservation.keep_alive;
  }

  /// Hooks for policies that learn; the defaults do nothing.
  /// A request acquired the model (loading or ready).
  virtual void on_request(const std::string& /*key*/, const ModelStats& /*stats*/, Nanos /*now*/) {}
  /// The model's last request finished: its refcount dropped to 0 at `now`.
  virtual void on_idle(const Reservation& /*reservation*/, const ModelStats& /*stats*/,
                       Nanos /*now*/) {}
  virtual void on_loaded(const Reservation& /*reservation*/, const ModelStats& /*stats*/) {}
  /// The model was chosen as a victim to make room for another (by admit).
  virtual void on_evicted(const Reservation& /*reservation*/, const ModelStats& /*stats*/) {}
  /// The model leaves for another reason: keep-alive expiry, explicit unload, a crashed runner.
  virtual void on_unloaded(const Reservation& /*reservation*/, const ModelStats& /*stats*/) {}
};

/// Ollama's choice: idle models by configured keep-alive, shortest first, ties by name; taken in that
/// order until the incoming model fits. The baseline every other policy is measured against.
class OllamaPolicy final : public EvictionPolicy {
 public:
  [[nodiscard]] std::string_view name() const override { return "ollama"; }
  [[nodiscard]] std::optional<VictimChoice> choose_victims(const std::vector<Candidate>& candidates,
                                                           const EvictionNeed& need) override;
};

/// Ollama's order made tier-aware: idle models by configured keep-alive (the operator's word comes
/// first, as in Ollama), then the cheapest to bring back first — the bytes a reload would read from
/// disk, i.e. the model's size less what the host tier holds warm of its file — then least recently
/// used, then name. Evicting a model whose file is warm in RAM costs a fast reload; evicting a cold
/// one costs a disk read.
class TieredPolicy final : public EvictionPolicy {
 public:
  [[nodiscard]] std::string_view name() const override { return "tiered"; }
  [[nodiscard]] std::optional<VictimChoice> choose_victims(const std::vector<Candidate>& candidates,
                                                           const EvictionNeed& need) override;
};

/// GreedyDual-Size-Frequency (Cherkasova 1998; FaasCache, ASPLOS 2021): each model's priority is
/// clock + frequency × load cost ÷ bytes, where frequency counts requests in its current residency and
/// clock is the clock value at its last request. The victims are the lowest-priority idle models,
/// pruned to a minimal set that still frees enough; evicting raises the clock to the highest victim
/// priority, so models that stopped being used age out. Keep-alive stays as configured.
class GdsfPolicy final : public EvictionPolicy {
 public:
  [[nodiscard]] std::string_view name() const override { return "gdsf"; }
  [[nodiscard]] std::optional<VictimChoice> choose_victims(const std::vector<Candidate>& candidates,
                                                           const EvictionNeed& need) override;
  void on_request(const std::string& key, const ModelStats& stats, Nanos now) override;
  void on_evicted(const Reservation& reservation, const ModelStats& stats) override;
  void on_unloaded(const Reservation& reservation, const ModelStats& stats) override;

  /// The priority `candidate` has now (for tests and diagnostics).
  [[nodiscard]] double priority(const Candidate& candidate) const;
  [[nodiscard]] double clock() const { return clock_; }

 private:
  struct Entry {
    double clock_at_access = 0.0;
    std::uint64_t frequency = 0;
  };
  double clock_ = 0.0;
  std::unordered_map<std::string, Entry> entries_;
};

/// Adaptive keep-alive (after "Serverless in the Wild", ATC 2020): a per-model histogram of idle
/// times (release to next request, whether or not the model stayed resident in between) replaces
/// the fixed keep-alive with about its 99th percentile plus a margin, bounded by `max_keep_alive`.
/// When no window up to the bound catches 99 % of the idle times, it keeps the model only as long as
/// the idle times that the bound can catch, instead of holding it for the whole bound in vain.
/// Falls back to the configured keep-alive until a model has `min_samples` idle times.
/// Wraps an eviction policy, whose choices it leaves alone.
struct AdaptiveKeepAliveOptions {
  double percentile = 0.99;
  std::uint32_t min_samples = 10;
  /// Window = quantile × (1 + margin_fraction) + margin.
  double margin_fraction = 0.10;
  Nanos margin = 2'000'000'000;
  Nanos max_keep_alive = Nanos{30} * 60 * 1'000'000'000;
  /// Each new idle time weighs 1/decay more than the previous one, so the histogram follows
  /// changing traffic (effective memory ≈ 1 / (1 − decay) idle times).
  double decay = 0.99;
};

class AdaptiveKeepAlive final : public EvictionPolicy {
 public:
  explicit AdaptiveKeepAlive(std::unique_ptr<EvictionPolicy> inner,
                             AdaptiveKeepAliveOptions options = {});
  [[nodiscard]] std::string_view name() const override { return name_; }
  [[nodiscard]] std::optional<VictimChoice> choose_victims(const std::vector<Candidate>& candidates,
                                                           const EvictionNeed& need) override {
    return inner_->choose_victims(candidates, need);
  }
  [[nodiscard]] Nanos keep_alive_for(const Reservation& reservation, Nanos now) const override;
  void on_request(const std::string& key, const ModelStats& stats, Nanos now) override;
  void on_idle(const Reservation& reservation, const ModelStats& stats, Nanos now) override;
  void on_loaded(const Reservation& reservation, const ModelStats& stats) override {
    inner_->on_loaded(reservation, stats);
  }
  void on_evicted(const Reservation& reservation, const ModelStats& stats) override {
    inner_->on_evicted(reservation, stats);
  }
  void on_unloaded(const Reservation& reservation, const ModelStats& stats) override {
    inner_->on_unloaded(reservation, stats);
  }

  /// Log-spaced buckets from 0.5 s up to 4 h, plus one for longer idle times.
  static constexpr std::size_t kBuckets = 48;

 private:
  struct History {
    std::array<double, kBuckets + 1> weight{};
    double total = 0.0;
    double increment = 1.0;
    std::uint64_t samples = 0;
    Nanos idle_since = -1;  ///< when the model last went idle; -1 while in use or never seen
  };
  void record(History& h, Nanos idle) const;

  std::unique_ptr<EvictionPolicy> inner_;
  AdaptiveKeepAliveOptions options_;
  std::string name_;
  std::unordered_map<std::string, History> history_;
};

/// The policies selectable by name.
[[nodiscard]] std::vector<std::string> policy_names();
/// Makes a policy by name ("ollama", "gdsf", or either + "+adaptive" for adaptive keep-alive);
/// throws InvalidArgument for an unknown name.
[[nodiscard]] std::unique_ptr<EvictionPolicy> make_policy(std::string_view name);

}  // namespace residency
