#pragma once
/// A scriptable device for tests and benchmarks: a file-backed (mmap) state shared across processes,
/// in which freed bytes come back late, as VRAM does after a CUDA process exits.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "residency/memory_probe.hpp"
#include "residency/types.hpp"

namespace residency {

/// An allocation does not fit in the memory the device shows free right now.
class DeviceOutOfMemory : public Error {
 public:
  using Error::Error;
};

/// How freed bytes come back.
enum class LagKind : std::uint32_t {
  Fixed,    ///< all at once, `min_ns` after the free
  Random,   ///< all at once, after a delay drawn uniformly from [min_ns, max_ns] for each free
  Gradual,  ///< linearly, starting `min_ns` after the free and complete `max_ns` after it
  Never,    ///< never (a stuck driver report)
};

struct LagModel {
  LagKind kind = LagKind::Fixed;
  Nanos min_ns = 0;
  Nanos max_ns = 0;
};

/// One allocation as the device holds it.
struct SimAllocation {
  std::uint64_t handle = 0;
  std::uint64_t bytes = 0;
  std::int32_t owner_pid = 0;
  /// Freed (explicitly, or because its owner died) and on its way back.
  bool releasing = false;
  /// CLOCK_MONOTONIC ns (Python's time.monotonic_ns()): the bytes start to come back, and are all back.
  Nanos release_start_ns = kNever;
  Nanos release_end_ns = kNever;
};

/// A simulated GPU with one device (index 0). Any number of processes may open the same file; every
/// operation takes a robust process-shared mutex inside the mapping, so a process killed mid-call
/// cannot wedge the others. Allocations whose owner process has died are freed when the device is
/// next probed (with the configured lag), as a driver reclaims a killed process's VRAM.
class SimulatedDevice final : public MemoryProbe {
 public:
  /// Writes a fresh device to `path` atomically (replacing any file there) and opens it.
  static std::shared_ptr<SimulatedDevice> create(const std::string& path,
                                                 std::uint64_t total_bytes, LagModel lag,
                                                 std::uint64_t seed);
  /// Opens a device another process created.
  static std::shared_ptr<SimulatedDevice> open(const std::string& path);

  ~SimulatedDevice() override;
  SimulatedDevice(const SimulatedDevice&) = delete;
  SimulatedDevice& operator=(const SimulatedDevice&) = delete;

  [[nodiscard]] std::string backend() const override { return "simulated"; }
  [[nodiscard]] int device_count() const override { return 1; }
  [[nodiscard]] std::string device_name(int index) const override;
  /// Free = total − allocated − bytes still on their way back. Throws the injected error, if any.
  MemoryInfo query(int index) override;

  /// Takes `bytes` for the calling process. Throws DeviceOutOfMemory when they are not free now.
  std::uint64_t allocate(std::uint64_t bytes);
  /// Starts giving the allocation back under the lag model. Throws InvalidArgument for a handle
  /// that is not allocated (unknown, or freed already).
  void free(std::uint64_t handle);
  /// Changes the lag for frees from now on.
  void set_lag(LagModel lag);
  [[nodiscard]] LagModel lag() const;
  /// The next `count` queries throw ProbeError(message); count < 0 fails every query until
  /// called again with count 0.
  void fail_queries(std::int64_t count, const std::string& message);
  /// Live and releasing allocations (reclaiming dead owners' first).
  std::vector<SimAllocation> allocations();
  [[nodiscard]] std::uint64_t total_bytes() const;
  /// Queries answered so far (by every process), injected failures included.
  [[nodiscard]] std::uint64_t queries() const;
  [[nodiscard]] const std::string& path() const { return path_; }

  struct State;  // the mapped layout (defined in the .cpp)

 private:
  SimulatedDevice(std::string path, int fd, State* state);

  std::string path_;
  int fd_ = -1;
  State* state_ = nullptr;
};

}  // namespace residency
