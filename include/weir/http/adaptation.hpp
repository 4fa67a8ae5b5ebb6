// Lets the server steer a provider's rate_limits: what it reports about its limits re-sizes them,
// "nothing left until the reset" pauses them exactly that long, and a 429 that says nothing
// lowers the request rate multiplicatively while successes raise it additively (AIMD), so an
// unknown limit is found from below.
//
//     weir::http::server_adaptation adapt(limits, {.window = std::chrono::minutes(1)});
//     auto verdict = classifier(outcome);
//     adapt.observe(verdict);  // after every response
#pragma once

#include <weir/outcome.hpp>
#include <weir/rate.hpp>
#include <weir/rate_limits.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <mutex>
#include <optional>

namespace weir::http {

struct adaptation_options {
  // The window the servers' reported limits are per (a minute for OpenAI and Anthropic).
  std::chrono::nanoseconds window = std::chrono::minutes(1);
  double burst_fraction = 0.1;  // a learned limit L gets a burst of L × this
  double decrease = 0.7;        // a 429 with no hint multiplies the request rate by this
  double increase = 0.01;       // each success adds this fraction of the ceiling to the rate
  weir::rate min_rate = weir::per_minute(1);
};

template <class Clock = std::chrono::steady_clock>
class server_adaptation {
 public:
  using time_point = typename Clock::time_point;

  // `limits` is shared, not copied: adaptation changes the limiter the calls go through. The
  // request rate configured there is the ceiling AIMD never climbs above until the server
  // reports a limit of its own. Throws weir::exception(invalid_argument) for a bad option.
  explicit server_adaptation(rate_limits<Clock> limits, adaptation_options options = {})
      : limits_(std::move(limits)), options_(options) {
    if (options.window.count() <= 0 || !(options.burst_fraction > 0) || !(options.decrease > 0) ||
        !(options.decrease < 1) || !(options.increase >= 0) || !(options.min_rate.per_second > 0))
      throw weir::exception(error::invalid_argument, "adaptation options out of range");
    if (auto l = limits_.get_limit(dimension::requests)) ceiling_[0] = l->rate.per_second;
  }

  // Feeds one classified response.
  void observe(const classification& c, time_point now = Clock::now()) {
    std::lock_guard lock(mutex_);
    const limit_snapshot* snapshots[4] = {&c.hint.requests, &c.hint.tokens, &c.hint.input_tokens,
                                          &c.hint.output_tokens};
    bool informative = c.hint.retry_after.has_value();
    for (std::size_t d = 0; d < 4; ++d) {
      const auto& s = *snapshots[d];
      const auto dim = static_cast<dimension>(d);
      if (s.limit && *s.limit > 0) learn_limit(dim, *s.limit);
      if (s.remaining && *s.remaining == 0 && s.reset_after) {
        limits_.pause_until(
            dim, now + std::chrono::duration_cast<typename Clock::duration>(*s.reset_after));
        informative = true;
      }
    }
    if (c.kind == verdict::rate_limited) {
      if (c.hint.retry_after)
        limits_.pause_until(
            dimension::requests,
            now + std::chrono::duration_cast<typename Clock::duration>(*c.hint.retry_after));
      if (!informative) scale_requests(options_.decrease, 0);
    } else if (c.kind == verdict::success && ceiling_[0]) {
      scale_requests(1.0, options_.increase * *ceiling_[0]);
    }
  }

  // The request rate now in force (nullopt when the limits have no request dimension).
  std::optional<weir::rate> request_rate() const {
    if (auto l = limits_.get_limit(dimension::requests)) return l->rate;
    return std::nullopt;
  }

 private:
  double window_seconds() const { return std::chrono::duration<double>(options_.window).count(); }

  // The server reported a limit of `n` per window: that is the ceiling, and the rate if the
  // limiter was above it (or the dimension was not limited at all yet).
  void learn_limit(dimension dim, std::int64_t n) {
    const double per_second = static_cast<double>(n) / window_seconds();
    const auto d = static_cast<std::size_t>(dim);
    ceiling_[d] = per_second;
    const auto current = limits_.get_limit(dim);
    if (current && current->rate.per_second <= per_second) return;
    const auto burst =
        static_cast<std::uint64_t>(std::max(1.0, static_cast<double>(n) * options_.burst_fraction));
    limits_.set_limit(dim, {weir::per_second(per_second), burst});
  }

  // rate := clamp(rate × factor + step, min_rate, ceiling). A cut also drops the burst to one:
  // after a refusal that said nothing, the server may allow no burst at all, and a burst that grew
  // with the rate would send requests back to back exactly when the rate nears the limit.
  void scale_requests(double factor, double step) {
    auto current = limits_.get_limit(dimension::requests);
    if (!current) return;
    double next = current->rate.per_second * factor + step;
    if (ceiling_[0]) next = std::min(next, *ceiling_[0]);
    next = std::max(next, options_.min_rate.per_second);
    if (next == current->rate.per_second) return;
    limits_.set_limit(dimension::requests,
                      {weir::per_second(next), factor < 1 ? std::uint64_t{1} : current->burst});
  }

  rate_limits<Clock> limits_;
  adaptation_options options_;
  std::mutex mutex_;
  std::array<std::optional<double>, 4> ceiling_{};  // per second, from the server or the config
};

}  // namespace weir::http
