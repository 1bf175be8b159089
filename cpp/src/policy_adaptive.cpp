#include <algorithm>
#include <cmath>

#include "residency/errors.hpp"
#include "residency/policy.hpp"

namespace residency {

namespace {

constexpr double kFirstEdge = 0.5e9;              // 0.5 s
constexpr double kLastEdge = 4.0 * 3600.0 * 1e9;  // 4 h
// Upper edges grow by a constant factor (≈ 24 %), so the window's rounding error is relative.
const double kGrowth =
    std::pow(kLastEdge / kFirstEdge, 1.0 / static_cast<double>(AdaptiveKeepAlive::kBuckets - 1));

double upper_edge(std::size_t bucket) {
  return kFirstEdge * std::pow(kGrowth, static_cast<double>(bucket));
}

std::size_t bucket_of(Nanos idle) {
  const double x = static_cast<double>(idle);
  if (x <= kFirstEdge) return 0;
  if (x > kLastEdge) return AdaptiveKeepAlive::kBuckets;  // beyond the range
  auto b = static_cast<std::size_t>(std::ceil(std::log(x / kFirstEdge) / std::log(kGrowth)));
  // Guard against rounding at the edges.
  while (b > 0 && x <= upper_edge(b - 1)) --b;
  while (b < AdaptiveKeepAlive::kBuckets - 1 && x > upper_edge(b)) ++b;
  return b;
}

}  // namespace

AdaptiveKeepAlive::AdaptiveKeepAlive(std::unique_ptr<EvictionPolicy> inner,
                                     AdaptiveKeepAliveOptions options)
    : inner_(std::move(inner)), options_(options) {
  if (!inner_) throw InvalidArgument("adaptive keep-alive needs an eviction policy to wrap");
  if (!(options_.percentile > 0.0 && options_.percentile <= 1.0)) {
    throw InvalidArgument("adaptive keep-alive percentile must be in (0, 1]");
  }
  if (!(options_.decay > 0.0 && options_.decay <= 1.0)) {
    throw InvalidArgument("adaptive keep-alive decay must be in (0, 1]");
  }
  if (options_.max_keep_alive <= 0 || options_.margin < 0 || options_.margin_fraction < 0.0) {
    throw InvalidArgument("adaptive keep-alive bounds must be positive");
  }
  name_ = std::string(inner_->name()) + "+adaptive";
}

void AdaptiveKeepAlive::record(History& h, Nanos idle) const {
  // Rather than scale every old weight down, scale the new one up; renormalise before it overflows.
  h.weight[bucket_of(idle)] += h.increment;
  h.total += h.increment;
  ++h.samples;
  h.increment /= options_.decay;
  if (h.increment > 1e100) {
    for (double& w : h.weight) w /= h.increment;
    h.total /= h.increment;
    h.increment = 1.0;
  }
}

void AdaptiveKeepAlive::on_request(const std::string& key, const ModelStats& stats, Nanos now) {
  History& h = history_[key];
  // The first request after the model went idle ends an idle period, resident or not meanwhile.
  if (h.idle_since >= 0) {
    record(h, std::max<Nanos>(now - h.idle_since, 0));
    h.idle_since = -1;
  }
  inner_->on_request(key, stats, now);
}

void AdaptiveKeepAlive::on_idle(const Reservation& reservation, const ModelStats& stats,
                                Nanos now) {
  history_[reservation.key].idle_since = now;
  inner_->on_idle(reservation, stats, now);
}

Nanos AdaptiveKeepAlive::keep_alive_for(const Reservation& reservation, Nanos now) const {
  const Nanos configured = inner_->keep_alive_for(reservation, now);
  const auto it = history_.find(reservation.key);
  if (configured <= 0 || it == history_.end() || it->second.samples < options_.min_samples) {
    return configured;  // not representative yet
  }
  const History& h = it->second;
  const double max_ka = static_cast<double>(options_.max_keep_alive);
  // Share of idle times that any window within the bound could catch (whole buckets only).
  double reach = 0.0;
  for (std::size_t b = 0; b < kBuckets && upper_edge(b) <= max_ka; ++b) reach += h.weight[b];
  // Aim for the percentile, but no higher than the bound can reach: holding a model for the
  // whole bound to catch idle times longer than it would only waste memory.
  const double target = std::min(options_.percentile * h.total, reach);
  double window = 0.0;
  double seen = 0.0;
  for (std::size_t b = 0; b < kBuckets; ++b) {
    if (seen >= target) break;
    seen += h.weight[b];
    window = upper_edge(b);
  }
  window = window * (1.0 + options_.margin_fraction) + static_cast<double>(options_.margin);
  return static_cast<Nanos>(std::min(window, max_ka));
}

}  // namespace residency
