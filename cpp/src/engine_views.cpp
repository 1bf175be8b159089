// Read-only views of the engine: its queries, and names and one-line descriptions of its
// actions (for logs, journals and bindings).
#include "residency/engine.hpp"
#include "residency/errors.hpp"

namespace residency {

// ---- queries -----------------------------------------------------------------------------------

std::optional<Nanos> Engine::next_deadline() const {
  std::lock_guard lock(mutex_);
  // Starvation deadlines need no wake-up of their own: passing one changes only what later events
  // decide, never what must happen at that instant. A queue timeout must happen then.
  std::optional<Nanos> next = set_.next_expiry();
  if (options_.queue_timeout > 0 && !queue_.empty()) {
    const Nanos due = queue_.begin()->first + options_.queue_timeout;
    if (!next || due < *next) next = due;
  }
  return next;
}

Nanos Engine::oldest_wait(Nanos now) const {
  std::lock_guard lock(mutex_);
  return queue_.empty() ? 0 : now - queue_.begin()->first;
}

std::optional<LoadShape> Engine::shape(const std::string& key) const {
  std::lock_guard lock(mutex_);
  auto it = residents_.find(key);
  if (it == residents_.end()) return std::nullopt;
  return it->second.shape;
}

std::size_t Engine::queued() const {
  std::lock_guard lock(mutex_);
  return queue_.size() + joining_;
}

std::size_t Engine::loads_in_flight() const {
  std::lock_guard lock(mutex_);
  return loads_in_flight_;
}

Nanos Engine::starvation_deadline() const {
  std::lock_guard lock(mutex_);
  return starvation_locked();
}

std::vector<std::string> Engine::journal() const {
  std::lock_guard lock(mutex_);
  return journal_;
}

std::uint64_t Engine::blocked_head() const {
  std::lock_guard lock(mutex_);
  if (queue_.empty() || queue_.begin()->second != blocked_head_) return 0;
  return blocked_head_;
}

// ---- names ------------------------------------------------------------------------------------

const char* to_string(ActionKind kind) {
  switch (kind) {
    case ActionKind::Grant: return "grant";
    case ActionKind::Load: return "load";
    case ActionKind::Stop: return "stop";
    case ActionKind::Estimate: return "estimate";
    case ActionKind::Reject: return "reject";
    case ActionKind::Prefetch: return "prefetch";
  }
  return "?";
}

const char* to_string(Discipline discipline) {
  switch (discipline) {
    case Discipline::Ollama: return "ollama";
    case Discipline::Affinity: return "affinity";
  }
  return "?";
}

Discipline discipline_from(const std::string& name) {
  if (name == "ollama") return Discipline::Ollama;
  if (name == "affinity") return Discipline::Affinity;
  throw InvalidArgument("unknown queue discipline '" + name + "'; known: affinity, ollama");
}

std::string describe(const Action& a) {
  std::string s = to_string(a.kind);
  if (a.kind != ActionKind::Stop) s += " r" + std::to_string(a.request);
  s += " " + a.key;
  switch (a.kind) {
    case ActionKind::Grant:
      if (a.joined_load) s += " joining its load";
      break;
    case ActionKind::Load:
      s += " on " + a.device + " (" + std::to_string(a.bytes) + " bytes";
      for (const auto& v : a.victims) s += ", after " + v;
      s += ")";
      break;
    case ActionKind::Stop:
    case ActionKind::Reject: s += ": " + a.reason; break;
    case ActionKind::Estimate:
    case ActionKind::Prefetch: break;
  }
  return s;
}

}  // namespace residency
