#pragma once
/// Plain value types shared by the core: devices, reservations, admission decisions.

#include <cstdint>
#include <string>
#include <vector>

namespace residency {

/// Monotonic time or a duration, in nanoseconds. The core never reads a clock: callers pass `now`.
using Nanos = std::int64_t;

/// A keep-alive below zero keeps a model resident until it is evicted or unloaded explicitly.
inline constexpr Nanos kKeepForever = -1;
/// `expires_at` of a reservation that has no deadline (busy, pinned, or kept forever).
inline constexpr Nanos kNever = INT64_MAX;

/// A place models can be loaded into: a GPU, or the host when no GPU is found.
struct DeviceSpec {
  std::string id;
  std::uint64_t total_bytes = 0;
  /// Reserved for the driver, other processes and fragmentation; never handed out.
  std::uint64_t overhead_bytes = 0;
  /// More small models on one GPU stall it (Ollama's finding); 3 is its default.
  std::uint32_t max_models = 3;
};

/// A device's accounting as the core sees it now.
struct DeviceUsage {
  std::string id;
  std::uint64_t total_bytes = 0;
  std::uint64_t overhead_bytes = 0;
  std::uint32_t max_models = 0;
  /// total − overhead: what reservations may add up to.
  std::uint64_t budget_bytes = 0;
  /// Sum of the bytes promised to loading and ready models. Never exceeds budget_bytes.
  std::uint64_t reserved_bytes = 0;
  /// Bytes of models being unloaded: no longer promised, but not yet given back by the runner.
  std::uint64_t unloading_bytes = 0;
  /// Loading and ready models; never exceeds max_models.
  std::uint32_t models = 0;
};

enum class ReservationState : std::uint8_t {
  Loading,    ///< admitted, bytes reserved, runner not yet ready
  Ready,      ///< serving
  Unloading,  ///< chosen to leave; its bytes are no longer promised
};

/// The bytes the scheduler has promised to one resident model on one device, with its usage.
struct Reservation {
  std::string key;
  std::string device;
  ReservationState state = ReservationState::Loading;
  /// What the reservation counts against the budget: the estimate, until a measurement replaces it.
  std::uint64_t bytes = 0;
  std::uint64_t estimated_bytes = 0;
  bool measured = false;
  std::uint32_t refcount = 0;
  /// Configured keep-alive (ns): < 0 forever, 0 unload as soon as idle.
  Nanos keep_alive = 0;
  Nanos admitted_at = 0;
  Nanos loaded_at = 0;
  Nanos last_used = 0;
  /// When an idle model's keep-alive runs out; kNever while busy, pinned or kept forever.
  Nanos expires_at = kNever;
  /// Seconds the last load took (what a miss of this model costs).
  double load_seconds = 0.0;
  /// Requests served by this residency (acquires).
  std::uint64_t hits = 0;
  bool pinned = false;
};

/// What the core remembers of a model across residencies, for policies that learn.
struct ModelStats {
  std::uint64_t requests = 0;
  std::uint64_t loads = 0;
  double last_load_seconds = 0.0;
  std::uint64_t last_bytes = 0;
  Nanos last_used = 0;
  /// Bytes of the model's file the host tier reports warm in RAM (what a reload need not read
  /// from disk); kept up to date by the driver, read by tier-aware policies.
  std::uint64_t host_warm_bytes = 0;
};

enum class AdmitOutcome : std::uint8_t {
  Hit,       ///< already resident (loading or ready): acquire it
  Load,      ///< reserved on `device`; unload `victims` first (possibly none)
  Wait,      ///< fits only once busy or loading models go idle: retry after a release
  TooLarge,  ///< fits on no device even when empty (or only by evicting pinned models)
};

struct AdmitDecision {
  AdmitOutcome outcome = AdmitOutcome::TooLarge;
  std::string device;
  std::vector<std::string> victims;
  /// Bytes the victims give back on `device` (what the recovery watcher should see return).
  std::uint64_t freed_bytes = 0;
  /// Why, for Wait and TooLarge: a sentence fit for an error message.
  std::string reason;
};

}  // namespace residency
