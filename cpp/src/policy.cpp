#include "residency/policy.hpp"

#include <string>

#include "residency/errors.hpp"

namespace residency {

std::vector<std::string> policy_names() { return {"ollama"}; }

std::unique_ptr<EvictionPolicy> make_policy(std::string_view name) {
  if (name == "ollama") return std::make_unique<OllamaPolicy>();
  std::string known;
  for (const auto& n : policy_names()) known += (known.empty() ? "" : ", ") + n;
  throw InvalidArgument("unknown eviction policy '" + std::string(name) + "' (known: " + known + ")");
}

}  // namespace residency
