#pragma once
/// Host memory as a tier: which model files the host keeps warm in its page cache, within a budget.
///
/// Pure and clock-injected like the engine: the driver reports what happens to files (a load reads
/// one, a load must wait, a runner maps or unmaps one, what mincore measured) and carries out the
/// decisions returned — warm a file (read-ahead) or drop it (DONTNEED). A file's value is its
/// decayed use frequency: a warm file saves `bytes ÷ disk bandwidth` per reload and costs `bytes`
/// of RAM, so the saving per byte held is proportional to how often it is reloaded. Admission: a
/// file is kept warm only if the files it would displace are all used less often than it is; a
/// rarely used one is read around the cache (dropped after its load) instead of evicting better
/// ones. A file a runner maps is never dropped. Thread-safe.

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "residency/types.hpp"

namespace residency {

enum class HostActionKind : std::uint8_t {
  Warm,  ///< read `key`'s file into the page cache (prefetch or keep what a load reads)
  Drop,  ///< drop `key`'s file from the page cache
};

struct HostAction {
  HostActionKind kind = HostActionKind::Warm;
  std::string key;
  std::uint64_t bytes = 0;
};

class HostTier {
 public:
  /// `budget`: bytes of model files kept warm; `half_life`: how fast past uses stop counting.
  HostTier(std::uint64_t budget, Nanos half_life);

  /// A load reads `key`'s file (`bytes`) now: counts a use; keeps it warm if admitted, else (once
  /// it is unmapped) it is dropped. Returns the drops that make room.
  std::vector<HostAction> loaded(const std::string& key, std::uint64_t bytes, Nanos now);
  /// A load of `key` must wait (queue, victims draining): if admitted (on the uses counted so
  /// far; the load counts its own), warms the file now so the read overlaps the wait.
  std::vector<HostAction> waiting(const std::string& key, std::uint64_t bytes, Nanos now);
  /// A runner maps `key`'s file (true) or exited (false). Unmapping a file not kept drops it.
  std::vector<HostAction> mapped(const std::string& key, bool is_mapped, Nanos now);
  /// What mincore found warm of `key` (facts replace the tier's belief; never above the budget:
  /// a file not kept is dropped unless mapped).
  std::vector<HostAction> measured(const std::string& key, std::uint64_t warm_bytes, Nanos now);

  [[nodiscard]] bool kept(const std::string& key) const;
  [[nodiscard]] std::uint64_t warm_bytes(const std::string& key) const;
  /// Bytes of the files the tier keeps warm (≤ budget).
  [[nodiscard]] std::uint64_t kept_bytes() const;
  [[nodiscard]] std::uint64_t budget() const { return budget_; }
  [[nodiscard]] double frequency(const std::string& key, Nanos now) const;

 private:
  struct File {
    std::uint64_t bytes = 0;
    std::uint64_t warm = 0;  ///< bytes believed (or measured) in RAM
    double score = 0.0;      ///< decayed uses as of `at`
    Nanos at = 0;
    bool kept = false;
    bool mapped = false;
  };
  [[nodiscard]] double value_locked(const File& f, Nanos now) const;
  void use_locked(File& f, Nanos now);
  void resize_locked(File& f, std::uint64_t bytes);
  /// Keeps `key` warm if the budget (after dropping strictly less valuable files) allows.
  bool admit_locked(std::vector<HostAction>& out, const std::string& key, File& f, Nanos now);
  void release_locked(std::vector<HostAction>& out, const std::string& key, File& f);

  mutable std::mutex mutex_;
  std::uint64_t budget_;
  Nanos half_life_;
  std::uint64_t kept_bytes_ = 0;
  std::map<std::string, File> files_;  // ordered: deterministic victim ties
};

[[nodiscard]] const char* to_string(HostActionKind kind);

}  // namespace residency
