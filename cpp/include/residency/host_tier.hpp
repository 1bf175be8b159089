#pragma once
/// Host memory as a tier: which model files the host keeps warm in its page cache, within a budget.
///
/// Pure and clock-injected like the engine: the driver reports what happens to files (a load reads
/// one, a load must wait, a runner maps or unmaps one, what mincore measured) and carries out the
/// decisions returned — warm a file (read-ahead) or drop it (DONTNEED). A file's value is its
/// decayed use frequency: a warm file saves `bytes ÷ disk bandwidth` per reload and costs `bytes`
/// of RAM, so the saving per byte held is proportional to how often it is reloaded. Admission: a
/// file displaces only files used less often than it is; what the budget cannot hold of it then
/// is read around the cache (dropped after its load) instead of evicting better ones. Like the
/// kernel, the tier works in bytes, not whole files: a file may be kept in part (its first bytes),
/// and the least valuable file gives up only its tail when a little room is needed — whole-file
/// granularity left up to a file's worth of the budget empty and lost to the kernel's LRU in
/// bursty traffic (bench_policies). A file a runner maps is never dropped. Thread-safe.

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
  /// Warm: the file's first `bytes` are read. Drop: `bytes` leave RAM — all of the file beyond
  /// its first `keep` bytes (`keep` 0: the whole file).
  std::uint64_t bytes = 0;
  std::uint64_t keep = 0;
};

class HostTier {
 public:
  /// `budget`: bytes of model files kept warm; `half_life`: how fast past uses stop counting.
  HostTier(std::uint64_t budget, Nanos half_life);

  /// A load reads `key`'s file (`bytes`) now: counts a use; keeps it warm if admitted, else (once
  /// it is unmapped) it is dropped. Returns the drops that make room.
  std::vector<HostAction> loaded(const std::string& key, std::uint64_t bytes, Nanos now);
  /// A load of `key` must wait (queue, victims draining): warms its file now so the read overlaps
  /// the wait. Admitted whatever it displaces (least valuable first): the load will read it into
  /// RAM anyway, the prefetch only reads it sooner (frequency admission here lost ~12 % of the
  /// page-cache hits the kernel's LRU plus a prefetch gets in bursty traffic: bench_policies).
  std::vector<HostAction> waiting(const std::string& key, std::uint64_t bytes, Nanos now);
  /// A runner maps `key`'s file (true) or exited (false). Unmapping a file not kept drops it.
  std::vector<HostAction> mapped(const std::string& key, bool is_mapped, Nanos now);
  /// What mincore found warm of `key` (facts replace the tier's belief; never above the budget:
  /// a file not kept is dropped unless mapped).
  std::vector<HostAction> measured(const std::string& key, std::uint64_t warm_bytes, Nanos now);

  [[nodiscard]] bool kept(const std::string& key) const;
  /// Bytes of `key`'s file the tier keeps warm (its first ones; 0 when not kept).
  [[nodiscard]] std::uint64_t kept_of(const std::string& key) const;
  [[nodiscard]] std::uint64_t warm_bytes(const std::string& key) const;
  /// Bytes of the files the tier keeps warm (≤ budget).
  [[nodiscard]] std::uint64_t kept_bytes() const;
  [[nodiscard]] std::uint64_t budget() const { return budget_; }
  [[nodiscard]] double frequency(const std::string& key, Nanos now) const;

 private:
  struct File {
    std::uint64_t bytes = 0;
    std::uint64_t warm = 0;  ///< bytes believed (or measured) in RAM
    std::uint64_t kept = 0;  ///< bytes of it (the first ones) the budget holds for it
    double score = 0.0;      ///< decayed uses as of `at`
    Nanos at = 0;
    bool mapped = false;
  };
  [[nodiscard]] double value_locked(const File& f, Nanos now) const;
  void use_locked(File& f, Nanos now);
  void resize_locked(File& f, std::uint64_t bytes);
  /// Keeps as much of `key` as the budget holds after strictly less valuable files made room
  /// (whole files, the last one possibly only its tail; any file when `displace_any`, least
  /// valuable first). True when some of it is kept.
  bool admit_locked(std::vector<HostAction>& out, const std::string& key, File& f, Nanos now,
                    bool displace_any = false);
  /// Keeps only the first `keep` bytes of `key` (0: none); drops the rest unless it is mapped.
  void trim_locked(std::vector<HostAction>& out, const std::string& key, File& f,
                   std::uint64_t keep);

  mutable std::mutex mutex_;
  std::uint64_t budget_;
  Nanos half_life_;
  std::uint64_t kept_bytes_ = 0;
  std::map<std::string, File> files_;  // ordered: deterministic victim ties
};

[[nodiscard]] const char* to_string(HostActionKind kind);

}  // namespace residency
