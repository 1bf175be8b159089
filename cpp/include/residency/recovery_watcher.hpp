#pragma once
/// The recovery watcher: one thread that polls memory probes until freed memory shows up again.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <ctime>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "residency/memory_probe.hpp"
#include "residency/types.hpp"

namespace residency {

enum class RecoveryOutcome : std::uint8_t {
  Recovered,    ///< the device shows enough memory
  TimedOut,     ///< it did not within the timeout: the caller trusts its own numbers (as Ollama does)
  ProbeFailed,  ///< the probe threw; `error` says why
  Stopped,      ///< the watcher stopped (or was destroyed) while the watch was pending
};

/// Ollama's rule: a device has recovered once it shows 75 % of the expected freed bytes again.
inline constexpr double kRecoveredFraction = 0.75;

struct RecoveryResult {
  RecoveryOutcome outcome = RecoveryOutcome::Stopped;
  /// From watch() to completion.
  double elapsed_s = 0.0;
  /// Probe queries made for this watch.
  std::uint32_t polls = 0;
  /// Free bytes at the last successful poll (0 when none succeeded).
  std::uint64_t last_free_bytes = 0;
  /// The probe's error message for ProbeFailed; empty otherwise.
  std::string error;
  /// CLOCK_MONOTONIC ns (steady_clock): when the watch began and when the watcher completed it.
  Nanos started_ns = 0;
  Nanos completed_ns = 0;
};

/// What to watch: one device of one probe, and the numbers that decide recovery.
struct WatchRequest {
  std::shared_ptr<MemoryProbe> probe;
  int device_index = 0;
  /// Free bytes measured before the victims were stopped.
  std::uint64_t free_before = 0;
  /// Bytes the victims held: Recovered once free − free_before ≥ 75 % of this.
  std::uint64_t expected_freed = 0;
  /// Bytes the pending load needs: Recovered as soon as free ≥ this (crash: no wait at all).
  std::uint64_t needed = 0;
  Nanos timeout_ns = 5'000'000'000LL;
};

/// How often a watch polls: immediately, then `initial_ns` later, each gap `growth` times the last,
/// never more than `max_ns` (at the cap, on a grid shared by all watches). Recovery takes 0.5–1.5 s,
/// so a watch spends nearly all its life at the cap: detection delay is uniform in [0, max_ns] and
/// the CPU cost is one wake-up per max_ns — on a 2-vCPU VM a wake-up costs ~45 µs, so 6 ms is ~0.8 %
/// of a core with a p50 delay of ~3–4 ms (benchmarks/bench_recovery.py --sweep measures the curve).
struct PollSchedule {
  Nanos initial_ns = 1'000'000;
  double growth = 1.5;
  Nanos max_ns = 6'000'000;
};

using WatchId = std::uint64_t;

/// Receives completed watches, on the watcher's thread. Must be quick and must not throw or call
/// back into the watcher.
class CompletionSink {
 public:
  CompletionSink() = default;
  CompletionSink(const CompletionSink&) = delete;
  CompletionSink& operator=(const CompletionSink&) = delete;
  virtual ~CompletionSink() = default;
  virtual void complete(WatchId id, RecoveryResult result) noexcept = 0;
};

/// A sink an event loop can watch: completed results queue up and an eventfd becomes readable.
/// (Python's asyncio registers fd() with loop.add_reader and calls drain() — the watcher thread
/// itself never touches Python.)
class CompletionQueue final : public CompletionSink {
 public:
  CompletionQueue();
  ~CompletionQueue() override;
  [[nodiscard]] int fd() const { return fd_; }
  void complete(WatchId id, RecoveryResult result) noexcept override;
  /// Takes every queued result and resets the fd's readiness.
  std::vector<std::pair<WatchId, RecoveryResult>> drain();

 private:
  int fd_ = -1;
  /// Guards done_.
  std::mutex mutex_;
  std::vector<std::pair<WatchId, RecoveryResult>> done_;
};

/// A sink for one blocking caller.
class PromiseSink final : public CompletionSink {
 public:
  void complete(WatchId id, RecoveryResult result) noexcept override;
  std::future<RecoveryResult> future() { return promise_.get_future(); }

 private:
  std::promise<RecoveryResult> promise_;
};

/// One dedicated thread serving any number of concurrent watches. Each round it queries every
/// (probe, device) that some due watch needs once, evaluates those watches, and sleeps on a
/// condition variable until the next poll or deadline, so stop() and new watches wake it at once.
/// Watches of one device share each query. The thread never touches Python objects.
class RecoveryWatcher {
 public:
  explicit RecoveryWatcher(PollSchedule schedule = {});
  /// Calls stop().
  ~RecoveryWatcher();
  RecoveryWatcher(const RecoveryWatcher&) = delete;
  RecoveryWatcher& operator=(const RecoveryWatcher&) = delete;
  RecoveryWatcher(RecoveryWatcher&&) = delete;
  RecoveryWatcher& operator=(RecoveryWatcher&&) = delete;

  /// Starts the thread; does nothing when it runs. A stopped watcher may be started again.
  void start();
  /// Stops and joins the thread; pending watches complete as Stopped. Idempotent; returns as soon as
  /// an in-flight probe call returns. Must not be called from a sink.
  void stop();
  [[nodiscard]] bool running() const;

  /// Begins a watch; `sink` receives its result exactly once (unless cancelled). The first poll
  /// happens at once. Throws InvalidArgument for a bad request, InvalidState when not running.
  WatchId watch(WatchRequest request, std::shared_ptr<CompletionSink> sink);
  /// Forgets a pending watch without completing it. False when it already completed.
  bool cancel(WatchId id);
  /// Blocks until the watch completes.
  RecoveryResult wait(WatchRequest request);

  [[nodiscard]] std::size_t pending() const;
  /// Probe queries made since construction.
  [[nodiscard]] std::uint64_t queries() const;
  /// CPU time the watcher thread has used (every run since construction), in ns.
  [[nodiscard]] Nanos thread_cpu_ns() const;
  [[nodiscard]] const PollSchedule& schedule() const { return schedule_; }

 private:
  struct Watch {
    WatchRequest request;
    std::shared_ptr<CompletionSink> sink;
    Nanos started_ns = 0;
    Nanos deadline_ns = 0;
    Nanos next_poll_ns = 0;
    Nanos interval_ns = 0;
    RecoveryResult result;
  };
  using Clock = std::chrono::steady_clock;

  void run();
  static Nanos now_ns();

  const PollSchedule schedule_;
  /// Guards everything below; the thread waits on wake_ with it.
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::map<WatchId, Watch> watches_;
  WatchId next_id_ = 1;
  bool stop_requested_ = false;
  bool thread_alive_ = false;
  std::uint64_t queries_ = 0;
  clockid_t cpu_clock_{};
  Nanos cpu_ns_finished_runs_ = 0;
  /// Guards thread_: serialises start() and stop() (never taken by the watcher thread).
  std::mutex lifecycle_mutex_;
  std::thread thread_;
};

}  // namespace residency
