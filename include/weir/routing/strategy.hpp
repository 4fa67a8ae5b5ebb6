// How the router ranks the models that can take a request now. A strategy scores one candidate;
// the lowest score wins, ties go to the model listed first in the catalog.
#pragma once

#include <weir/routing/catalog.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>

namespace weir::routing {

// One model that passed every filter and has room now.
template <class Clock = std::chrono::steady_clock>
struct basic_candidate {
  const model_spec& model;
  double estimated_cost = 0;  // USD at the request's token estimates
  // Mean latency of its recent successful calls (exponentially weighted); zero before the first.
  std::chrono::nanoseconds latency{0};
  const usage_monitor<Clock>* monitor = nullptr;
  typename Clock::time_point now{};
  // Of the request's input, the tokens this model's prompt cache likely holds: the input the
  // request's session sent on its last request here, while the provider's cache lives
  // (cache_rules::ttl). Zero for a cold model or a request of no session.
  std::uint64_t cached_input_tokens = 0;

  // estimated_cost with the cached input at the cache's read price.
  double estimated_cost_with_cache() const noexcept {
    const double discount =
        model.input_price - model.cached_input_price.value_or(model.input_price);
    return estimated_cost - static_cast<double>(cached_input_tokens) * discount / 1e6;
  }

  // The share of the model's per-minute limits left in the last minute, from 1 (idle or
  // unlimited) to 0. Computed on demand: it is a pass over the monitor's window.
  double headroom() const { return monitor ? 1.0 - std::min(1.0, monitor->utilization(now)) : 1.0; }
};
using candidate = basic_candidate<>;

template <class Clock = std::chrono::steady_clock>
using basic_strategy = std::function<double(const basic_candidate<Clock>&)>;

namespace strategies {

// The lowest price for this request (the default).
template <class Clock = std::chrono::steady_clock>
basic_strategy<Clock> cheapest() {
  return [](const basic_candidate<Clock>& c) { return c.estimated_cost; };
}

// The model furthest from its limits.
template <class Clock = std::chrono::steady_clock>
basic_strategy<Clock> most_headroom() {
  return [](const basic_candidate<Clock>& c) { return -c.headroom(); };
}

// The fastest model recently; models not measured yet come first, so each gets measured.
template <class Clock = std::chrono::steady_clock>
basic_strategy<Clock> lowest_latency() {
  return [](const basic_candidate<Clock>& c) { return static_cast<double>(c.latency.count()); };
}

// Keeps a conversation where its prompt is cached (route_constraints::session): a model the
// session's cache is warm on is scored at its price with that prefix read from the cache, and
// wins a tie; every other model at its full price, as in cheapest(). So a session stays on its
// warm model while the cache lives and the model has room, and moves, to the cheapest with
// room, when it has none (or, with `min_headroom`, when less than that share of its limits is
// left) or when another model is cheaper even uncached.
template <class Clock = std::chrono::steady_clock>
basic_strategy<Clock> cache_affinity(double min_headroom = 0) {
  return [min_headroom](const basic_candidate<Clock>& c) {
    if (c.cached_input_tokens == 0 || (min_headroom > 0 && c.headroom() <= min_headroom))
      return c.estimated_cost;
    return std::nextafter(c.estimated_cost_with_cache(), -std::numeric_limits<double>::infinity());
  };
}

// Everything in dollars: price + latency × dollars_per_second + (1 − headroom) ×
// dollars_per_headroom. E.g. {.dollars_per_second = 0.001} pays up to a tenth of a cent to save
// a second.
struct weights {
  double dollars_per_second = 0;
  double dollars_per_headroom = 0;
};
template <class Clock = std::chrono::steady_clock>
basic_strategy<Clock> weighted(weights w) {
  return [w](const basic_candidate<Clock>& c) {
    double score = c.estimated_cost;
    if (w.dollars_per_second != 0)
      score += w.dollars_per_second * std::chrono::duration<double>(c.latency).count();
    if (w.dollars_per_headroom != 0) score += w.dollars_per_headroom * (1.0 - c.headroom());
    return score;
  };
}

}  // namespace strategies
}  // namespace weir::routing
