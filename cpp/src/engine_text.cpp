// Names and one-line descriptions of the engine's actions (for logs, journals and bindings).
#include "residency/engine.hpp"
#include "residency/errors.hpp"

namespace residency {

const char* to_string(ActionKind kind) {
  switch (kind) {
    case ActionKind::Grant: return "grant";
    case ActionKind::Load: return "load";
    case ActionKind::Stop: return "stop";
    case ActionKind::Estimate: return "estimate";
    case ActionKind::Reject: return "reject";
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
    case ActionKind::Estimate: break;
  }
  return s;
}

}  // namespace residency
