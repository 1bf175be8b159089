#include "residency/memory_probe.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace residency {

void MemoryProbe::check_index(int index) const {
  const int n = device_count();
  if (index < 0 || index >= n) {
    throw ProbeError("device index " + std::to_string(index) + " is out of range: the " +
                     backend() + " probe sees " + std::to_string(n) + " device(s)");
  }
}

namespace {

/// dlopen()s the first library in `candidates` that loads; returns nullptr and the reasons otherwise.
/// The handle is never closed: CUDA and NVML register exit handlers and do not like being unloaded.
void* open_first(const std::vector<std::string>& candidates, std::string& reasons) {
  for (const auto& path : candidates) {
    dlerror();
    if (void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) return handle;
    const char* why = dlerror();
    if (!reasons.empty()) reasons += "; ";
    reasons += why != nullptr ? why : path + ": failed to load";
  }
  return nullptr;
}

template <typename Fn>
Fn symbol(void* handle, const char* name, const std::string& library) {
  void* p = dlsym(handle, name);
  if (p == nullptr) throw ProbeUnavailable(library + " has no symbol " + name);
  return reinterpret_cast<Fn>(p);
}

// ---------------------------------------------------------------- cuda
// The runtime API's C signatures (cudaError_t is an int-sized enum; 0 is cudaSuccess).
using CudaGetDeviceCount = int (*)(int*);
using CudaGetDevice = int (*)(int*);
using CudaSetDevice = int (*)(int);
using CudaMemGetInfo = int (*)(std::size_t*, std::size_t*);
using CudaGetErrorString = const char* (*)(int);
using CudaGetDeviceProperties = int (*)(void*, int);

class CudaProbe final : public MemoryProbe {
 public:
  explicit CudaProbe(const std::vector<std::string>& libraries) {
    std::string reasons;
    void* lib = open_first(libraries, reasons);
    if (lib == nullptr) {
      throw ProbeUnavailable("cuda probe unavailable: libcudart could not be loaded (" +
                             (reasons.empty() ? std::string("no candidates") : reasons) + ")");
    }
    const std::string name = "libcudart";
    get_device_count_ = symbol<CudaGetDeviceCount>(lib, "cudaGetDeviceCount", name);
    get_device_ = symbol<CudaGetDevice>(lib, "cudaGetDevice", name);
    set_device_ = symbol<CudaSetDevice>(lib, "cudaSetDevice", name);
    mem_get_info_ = symbol<CudaMemGetInfo>(lib, "cudaMemGetInfo", name);
    error_string_ = symbol<CudaGetErrorString>(lib, "cudaGetErrorString", name);
    // CUDA 12 exports the _v2 entry point (the header maps the plain name onto it).
    get_properties_ = reinterpret_cast<CudaGetDeviceProperties>(
        dlsym(lib, "cudaGetDeviceProperties_v2"));
    if (get_properties_ == nullptr) {
      get_properties_ =
          reinterpret_cast<CudaGetDeviceProperties>(dlsym(lib, "cudaGetDeviceProperties"));
    }
    // cudaGetDeviceCount initialises the driver but creates no context.
    int count = 0;
    if (const int rc = get_device_count_(&count); rc != 0) {
      throw ProbeUnavailable("cuda probe unavailable: cudaGetDeviceCount failed: " + error(rc));
    }
    if (count <= 0) throw ProbeUnavailable("cuda probe unavailable: no CUDA device found");
    count_ = count;
    for (int i = 0; i < count_; ++i) names_.push_back(read_name(i));
  }

  [[nodiscard]] std::string backend() const override { return "cuda"; }
  [[nodiscard]] int device_count() const override { return count_; }
  [[nodiscard]] std::string device_name(int index) const override {
    check_index(index);
    return names_[static_cast<std::size_t>(index)];
  }

  MemoryInfo query(int index) override {
    check_index(index);
    // The current device is per thread: restore the caller's so a probe never disturbs its CUDA work.
    int previous = -1;
    const bool restore = get_device_(&previous) == 0 && previous != index;
    if (const int rc = set_device_(index); rc != 0) {
      throw ProbeError("cuda: cudaSetDevice(" + std::to_string(index) + ") failed: " + error(rc));
    }
    std::size_t free_bytes = 0;
    std::size_t total_bytes = 0;
    const int rc = mem_get_info_(&free_bytes, &total_bytes);
    if (restore) set_device_(previous);
    if (rc != 0) {
      throw ProbeError("cuda: cudaMemGetInfo on device " + std::to_string(index) +
                       " failed: " + error(rc));
    }
    return {free_bytes, total_bytes};
  }

 private:
  [[nodiscard]] std::string error(int rc) const {
    const char* s = error_string_(rc);
    return (s != nullptr ? std::string(s) : std::string("unknown error")) + " (code " +
           std::to_string(rc) + ")";
  }

  [[nodiscard]] std::string read_name(int index) const {
    // `name[256]` is the first member of cudaDeviceProp in every CUDA version; the struct itself
    // grows between versions, so a generous buffer stands in for it.
    if (get_properties_ != nullptr) {
      std::vector<char> props(16384, '\0');
      if (get_properties_(props.data(), index) == 0) {
        return {props.data(), strnlen(props.data(), 256)};
      }
    }
    return "CUDA device " + std::to_string(index);
  }

  CudaGetDeviceCount get_device_count_ = nullptr;
  CudaGetDevice get_device_ = nullptr;
  CudaSetDevice set_device_ = nullptr;
  CudaMemGetInfo mem_get_info_ = nullptr;
  CudaGetErrorString error_string_ = nullptr;
  CudaGetDeviceProperties get_properties_ = nullptr;
  int count_ = 0;
  std::vector<std::string> names_;
};

// ---------------------------------------------------------------- nvml
struct NvmlMemory {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
using NvmlDevice = void*;
using NvmlInit = int (*)();
using NvmlShutdown = int (*)();
using NvmlDeviceGetCount = int (*)(unsigned int*);
using NvmlDeviceGetHandleByIndex = int (*)(unsigned int, NvmlDevice*);
using NvmlDeviceGetMemoryInfo = int (*)(NvmlDevice, NvmlMemory*);
using NvmlDeviceGetName = int (*)(NvmlDevice, char*, unsigned int);
using NvmlErrorString = const char* (*)(int);

class NvmlProbe final : public MemoryProbe {
 public:
  explicit NvmlProbe(const std::vector<std::string>& libraries) {
    std::string reasons;
    void* lib = open_first(libraries, reasons);
    if (lib == nullptr) {
      throw ProbeUnavailable("nvml probe unavailable: libnvidia-ml could not be loaded (" +
                             (reasons.empty() ? std::string("no candidates") : reasons) + ")");
    }
    const std::string name = "libnvidia-ml";
    auto init = symbol<NvmlInit>(lib, "nvmlInit_v2", name);
    shutdown_ = symbol<NvmlShutdown>(lib, "nvmlShutdown", name);
    auto get_count = symbol<NvmlDeviceGetCount>(lib, "nvmlDeviceGetCount_v2", name);
    auto get_handle =
        symbol<NvmlDeviceGetHandleByIndex>(lib, "nvmlDeviceGetHandleByIndex_v2", name);
    get_memory_ = symbol<NvmlDeviceGetMemoryInfo>(lib, "nvmlDeviceGetMemoryInfo", name);
    auto get_name = symbol<NvmlDeviceGetName>(lib, "nvmlDeviceGetName", name);
    error_string_ = symbol<NvmlErrorString>(lib, "nvmlErrorString", name);

    if (const int rc = init(); rc != 0) {
      throw ProbeUnavailable("nvml probe unavailable: nvmlInit failed: " + error(rc));
    }
    unsigned int count = 0;
    if (const int rc = get_count(&count); rc != 0 || count == 0) {
      shutdown_();
      throw ProbeUnavailable(rc != 0 ? "nvml probe unavailable: nvmlDeviceGetCount failed: " +
                                           error(rc)
                                     : std::string("nvml probe unavailable: no NVIDIA device found"));
    }
    for (unsigned int i = 0; i < count; ++i) {
      NvmlDevice handle = nullptr;
      if (const int rc = get_handle(i, &handle); rc != 0) {
        shutdown_();
        throw ProbeUnavailable("nvml probe unavailable: nvmlDeviceGetHandleByIndex(" +
                               std::to_string(i) + ") failed: " + error(rc));
      }
      std::array<char, 96> buf{};
      std::string device = "NVIDIA device " + std::to_string(i);
      if (get_name(handle, buf.data(), static_cast<unsigned int>(buf.size())) == 0) {
        device.assign(buf.data(), strnlen(buf.data(), buf.size()));
      }
      handles_.push_back(handle);
      names_.push_back(std::move(device));
    }
  }
  ~NvmlProbe() override { shutdown_(); }
  NvmlProbe(const NvmlProbe&) = delete;
  NvmlProbe& operator=(const NvmlProbe&) = delete;

  [[nodiscard]] std::string backend() const override { return "nvml"; }
  [[nodiscard]] int device_count() const override { return static_cast<int>(handles_.size()); }
  [[nodiscard]] std::string device_name(int index) const override {
    check_index(index);
    return names_[static_cast<std::size_t>(index)];
  }

  MemoryInfo query(int index) override {
    check_index(index);
    NvmlMemory mem{};
    // NVML is thread-safe; handles stay valid until nvmlShutdown.
    if (const int rc = get_memory_(handles_[static_cast<std::size_t>(index)], &mem); rc != 0) {
      throw ProbeError("nvml: nvmlDeviceGetMemoryInfo on device " + std::to_string(index) +
                       " failed: " + error(rc));
    }
    return {mem.free, mem.total};
  }

 private:
  [[nodiscard]] std::string error(int rc) const {
    const char* s = error_string_(rc);
    return (s != nullptr ? std::string(s) : std::string("unknown error")) + " (code " +
           std::to_string(rc) + ")";
  }

  NvmlShutdown shutdown_ = nullptr;
  NvmlDeviceGetMemoryInfo get_memory_ = nullptr;
  NvmlErrorString error_string_ = nullptr;
  std::vector<NvmlDevice> handles_;
  std::vector<std::string> names_;
};

// ---------------------------------------------------------------- host
class HostProbe final : public MemoryProbe {
 public:
  explicit HostProbe(std::string path) : path_(std::move(path)) { query(0); }

  [[nodiscard]] std::string backend() const override { return "host"; }
  [[nodiscard]] int device_count() const override { return 1; }
  [[nodiscard]] std::string device_name(int index) const override {
    check_index(index);
    return "host memory";
  }

  MemoryInfo query(int index) override {
    check_index(index);
    // One read() of the whole file: /proc/meminfo is generated at open, ~1.5 KiB.
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw ProbeError("host: cannot open " + path_ + ": " + std::strerror(errno));
    std::array<char, 8192> buf{};
    std::size_t used = 0;
    while (used < buf.size() - 1) {
      const ssize_t n = ::read(fd, buf.data() + used, buf.size() - 1 - used);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      used += static_cast<std::size_t>(n);
    }
    ::close(fd);
    buf[used] = '\0';
    const long long total_kib = field(buf.data(), "MemTotal:");
    const long long available_kib = field(buf.data(), "MemAvailable:");
    if (total_kib < 0 || available_kib < 0) {
      throw ProbeError("host: " + path_ + " has no MemTotal/MemAvailable lines");
    }
    return {static_cast<std::uint64_t>(available_kib) * 1024U,
            static_cast<std::uint64_t>(total_kib) * 1024U};
  }

 private:
  /// The kB value of the line starting with `key`, or -1.
  static long long field(const char* text, const char* key) {
    const std::size_t key_len = std::strlen(key);
    for (const char* line = text; *line != '\0';) {
      if (std::strncmp(line, key, key_len) == 0) return std::strtoll(line + key_len, nullptr, 10);
      const char* next = std::strchr(line, '\n');
      if (next == nullptr) break;
      line = next + 1;
    }
    return -1;
  }

  std::string path_;
};

}  // namespace

std::shared_ptr<MemoryProbe> open_cuda_probe(const std::vector<std::string>& libraries) {
  return std::make_shared<CudaProbe>(libraries);
}

std::shared_ptr<MemoryProbe> open_nvml_probe(const std::vector<std::string>& libraries) {
  return std::make_shared<NvmlProbe>(libraries);
}

std::shared_ptr<MemoryProbe> open_host_probe(const std::string& meminfo_path) {
  return std::make_shared<HostProbe>(meminfo_path);
}

}  // namespace residency
