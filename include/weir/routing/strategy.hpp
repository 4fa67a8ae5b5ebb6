// How the router ranks the models that can take a request now. A strategy scores one candidate;
// the lowest score wins, ties go to the model listed first in the catalog.
#pragma once

#include <weir/routing/catalog.hpp>
#include <weir/usage_monitor.hpp>

#include <algorithm>
#include <chrono>
#include <functional>

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
