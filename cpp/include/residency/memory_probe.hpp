#pragma once
/// Memory probes: free and total bytes of one device, read from CUDA, NVML, the host or a simulation.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "residency/errors.hpp"

namespace residency {

/// A probe could not read a device (driver error, index out of range, injected failure).
class ProbeError : public Error {
 public:
  using Error::Error;
};

/// The backend cannot be used on this machine at all (library missing, no device, no driver).
class ProbeUnavailable : public ProbeError {
 public:
  using ProbeError::ProbeError;
};

/// What a device reports right now.
struct MemoryInfo {
  std::uint64_t free_bytes = 0;
  std::uint64_t total_bytes = 0;
};

/// Free/total bytes of the devices one backend sees. Implementations are thread-safe: the recovery
/// watcher's thread and callers' threads query the same probe concurrently.
class MemoryProbe {
 public:
  MemoryProbe() = default;
  MemoryProbe(const MemoryProbe&) = delete;
  MemoryProbe& operator=(const MemoryProbe&) = delete;
  virtual ~MemoryProbe() = default;

  /// "cuda", "nvml", "host" or "simulated".
  [[nodiscard]] virtual std::string backend() const = 0;
  /// Devices seen when the probe was opened (fixed for its lifetime).
  [[nodiscard]] virtual int device_count() const = 0;
  /// A human-readable name ("NVIDIA H100 80GB HBM3", "host memory").
  [[nodiscard]] virtual std::string device_name(int index) const = 0;
  /// Reads the device now. Throws ProbeError with a message that names the backend and the cause.
  virtual MemoryInfo query(int index) = 0;

 protected:
  /// Throws ProbeError unless 0 ≤ index < device_count().
  void check_index(int index) const;
};

/// Opens the CUDA runtime by trying each path in `libraries` with dlopen (first that loads wins).
/// Throws ProbeUnavailable when none loads or the runtime sees no device. Note: the first query()
/// of a device creates a CUDA context in this process (hundreds of MiB of VRAM per GPU).
std::shared_ptr<MemoryProbe> open_cuda_probe(const std::vector<std::string>& libraries);

/// Opens NVML (libnvidia-ml) the same way. Needs no CUDA context, so it costs no VRAM.
std::shared_ptr<MemoryProbe> open_nvml_probe(const std::vector<std::string>& libraries);

/// The host's RAM as one device: MemTotal and MemAvailable from `meminfo_path`.
std::shared_ptr<MemoryProbe> open_host_probe(const std::string& meminfo_path = "/proc/meminfo");

}  // namespace residency
