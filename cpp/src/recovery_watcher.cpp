#include "residency/recovery_watcher.hpp"

#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <optional>

namespace residency {

// ---------------------------------------------------------------- sinks

CompletionQueue::CompletionQueue() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (fd_ < 0) throw Error(std::string("cannot create an eventfd: ") + std::strerror(errno));
}

CompletionQueue::~CompletionQueue() { ::close(fd_); }

void CompletionQueue::complete(WatchId id, RecoveryResult result) noexcept {
  {
    std::lock_guard lock(mutex_);
    done_.emplace_back(id, std::move(result));
  }
  // Queue first, then signal: a reader woken by the fd always finds the result.
  const std::uint64_t one = 1;
  while (::write(fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

std::vector<std::pair<WatchId, RecoveryResult>> CompletionQueue::drain() {
  // Reset readiness before taking the results, so a result queued meanwhile signals again.
  std::uint64_t count = 0;
  while (::read(fd_, &count, sizeof count) < 0 && errno == EINTR) {
  }
  std::vector<std::pair<WatchId, RecoveryResult>> out;
  std::lock_guard lock(mutex_);
  out.swap(done_);
  return out;
}

void PromiseSink::complete(WatchId /*id*/, RecoveryResult result) noexcept {
  promise_.set_value(std::move(result));
}

// ---------------------------------------------------------------- watcher

RecoveryWatcher::RecoveryWatcher(PollSchedule schedule) : schedule_(schedule) {
  if (schedule_.initial_ns <= 0 || schedule_.max_ns < schedule_.initial_ns ||
      !(schedule_.growth >= 1.0) || !std::isfinite(schedule_.growth)) {
    throw InvalidArgument(
        "poll schedule needs 0 < initial <= max and a finite growth factor >= 1");
  }
}

RecoveryWatcher::~RecoveryWatcher() { stop(); }

Nanos RecoveryWatcher::now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

void RecoveryWatcher::start() {
  std::lock_guard life(lifecycle_mutex_);
  if (thread_.joinable()) return;
  {
    std::lock_guard lock(mutex_);
    stop_requested_ = false;
  }
  thread_ = std::thread([this] { run(); });
  std::lock_guard lock(mutex_);
  if (pthread_getcpuclockid(thread_.native_handle(), &cpu_clock_) == 0) thread_alive_ = true;
}

void RecoveryWatcher::stop() {
  std::lock_guard life(lifecycle_mutex_);
  if (!thread_.joinable()) return;
  {
    std::lock_guard lock(mutex_);
    stop_requested_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

bool RecoveryWatcher::running() const {
  std::lock_guard lock(mutex_);
  return thread_alive_ && !stop_requested_;
}

WatchId RecoveryWatcher::watch(WatchRequest request, std::shared_ptr<CompletionSink> sink) {
  if (!request.probe) throw InvalidArgument("watch needs a probe");
  if (!sink) throw InvalidArgument("watch needs a completion sink");
  if (request.timeout_ns < 0) throw InvalidArgument("timeout must not be negative");
  const int count = request.probe->device_count();
  if (request.device_index < 0 || request.device_index >= count) {
    throw InvalidArgument("device index " + std::to_string(request.device_index) +
                          " is out of range: the " + request.probe->backend() + " probe sees " +
                          std::to_string(count) + " device(s)");
  }
  WatchId id = 0;
  {
    std::lock_guard lock(mutex_);
    if (!thread_alive_ || stop_requested_) {
      throw InvalidState("the recovery watcher is not running: call start() first");
    }
    const Nanos now = now_ns();
    id = next_id_++;
    Watch w;
    w.request = std::move(request);
    w.sink = std::move(sink);
    w.started_ns = now;
    // Saturate: a huge timeout means "practically never".
    w.deadline_ns = w.request.timeout_ns > kNever - now ? kNever : now + w.request.timeout_ns;
    w.next_poll_ns = now;  // first poll at once: after a crash the memory is often back already
    w.interval_ns = schedule_.initial_ns;
    w.result.started_ns = now;
    watches_.emplace(id, std::move(w));
  }
  wake_.notify_one();
  return id;
}

bool RecoveryWatcher::cancel(WatchId id) {
  std::lock_guard lock(mutex_);
  return watches_.erase(id) > 0;
}

RecoveryResult RecoveryWatcher::wait(WatchRequest request) {
  auto sink = std::make_shared<PromiseSink>();
  auto done = sink->future();
  watch(std::move(request), sink);
  return done.get();
}

std::size_t RecoveryWatcher::pending() const {
  std::lock_guard lock(mutex_);
  return watches_.size();
}

std::uint64_t RecoveryWatcher::queries() const {
  std::lock_guard lock(mutex_);
  return queries_;
}

Nanos RecoveryWatcher::thread_cpu_ns() const {
  std::lock_guard lock(mutex_);
  Nanos total = cpu_ns_finished_runs_;
  // The thread clears thread_alive_ under this mutex before it exits, so its clock is valid here.
  timespec ts{};
  if (thread_alive_ && clock_gettime(cpu_clock_, &ts) == 0) {
    total += static_cast<Nanos>(ts.tv_sec) * 1'000'000'000LL + ts.tv_nsec;
  }
  return total;
}

namespace {

/// One query's outcome, shared by every due watch of that (probe, device).
struct Sample {
  MemoryProbe* probe = nullptr;
  int index = 0;
  std::optional<MemoryInfo> info;
  std::string error;
};

bool recovered(const WatchRequest& r, std::uint64_t free_bytes) {
  if (free_bytes >= r.needed) return true;
  if (free_bytes < r.free_before) return false;
  return static_cast<double>(free_bytes - r.free_before) >=
         kRecoveredFraction * static_cast<double>(r.expected_freed);
}

}  // namespace

void RecoveryWatcher::run() {
  std::vector<std::pair<std::shared_ptr<CompletionSink>, std::pair<WatchId, RecoveryResult>>> done;
  std::vector<WatchId> due;
  std::vector<Sample> samples;
  std::vector<std::shared_ptr<MemoryProbe>> keep_alive;

  std::unique_lock lock(mutex_);
  while (!stop_requested_) {
    if (watches_.empty()) {
      wake_.wait(lock, [this] { return stop_requested_ || !watches_.empty(); });
      continue;
    }
    Nanos next = kNever;
    for (const auto& [id, w] : watches_) next = std::min({next, w.next_poll_ns, w.deadline_ns});
    Nanos now = now_ns();
    if (next > now) {
      // A deadline, never a bare sleep: watch() and stop() notify, so both take effect at once.
      wake_.wait_until(lock, Clock::time_point(std::chrono::nanoseconds(next)));
      continue;
    }

    // Which (probe, device) pairs to query this round.
    due.clear();
    samples.clear();
    keep_alive.clear();
    for (const auto& [id, w] : watches_) {
      if (w.next_poll_ns > now && w.deadline_ns > now) continue;
      due.push_back(id);
      MemoryProbe* p = w.request.probe.get();
      const int index = w.request.device_index;
      if (std::none_of(samples.begin(), samples.end(),
                       [&](const Sample& s) { return s.probe == p && s.index == index; })) {
        samples.push_back({p, index, std::nullopt, {}});
        keep_alive.push_back(w.request.probe);  // a cancel meanwhile must not free the probe
      }
    }

    // Probe calls may be slow (a CUDA context on first use): make them without the lock, so
    // watch(), cancel() and the Python side never wait on a driver.
    lock.unlock();
    for (Sample& s : samples) {
      try {
        s.info = s.probe->query(s.index);
      } catch (const std::exception& e) {
        s.error = e.what();
      } catch (...) {
        s.error = "unknown error";
      }
    }
    lock.lock();
    queries_ += samples.size();
    now = now_ns();

    for (WatchId id : due) {
      auto it = watches_.find(id);
      if (it == watches_.end()) continue;  // cancelled while we probed
      Watch& w = it->second;
      const Sample& s = *std::find_if(samples.begin(), samples.end(), [&](const Sample& x) {
        return x.probe == w.request.probe.get() && x.index == w.request.device_index;
      });
      RecoveryResult& r = w.result;
      ++r.polls;
      bool finished = true;
      if (!s.info) {
        r.outcome = RecoveryOutcome::ProbeFailed;
        r.error = s.error;
      } else {
        r.last_free_bytes = s.info->free_bytes;
        if (recovered(w.request, s.info->free_bytes)) {
          r.outcome = RecoveryOutcome::Recovered;
        } else if (now >= w.deadline_ns) {
          r.outcome = RecoveryOutcome::TimedOut;
        } else {
          finished = false;
          if (w.interval_ns >= schedule_.max_ns) {
            // At the cap, poll on one clock-aligned grid: concurrent watches then share each
            // wake-up (a wake-up, not the probe call, is most of a poll's CPU cost).
            w.next_poll_ns = (now / schedule_.max_ns + 1) * schedule_.max_ns;
          } else {
            w.next_poll_ns = now + w.interval_ns;
            w.interval_ns = std::min(
                schedule_.max_ns,
                static_cast<Nanos>(static_cast<double>(w.interval_ns) * schedule_.growth));
          }
        }
      }
      if (finished) {
        r.completed_ns = now;
        r.elapsed_s = static_cast<double>(now - w.started_ns) / 1e9;
        done.push_back({std::move(w.sink), {id, std::move(r)}});
        watches_.erase(it);
      }
    }
    keep_alive.clear();

    if (!done.empty()) {
      // Sinks run without the lock: they take their own, and may be slow to wake a waiter.
      lock.unlock();
      for (auto& [sink, item] : done) sink->complete(item.first, std::move(item.second));
      done.clear();
      lock.lock();
    }
  }

  // Stopped: every pending watch completes as Stopped.
  const Nanos now = now_ns();
  for (auto& [id, w] : watches_) {
    RecoveryResult r = std::move(w.result);
    r.outcome = RecoveryOutcome::Stopped;
    r.error = "the recovery watcher stopped";
    r.completed_ns = now;
    r.elapsed_s = static_cast<double>(now - w.started_ns) / 1e9;
    done.push_back({std::move(w.sink), {id, std::move(r)}});
  }
  watches_.clear();
  timespec ts{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) {
    cpu_ns_finished_runs_ += static_cast<Nanos>(ts.tv_sec) * 1'000'000'000LL + ts.tv_nsec;
  }
  thread_alive_ = false;
  lock.unlock();
  for (auto& [sink, item] : done) sink->complete(item.first, std::move(item.second));
}

}  // namespace residency
