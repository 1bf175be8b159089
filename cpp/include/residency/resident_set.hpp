#pragma once
/// The resident set: which models are loaded on which device with how many bytes, and what to evict.

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "residency/policy.hpp"
#include "residency/types.hpp"

namespace residency {

/// Owns every reservation. Pure and clock-injected: each call that depends on time takes `now`.
/// Thread-safe: every public method locks one mutex. Invariant after every call, for each device:
/// reserved_bytes ≤ budget_bytes and models ≤ max_models. Every failed call throws and changes nothing.
class ResidentSet {
 public:
  explicit ResidentSet(std::vector<DeviceSpec> devices,
                       std::unique_ptr<EvictionPolicy> policy = std::make_unique<OllamaPolicy>());
  ResidentSet(const ResidentSet&) = delete;
  ResidentSet& operator=(const ResidentSet&) = delete;

  void add_device(const DeviceSpec& spec);

  /// Decides how `key` becomes resident. Load reserves `bytes_needed` on the chosen device at once (in
  /// state Loading, refcount 0) and moves the victims to Unloading; the caller stops the victims, calls
  /// unloaded() for each, waits for the memory, starts the runner, then calls loaded(). Hit means the
  /// model is loading or ready: acquire() it. Wait and TooLarge change nothing.
  AdmitDecision admit(const std::string& key, std::uint64_t bytes_needed, Nanos now,
                      Nanos keep_alive);

  /// Loading → Ready. `measured_bytes` (when the runner reported it) replaces the estimate.
  void loaded(const std::string& key, Nanos now, double load_seconds,
              std::optional<std::uint64_t> measured_bytes = std::nullopt);
  /// One more request uses the model (loading or ready): it cannot be evicted or expire meanwhile.
  /// Returns how long a ready model sat idle before this request (0 if it was busy or loading).
  Nanos acquire(const std::string& key, Nanos now);
  /// One request is done. `keep_alive` (when given) replaces the model's; at refcount 0 the
  /// keep-alive clock starts: < 0 never expires, 0 expires now.
  void release(const std::string& key, Nanos now, std::optional<Nanos> keep_alive = std::nullopt);
  /// Idle ready models whose keep-alive has run out at `now`, soonest expiry first.
  [[nodiscard]] std::vector<std::string> expired(Nanos now) const;
  /// The earliest expires_at of any idle model, if one will expire.
  [[nodiscard]] std::optional<Nanos> next_expiry() const;
  /// Loading or Ready → Unloading; returns the bytes the device should get back. Refuses a model in
  /// use unless `force` (the runner died under its requests).
  std::uint64_t begin_unload(const std::string& key, bool force = false);
  /// Unloading → gone: the runner has exited.
  void unloaded(const std::string& key);
  /// The runner's real usage replaces the reservation's bytes. Throws BudgetExceeded if the device
  /// cannot hold it beside the others.
  void update_measured_bytes(const std::string& key, std::uint64_t bytes);
  /// A pinned model is never evicted and never expires.
  void set_pinned(const std::string& key, bool pinned, Nanos now);
  /// How many bytes of `key`'s file are warm in host RAM (the host tier's facts), for policies
  /// that weigh a victim's reload cost. Known for models never loaded too.
  void set_host_warm(const std::string& key, std::uint64_t bytes);

  [[nodiscard]] std::optional<Reservation> reservation(const std::string& key) const;
  [[nodiscard]] std::vector<Reservation> snapshot() const;
  [[nodiscard]] std::vector<DeviceUsage> devices() const;
  [[nodiscard]] std::optional<ModelStats> stats(const std::string& key) const;
  [[nodiscard]] std::string policy_name() const;

 private:
  struct DeviceState {
    DeviceSpec spec;
    std::uint64_t reserved = 0;
    std::uint64_t unloading = 0;
    std::uint32_t models = 0;
    [[nodiscard]] std::uint64_t budget() const { return spec.total_bytes - spec.overhead_bytes; }
  };

  /// A reservation with what the hot paths need without another lookup.
  struct Slot {
    Reservation r;
    std::size_t device;  ///< index into devices_
    ModelStats* stats;   ///< node in stats_ (unordered_map nodes never move)
  };

  Slot& find_locked(const std::string& key);
  const Slot& find_locked(const std::string& key) const;
  void add_device_locked(const DeviceSpec& spec);
  [[nodiscard]] DeviceUsage usage_locked(const DeviceState& d) const;
  void start_keep_alive_locked(Reservation& r, Nanos now) const;
  /// `evicted`: chosen as a victim by admit (else expired or unloaded by the caller).
  void move_to_unloading_locked(Slot& slot, bool evicted);

  /// Guards every field below.
  mutable std::mutex mutex_;
  std::vector<DeviceState> devices_;
  std::unordered_map<std::string, Slot> reservations_;
  std::unordered_map<std::string, ModelStats> stats_;
  std::unique_ptr<EvictionPolicy> policy_;
};

[[nodiscard]] const char* to_string(AdmitOutcome outcome);
[[nodiscard]] const char* to_string(ReservationState state);

}  // namespace residency
