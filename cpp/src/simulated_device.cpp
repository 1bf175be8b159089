#include "residency/simulated_device.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <new>

namespace residency {

namespace {

constexpr std::uint64_t kMagic = 0x5245534944534D31ULL;  // "RESIDSM1"
constexpr std::uint32_t kVersion = 1;
constexpr std::uint32_t kCapacity = 1024;

enum SlotState : std::uint32_t { kEmpty = 0, kAllocated = 1, kReleasing = 2 };

struct Slot {
  std::uint64_t handle;
  std::uint64_t bytes;
  std::int32_t owner_pid;
  std::uint32_t state;
  /// The owner's start time (clock ticks since boot, /proc/PID/stat field 22): a reused pid differs.
  std::uint64_t owner_start;
  Nanos release_start_ns;
  Nanos release_end_ns;
};

Nanos monotonic_now() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<Nanos>(ts.tv_sec) * 1'000'000'000LL + ts.tv_nsec;
}

std::string errno_text() { return std::strerror(errno); }

/// State letter and start time of `pid` from /proc, or false when it has gone.
bool read_proc_stat(int pid, char& state, std::uint64_t& start) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::array<char, 1024> buf{};
  const ssize_t n = ::read(fd, buf.data(), buf.size() - 1);
  ::close(fd);
  if (n <= 0) return false;
  // The command name may contain spaces and parentheses: fields resume after the last ')'.
  const char* p = std::strrchr(buf.data(), ')');
  if (p == nullptr || p[1] == '\0') return false;
  p += 2;  // ") " -> field 3 (state)
  state = *p;
  for (int field = 3; field < 22; ++field) {  // advance to field 22 (starttime)
    p = std::strchr(p, ' ');
    if (p == nullptr) return false;
    ++p;
  }
  start = std::strtoull(p, nullptr, 10);
  return true;
}

std::uint64_t self_start() {
  static const std::uint64_t start = [] {
    char state = 0;
    std::uint64_t s = 0;
    read_proc_stat(static_cast<int>(::getpid()), state, s);
    return s;
  }();
  return start;
}

/// Whether the process that allocated a slot still runs. A zombie counts as dead: the kernel has
/// already torn down its memory (and a driver its VRAM) before its parent reaps it.
bool owner_alive(const Slot& slot) {
  if (slot.owner_pid == static_cast<std::int32_t>(::getpid())) return true;
  if (::kill(slot.owner_pid, 0) != 0 && errno == ESRCH) return false;
  char state = 0;
  std::uint64_t start = 0;
  if (!read_proc_stat(slot.owner_pid, state, start)) return false;
  return state != 'Z' && state != 'X' && start == slot.owner_start;
}

/// xorshift64*: enough randomness for lags, and its state fits in the shared mapping.
std::uint64_t next_random(std::uint64_t& s) {
  s ^= s >> 12;
  s ^= s << 25;
  s ^= s >> 27;
  return s * 0x2545F4914F6CDD1DULL;
}

}  // namespace

struct SimulatedDevice::State {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t capacity;
  /// Guards everything below it; process-shared and robust (a dead holder is recovered from).
  pthread_mutex_t mutex;
  std::uint64_t total_bytes;
  LagModel lag;
  std::uint64_t rng;
  std::uint64_t next_handle;
  std::uint64_t queries;
  /// Injected failures: > 0 the next n queries, < 0 every query, 0 none.
  std::int64_t fail_remaining;
  std::array<char, 256> fail_message;
  std::array<Slot, kCapacity> slots;
};

namespace {

/// Locks the shared mutex; recovers it when its previous holder died mid-operation.
class SharedLock {
 public:
  explicit SharedLock(pthread_mutex_t* m) : m_(m) {
    const int rc = pthread_mutex_lock(m_);
    if (rc == EOWNERDEAD) {
      pthread_mutex_consistent(m_);
    } else if (rc != 0) {
      throw ProbeError(std::string("simulated: cannot lock the device: ") + std::strerror(rc));
    }
  }
  ~SharedLock() { pthread_mutex_unlock(m_); }
  SharedLock(const SharedLock&) = delete;
  SharedLock& operator=(const SharedLock&) = delete;

 private:
  pthread_mutex_t* m_;
};

using State = SimulatedDevice::State;

/// Starts giving `slot` back at `now` under the lag model. Caller holds the state's mutex.
void begin_release_locked(State& s, Slot& slot, Nanos now) {
  slot.state = kReleasing;
  switch (s.lag.kind) {
    case LagKind::Fixed:
      slot.release_start_ns = slot.release_end_ns = now + s.lag.min_ns;
      break;
    case LagKind::Random: {
      const auto span = static_cast<std::uint64_t>(s.lag.max_ns - s.lag.min_ns);
      const Nanos lag =
          s.lag.min_ns + (span == 0 ? 0 : static_cast<Nanos>(next_random(s.rng) % (span + 1)));
      slot.release_start_ns = slot.release_end_ns = now + lag;
      break;
    }
    case LagKind::Gradual:
      slot.release_start_ns = now + s.lag.min_ns;
      slot.release_end_ns = now + s.lag.max_ns;
      break;
    case LagKind::Never:
      slot.release_start_ns = slot.release_end_ns = kNever;
      break;
  }
}

/// Reclaims dead owners' slots, retires fully returned ones, and returns the bytes not free at `now`.
std::uint64_t settle_locked(State& s, Nanos now) {
  std::uint64_t held = 0;
  for (Slot& slot : s.slots) {
    if (slot.state == kAllocated && !owner_alive(slot)) begin_release_locked(s, slot, now);
    if (slot.state == kAllocated) {
      held += slot.bytes;
    } else if (slot.state == kReleasing) {
      if (now >= slot.release_end_ns) {
        slot = Slot{};
      } else if (now < slot.release_start_ns) {
        held += slot.bytes;
      } else {
        // Gradual: the part not yet returned shrinks linearly over the window.
        const double left = static_cast<double>(slot.release_end_ns - now) /
                            static_cast<double>(slot.release_end_ns - slot.release_start_ns);
        held += static_cast<std::uint64_t>(static_cast<double>(slot.bytes) * left);
      }
    }
  }
  return held;
}

void validate(const LagModel& lag) {
  if (lag.min_ns < 0 || lag.max_ns < 0) throw InvalidArgument("lag must not be negative");
  if ((lag.kind == LagKind::Random || lag.kind == LagKind::Gradual) && lag.max_ns < lag.min_ns) {
    throw InvalidArgument("lag range must be (low, high) with low <= high");
  }
}

}  // namespace

SimulatedDevice::SimulatedDevice(std::string path, int fd, State* state)
    : path_(std::move(path)), fd_(fd), state_(state) {}

SimulatedDevice::~SimulatedDevice() {
  ::munmap(state_, sizeof(State));
  ::close(fd_);
}

std::shared_ptr<SimulatedDevice> SimulatedDevice::create(const std::string& path,
                                                         std::uint64_t total_bytes, LagModel lag,
                                                         std::uint64_t seed) {
  validate(lag);
  // Build the state in a temporary file and rename it into place: a concurrent open() sees either
  // no device or a complete one.
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw InvalidArgument("simulated device: cannot create " + tmp + ": " + errno_text());
  if (::ftruncate(fd, sizeof(State)) != 0) {
    const std::string why = errno_text();
    ::close(fd);
    ::unlink(tmp.c_str());
    throw InvalidArgument("simulated device: cannot size " + tmp + ": " + why);
  }
  void* mem = ::mmap(nullptr, sizeof(State), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mem == MAP_FAILED) {
    const std::string why = errno_text();
    ::close(fd);
    ::unlink(tmp.c_str());
    throw InvalidArgument("simulated device: cannot map " + tmp + ": " + why);
  }
  auto* s = new (mem) State{};
  s->magic = kMagic;
  s->version = kVersion;
  s->capacity = kCapacity;
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&s->mutex, &attr);
  pthread_mutexattr_destroy(&attr);
  s->total_bytes = total_bytes;
  s->lag = lag;
  s->rng = seed == 0 ? 0x9E3779B97F4A7C15ULL : seed;
  s->next_handle = 1;
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::munmap(mem, sizeof(State));
    ::close(fd);
    ::unlink(tmp.c_str());
    throw InvalidArgument("simulated device: cannot create " + path + ": " + why);
  }
  return std::shared_ptr<SimulatedDevice>(new SimulatedDevice(path, fd, s));
}

std::shared_ptr<SimulatedDevice> SimulatedDevice::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) throw ProbeUnavailable("simulated device " + path + ": " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) != sizeof(State)) {
    ::close(fd);
    throw ProbeUnavailable("simulated device " + path +
                           ": not a simulated device file (wrong size)");
  }
  void* mem = ::mmap(nullptr, sizeof(State), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mem == MAP_FAILED) {
    const std::string why = errno_text();
    ::close(fd);
    throw ProbeUnavailable("simulated device " + path + ": cannot map: " + why);
  }
  auto* s = static_cast<State*>(mem);
  if (s->magic != kMagic || s->version != kVersion || s->capacity != kCapacity) {
    ::munmap(mem, sizeof(State));
    ::close(fd);
    throw ProbeUnavailable("simulated device " + path +
                           ": not a simulated device file (bad header)");
  }
  return std::shared_ptr<SimulatedDevice>(new SimulatedDevice(path, fd, s));
}

std::string SimulatedDevice::device_name(int index) const {
  check_index(index);
  return "simulated device (" + path_ + ")";
}

MemoryInfo SimulatedDevice::query(int index) {
  check_index(index);
  SharedLock lock(&state_->mutex);
  ++state_->queries;
  if (state_->fail_remaining != 0) {
    if (state_->fail_remaining > 0) --state_->fail_remaining;
    throw ProbeError(std::string("simulated: ") + state_->fail_message.data());
  }
  const std::uint64_t held = settle_locked(*state_, monotonic_now());
  const std::uint64_t total = state_->total_bytes;
  return {held >= total ? 0 : total - held, total};
}

std::uint64_t SimulatedDevice::allocate(std::uint64_t bytes) {
  SharedLock lock(&state_->mutex);
  const std::uint64_t held = settle_locked(*state_, monotonic_now());
  const std::uint64_t free_now = held >= state_->total_bytes ? 0 : state_->total_bytes - held;
  if (bytes > free_now) {
    throw DeviceOutOfMemory("simulated device " + path_ + ": out of memory allocating " +
                            std::to_string(bytes) + " bytes (" + std::to_string(free_now) +
                            " free of " + std::to_string(state_->total_bytes) + ")");
  }
  for (Slot& slot : state_->slots) {
    if (slot.state != kEmpty) continue;
    slot.handle = state_->next_handle++;
    slot.bytes = bytes;
    slot.owner_pid = static_cast<std::int32_t>(::getpid());
    slot.owner_start = self_start();
    slot.state = kAllocated;
    slot.release_start_ns = slot.release_end_ns = kNever;
    return slot.handle;
  }
  throw DeviceOutOfMemory("simulated device " + path_ + ": all " + std::to_string(kCapacity) +
                          " allocation slots are in use");
}

void SimulatedDevice::free(std::uint64_t handle) {
  SharedLock lock(&state_->mutex);
  for (Slot& slot : state_->slots) {
    if (slot.handle == handle && slot.state == kAllocated) {
      begin_release_locked(*state_, slot, monotonic_now());
      return;
    }
  }
  throw InvalidArgument("simulated device " + path_ + ": handle " + std::to_string(handle) +
                        " is not allocated");
}

void SimulatedDevice::set_lag(LagModel lag) {
  validate(lag);
  SharedLock lock(&state_->mutex);
  state_->lag = lag;
}

LagModel SimulatedDevice::lag() const {
  SharedLock lock(&state_->mutex);
  return state_->lag;
}

void SimulatedDevice::fail_queries(std::int64_t count, const std::string& message) {
  SharedLock lock(&state_->mutex);
  state_->fail_remaining = count;
  const std::size_t n = std::min(message.size(), state_->fail_message.size() - 1);
  std::memcpy(state_->fail_message.data(), message.data(), n);
  state_->fail_message[n] = '\0';
}

std::vector<SimAllocation> SimulatedDevice::allocations() {
  SharedLock lock(&state_->mutex);
  settle_locked(*state_, monotonic_now());
  std::vector<SimAllocation> out;
  for (const Slot& slot : state_->slots) {
    if (slot.state == kEmpty) continue;
    out.push_back({slot.handle, slot.bytes, slot.owner_pid, slot.state == kReleasing,
                   slot.release_start_ns, slot.release_end_ns});
  }
  std::sort(out.begin(), out.end(),
            [](const SimAllocation& a, const SimAllocation& b) { return a.handle < b.handle; });
  return out;
}

std::uint64_t SimulatedDevice::total_bytes() const {
  SharedLock lock(&state_->mutex);
  return state_->total_bytes;
}

std::uint64_t SimulatedDevice::queries() const {
  SharedLock lock(&state_->mutex);
  return state_->queries;
}

}  // namespace residency
