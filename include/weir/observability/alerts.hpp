// Alert rules over the usage monitor's windows and the breakers' states. Each rule calls back
// once when it starts firing and once when it clears; a ratio rule clears only below a lower
// threshold (hysteresis), so a value hovering at the line does not flap.
//
//     weir::alerts<> alerts([](const weir::alert& a) { log(a.name, a.firing); });
//     alerts.rate_limited_above("openai 429s", monitor, 0.05);  // 429s > 5% over the window
//     alerts.breaker_open_longer("openai down", breaker, 30s);
//     alerts.evaluate();  // e.g. once a second, from a timer
#pragma once

#include <weir/core/error.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace weir {

// What the callback receives on each change.
struct alert {
  std::string_view name;
  bool firing = false;  // true: it started; false: it cleared
  double value = 0;     // the ratio, or the seconds open, at the change
};

template <class Clock = std::chrono::steady_clock>
class alerts {
 public:
  using time_point = typename Clock::time_point;

  explicit alerts(std::function<void(const alert&)> on_change) : on_change_(std::move(on_change)) {}

  // Fires while the share of rate-limited (429) calls over `monitor`'s window is above
  // `threshold`, once at least `min_requests` were made; clears below threshold × clear_ratio.
  void rate_limited_above(std::string name, usage_monitor<Clock> monitor, double threshold,
                          std::uint64_t min_requests = 20, double clear_ratio = 0.8) {
    ratio_rule(std::move(name), std::move(monitor), threshold, min_requests, clear_ratio,
               [](const usage_totals& t) { return t.rate_limited; });
  }

  // The same for all errors.
  void errors_above(std::string name, usage_monitor<Clock> monitor, double threshold,
                    std::uint64_t min_requests = 20, double clear_ratio = 0.8) {
    ratio_rule(std::move(name), std::move(monitor), threshold, min_requests, clear_ratio,
               [](const usage_totals& t) { return t.errors; });
  }

  // Fires once `breaker` has been seen away from closed for longer than `limit`; clears when it
  // is seen closed again. Seen, that is, by evaluate(): call it at least as often as the
  // precision you want.
  template <class Classifier>
  void breaker_open_longer(std::string name, circuit_breaker<Clock, Classifier> breaker,
                           std::chrono::nanoseconds limit) {
    std::lock_guard lock(mutex_);
    rules_.push_back(
        rule{std::move(name), false,
             [breaker, limit, since = std::optional<time_point>()](
                 time_point now, bool firing) mutable -> std::optional<std::pair<bool, double>> {
               if (breaker.state() == breaker_state::closed) {
                 since.reset();
                 if (firing) return std::pair{false, 0.0};
                 return std::nullopt;
               }
               if (!since) since = now;
               const double open_s = std::chrono::duration<double>(now - *since).count();
               if (!firing && now - *since > limit) return std::pair{true, open_s};
               return std::nullopt;
             }});
  }

  // Evaluates every rule at `now`, calling back (outside the lock) for each one that started or
  // cleared.
  void evaluate(time_point now = Clock::now()) {
    std::vector<std::pair<std::string, std::pair<bool, double>>> changed;
    {
      std::lock_guard lock(mutex_);
      for (auto& r : rules_) {
        if (auto change = r.check(now, r.firing)) {
          r.firing = change->first;
          changed.emplace_back(r.name, *change);
        }
      }
    }
    for (const auto& [name, change] : changed) on_change_(alert{name, change.first, change.second});
  }

  // Names of the rules firing now.
  std::vector<std::string> firing() const {
    std::lock_guard lock(mutex_);
    std::vector<std::string> names;
    for (const auto& r : rules_)
      if (r.firing) names.push_back(r.name);
    return names;
  }

 private:
  struct rule {
    std::string name;
    bool firing = false;
    // (now, firing) -> the new state and the value, when it changes
    std::function<std::optional<std::pair<bool, double>>(time_point, bool)> check;
  };

  template <class Count>
  void ratio_rule(std::string name, usage_monitor<Clock> monitor, double threshold,
                  std::uint64_t min_requests, double clear_ratio, Count count) {
    if (!(threshold > 0 && threshold <= 1))
      detail::invalid_option("alerts", "threshold", threshold, "be in (0, 1]");
    if (!(clear_ratio > 0 && clear_ratio <= 1))
      detail::invalid_option("alerts", "clear_ratio", clear_ratio, "be in (0, 1]");
    std::lock_guard lock(mutex_);
    rules_.push_back(
        rule{std::move(name), false,
             [=](time_point now, bool firing) -> std::optional<std::pair<bool, double>> {
               const auto t = monitor.totals(now);
               const double ratio = t.requests ? double(count(t)) / double(t.requests) : 0.0;
               if (!firing && t.requests >= min_requests && ratio > threshold)
                 return std::pair{true, ratio};
               if (firing && ratio <= threshold * clear_ratio) return std::pair{false, ratio};
               return std::nullopt;
             }});
  }

  std::function<void(const alert&)> on_change_;
  mutable std::mutex mutex_;
  std::vector<rule> rules_;
};

}  // namespace weir
