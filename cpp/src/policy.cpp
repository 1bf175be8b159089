#include "residency/policy.hpp"

#include <string>

#include "residency/errors.hpp"

namespace residency {

std::vector<std::string> policy_names() {
  return {"ollama", "gdsf", "tiered", "ollama+adaptive", "gdsf+adaptive", "tiered+adaptive"};
}

std::unique_ptr<EvictionPolicy> make_policy(std::string_view name) {
  if (name == "ollama") return std::make_unique<OllamaPolicy>();
  if (name == "gdsf") return std::make_unique<GdsfPolicy>();
  if (name == "tiered") return std::make_unique<TieredPolicy>();
  // "<eviction>+adaptive": that eviction policy with adaptive keep-alive around it.
  constexpr std::string_view kAdaptive = "+adaptive";
  if (name.size() > kAdaptive.size() && name.ends_with(kAdaptive)) {
    const std::string_view inner = name.substr(0, name.size() - kAdaptive.size());
    if (inner == "ollama" || inner == "gdsf" || inner == "tiered") {
      return std::make_unique<AdaptiveKeepAlive>(make_policy(inner));
    }
  }
  std::string known;
  for (const auto& n : policy_names()) known += (known.empty() ? "" : ", ") + n;
  throw InvalidArgument("unknown eviction policy '" + std::string(name) + "' (known: " + known + ")");
}

}  // namespace residency
