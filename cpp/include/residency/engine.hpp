#pragma once
/// The scheduling engine: the request queue and every admission decision, as a pure state machine.
///
/// Sans-IO, like a protocol library: drivers (the asyncio server, the trace simulator) report events
/// — a request arrived, a runner is ready, a request is done, a runner is gone, a load failed, time
/// passed — and each event returns the actions to carry out: grant request R on model M, load M on
/// device D after stopping victims V, stop runner M, estimate R's bytes, reject R. The engine never
/// reads a clock, starts a process or sleeps; every call takes `now`.

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "residency/resident_set.hpp"

namespace residency {

/// How waiting requests are ordered.
enum class Discipline : std::uint8_t {
  /// Ollama's `server/sched.go`: ready models are served on a fast path at arrival; everything else
  /// waits in one FIFO queue processed one request at a time, with at most one load in flight.
  Ollama,
  /// Requests for a model that is ready or loading are granted at once; loads start in the order of
  /// the oldest waiting request (all its model's queued requests ride on that load), several at a
  /// time; once the oldest request has waited past the starvation deadline, nothing passes it.
  Affinity,
};

/// The options that decide a runner's memory: a runner serves any request whose shape it satisfies.
struct LoadShape {
  std::uint32_t ctx = 0;
  std::uint32_t parallel = 1;
  std::string kv_type = "f16";
  /// nullopt: automatic (any runner's layer split will do).
  std::optional<std::int32_t> gpu_layers;

  /// A larger context or more slots serve smaller requests without a reload.
  [[nodiscard]] bool satisfies(const LoadShape& want) const {
    return ctx >= want.ctx && parallel >= want.parallel && kv_type == want.kv_type &&
           (!want.gpu_layers || want.gpu_layers == gpu_layers);
  }
};

struct EngineOptions {
  Discipline discipline = Discipline::Affinity;
  /// Requests that may wait for a load at once, queued or joining one (a ready model's requests
  /// never count, as in Ollama); one more → Busy.
  std::uint32_t max_queue = 512;
  /// Affinity only: once the oldest waiting request has waited this long while busy models hold
  /// the room it needs, nothing passes it (new requests line up instead of keeping them busy).
  /// 0 = adaptive: the mean load time observed so far (kDefaultStarvation before the first load).
  Nanos starvation = 0;
  /// Keep a human-readable log of every action (for differential tests of two drivers).
  bool journal = false;
  /// A queued request still waiting this long is rejected (TimedOut); 0 = it waits as long as it
  /// takes. Requests granted on a loading model are bounded by the load's own timeout instead.
  Nanos queue_timeout = 0;
  /// Affinity only: loads in flight at once; 0 = no limit. Loads share the disk (two at once each
  /// take twice as long: one at a time serves the first sooner) and each reserves its memory from
  /// the start, evicting victims that could still serve, so one at a time (Ollama's rule) serves
  /// faster and holds less; riders, requests for ready models and prefetches still never wait.
  std::uint32_t max_loads = 0;
};

inline constexpr Nanos kDefaultStarvation = Nanos{10} * 1'000'000'000;

enum class ActionKind : std::uint8_t {
  Grant,     ///< `request` may use `key` (it holds a reference); wait for readiness if it is loading
  Load,      ///< start `key` on `device` for `request`'s shape, once `victims` have stopped
  Stop,      ///< stop `key`'s runner, then report gone()
  Estimate,  ///< `request` arrived without its bytes and needs a load: report sized()
  Reject,    ///< `request` cannot be served: `reason` (and `code`) say why
  /// `request` waits for `key`, which is not resident (queue, busy victims): its file may be read
  /// into host RAM now, so that the load it waits for reads memory instead of disk. Advisory.
  Prefetch,
};

enum class RejectCode : std::uint8_t {
  None,
  TooLarge,  ///< fits on no device even when empty
  Busy,      ///< the queue is full
  Failed,    ///< the load or the runner failed under the request
  TimedOut,  ///< it waited in the queue past the queue timeout
};

/// Why a Stop was decided (metrics count stops by it; the driver picks the grace period).
enum class StopCause : std::uint8_t {
  None,
  MakeRoom,  ///< a victim of a load
  Reload,    ///< resident with options that cannot serve a waiting request
  Expired,   ///< its keep-alive ran out
  Unload,    ///< asked to unload
  Failed,    ///< its load failed or its runner died
};

struct Action {
  ActionKind kind = ActionKind::Grant;
  std::uint64_t request = 0;
  std::string key;
  std::string device;
  /// Load: the models being stopped to make room (each also gets a Stop action).
  std::vector<std::string> victims;
  /// Load: bytes the victims give back on `device`; the bytes reserved for `key`.
  std::uint64_t freed_bytes = 0;
  std::uint64_t bytes = 0;
  /// Grant: the model was still loading (the request waits for the load and counts as cold).
  bool joined_load = false;
  /// Grant: how long the ready model sat idle before this request (0 if busy or loading).
  Nanos idle_for = 0;
  /// Stop: the model was chosen as a victim for a load (the driver may kill without grace).
  bool evicted = false;
  /// Stop: why.
  StopCause cause = StopCause::None;
  RejectCode code = RejectCode::None;
  std::string reason;
};

/// The queue and the resident set behind one mutex. Thread-safe; every call returns its actions.
class Engine {
 public:
  Engine(std::vector<DeviceSpec> devices, std::unique_ptr<EvictionPolicy> policy,
         EngineOptions options = {});
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// A request for `key`. `bytes_needed` 0 means not yet known: the engine asks for it (Estimate)
  /// only when the request needs a load. `keep_alive` is the model's keep-alive if this request loads
  /// it. Throws InvalidArgument for a reused id or an empty key.
  std::vector<Action> arrive(std::uint64_t request, const std::string& key, const LoadShape& shape,
                             std::uint64_t bytes_needed, Nanos keep_alive, Nanos now);
  /// The bytes an Estimate action asked for.
  std::vector<Action> sized(std::uint64_t request, std::uint64_t bytes_needed, Nanos now);
  /// The runner for `key` is ready; `measured_bytes` replaces the estimate when the device holds it.
  std::vector<Action> ready(const std::string& key, Nanos now, double load_seconds,
                            std::optional<std::uint64_t> measured_bytes = std::nullopt);
  /// A granted request finished; `keep_alive` (when given) replaces the model's.
  std::vector<Action> done(std::uint64_t request, Nanos now,
                           std::optional<Nanos> keep_alive = std::nullopt);
  /// A request gave up (client gone): leaves the queue, or releases its grant.
  std::vector<Action> cancel(std::uint64_t request, Nanos now);
  /// The runner of `key` has exited after a Stop (or a failure): its bytes are free again.
  std::vector<Action> gone(const std::string& key, Nanos now);
  /// The load of `key` failed, or its runner died: every request still granted on it is rejected
  /// (Failed) and the model leaves; the driver stops what is left of the runner, then calls gone().
  std::vector<Action> failed(const std::string& key, const std::string& reason, Nanos now);
  /// Unload `key` now if idle, else as soon as its last request is done. With `fresh`, new
  /// requests no longer join the runner: they wait for a fresh one (its configuration changed).
  std::vector<Action> unload(const std::string& key, Nanos now, bool fresh = false);
  /// Time passed: keep-alive expiries and starvation deadlines due at `now`.
  std::vector<Action> tick(Nanos now);

  /// The next instant tick() has work: a keep-alive expiry or a queued request's timeout.
  [[nodiscard]] std::optional<Nanos> next_deadline() const;
  /// The shape the resident `key` was loaded with.
  [[nodiscard]] std::optional<LoadShape> shape(const std::string& key) const;
  /// Requests waiting: queued, or granted on a model still loading.
  [[nodiscard]] std::size_t queued() const;
  /// How long the oldest queued request has waited at `now` (0 when none waits).
  [[nodiscard]] Nanos oldest_wait(Nanos now) const;
  [[nodiscard]] std::size_t loads_in_flight() const;
  [[nodiscard]] Nanos starvation_deadline() const;
  /// The oldest waiting request if it waits for busy models to go idle (else 0): once it is past
  /// the starvation deadline, affinity grants nothing that would pass it.
  [[nodiscard]] std::uint64_t blocked_head() const;
  [[nodiscard]] std::vector<std::string> journal() const;
  [[nodiscard]] Discipline discipline() const { return options_.discipline; }
  [[nodiscard]] ResidentSet& resident_set() { return set_; }

 private:
  enum class Phase : std::uint8_t { Queued, Granted };
  struct Request {
    std::uint64_t id = 0;
    std::string key;
    LoadShape shape;
    std::uint64_t bytes = 0;
    Nanos keep_alive = 0;
    Nanos arrival = 0;
    Phase phase = Phase::Queued;
    /// Granted while its model was loading, and the load is not done yet.
    bool joining = false;
  };
  /// What the engine adds to the resident set's reservation of a model.
  struct Resident {
    LoadShape shape;
    bool loading = true;
    bool unload_when_idle = false;
    /// Serves only the requests it already has (unload(fresh)): newcomers wait for a new runner.
    bool retiring = false;
    std::unordered_set<std::uint64_t> granted;
  };
  using Order = std::pair<Nanos, std::uint64_t>;  // (arrival, id): FIFO with a total order

  void emit_locked(std::vector<Action>& out, Action action, Nanos now);
  /// `request` still waits for a model that is neither loading nor ready, and is its first waiter:
  /// emits Prefetch, so that its file is read into host RAM during the wait.
  void prefetch_if_waiting_locked(std::vector<Action>& out, std::uint64_t request, Nanos now);
  void grant_locked(std::vector<Action>& out, Request& r, Nanos now);
  void reject_locked(std::vector<Action>& out, Request& r, RejectCode code,
                     const std::string& reason, Nanos now);
  void dequeue_locked(const Request& r);
  /// `r` no longer waits for its model's load (it is ready, or `r` is done or rejected).
  void unjoin_locked(Request& r);
  /// Moves `key` to Unloading and emits its Stop; requests still granted on it are rejected.
  void stop_locked(std::vector<Action>& out, const std::string& key, StopCause cause,
                   const std::string& why, Nanos now);
  /// Grants queued requests that can ride on a resident model, then starts loads in FIFO order.
  void schedule_locked(std::vector<Action>& out, Nanos now);
  void grant_riders_locked(std::vector<Action>& out, const std::string& key, Nanos now);
  /// Works on the oldest waiting request; false when it must keep waiting (nothing behind it loads).
  bool serve_head_locked(std::vector<Action>& out, Request& head, Nanos now);
  void expire_locked(std::vector<Action>& out, Nanos now);
  /// Rejects the queued requests that waited past the queue timeout.
  void time_out_locked(std::vector<Action>& out, Nanos now);
  void release_locked(std::vector<Action>& out, Request& r, Nanos now,
                      std::optional<Nanos> keep_alive);
  /// A compatible, not-unloading resident model `r` may use now (ignoring the queue).
  [[nodiscard]] bool servable_locked(const Request& r) const;
  [[nodiscard]] bool head_overdue_locked(Nanos now) const;
  [[nodiscard]] Nanos starvation_locked() const;

  /// Guards every field below (the resident set has its own lock, always taken after this one).
  mutable std::mutex mutex_;
  ResidentSet set_;
  EngineOptions options_;
  std::unordered_map<std::uint64_t, Request> requests_;
  std::set<Order> queue_;
  std::unordered_map<std::string, std::set<Order>> queue_by_model_;
  std::unordered_map<std::string, Resident> residents_;
  std::size_t loads_in_flight_ = 0;
  /// The last head found waiting for busy models (Wait, or a reload of a busy runner).
  std::uint64_t blocked_head_ = 0;
  /// Affinity held back a grant for an overdue head: queued requests may ride once it is served.
  bool held_back_ = false;
  /// Granted requests whose model is still loading (they wait as the queued ones do).
  std::size_t joining_ = 0;
  double load_seconds_sum_ = 0.0;
  std::uint64_t loads_done_ = 0;
  std::vector<std::string> journal_;
};

[[nodiscard]] const char* to_string(ActionKind kind);
[[nodiscard]] const char* to_string(Discipline discipline);
[[nodiscard]] std::string describe(const Action& action);
/// "ollama" or "affinity"; throws InvalidArgument otherwise.
[[nodiscard]] Discipline discipline_from(const std::string& name);

}  // namespace residency
