// Backoff: the delay before retry attempt n, constant, linear or exponential, with the jitter
// variants of AWS's "Exponential Backoff And Jitter".
//
//     auto b = weir::backoff::exponential(500ms, 2.0, 8s).with(weir::jitter::full);
//     std::mt19937_64 rng(seed);
//     auto d = b.delay(attempt, previous_delay, rng);
//
// Bounds, for attempt n ≥ 0 and t(n) = min(cap, the un-jittered delay):
//   none          t(n)
//   full          uniform in [0, t(n)]
//   equal         uniform in [t(n)/2, t(n)]
//   decorrelated  uniform in [initial, min(cap, 3 × previous)] (previous = initial at first)
// Every delay is in [0, cap]; growth is computed in floating point and clamped, so attempt 10 000
// neither overflows nor goes negative.
#pragma once

#include <weir/core/error.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>

namespace weir {

enum class jitter { none, full, equal, decorrelated };

class backoff {
 public:
  using duration = std::chrono::nanoseconds;

  // The same delay every time.
  static backoff constant(duration delay) { return backoff(shape::constant, delay, 0, delay); }

  // initial, initial + step, initial + 2·step, … up to cap.
  static backoff linear(duration initial, duration step, duration cap) {
    return backoff(shape::linear, initial, static_cast<double>(step.count()), cap);
  }

  // initial, initial·multiplier, initial·multiplier², … up to cap.
  static backoff exponential(duration initial, double multiplier = 2.0,
                             duration cap = std::chrono::seconds(30)) {
    if (!(multiplier >= 1.0) || !std::isfinite(multiplier))
      throw weir::exception(error::invalid_argument,
                            "backoff multiplier must be finite and at least 1");
    return backoff(shape::exponential, initial, multiplier, cap);
  }

  backoff with(weir::jitter j) const {
    backoff b = *this;
    b.jitter_ = j;
    return b;
  }

  // The delay before retry `attempt` (0 for the first retry). `previous` is the delay returned for
  // the attempt before (decorrelated jitter grows from it; the others ignore it).
  template <class Random>
  duration delay(unsigned attempt, duration previous, Random& random) const {
    const double base = ceiling(attempt);
    switch (jitter_) {
      case jitter::none: return to_duration(base);
      case jitter::full: return to_duration(uniform(0, base, random));
      case jitter::equal: return to_duration(uniform(base / 2, base, random));
      case jitter::decorrelated: {
        const double low = std::min(static_cast<double>(initial_.count()), cap());
        const double from = previous.count() > 0 ? static_cast<double>(previous.count()) : low;
        return to_duration(uniform(low, std::min(cap(), std::max(low, from * 3)), random));
      }
    }
    return to_duration(base);
  }

  // Without jitter no randomness is needed.
  duration delay(unsigned attempt) const { return to_duration(ceiling(attempt)); }

  duration initial() const noexcept { return initial_; }
  duration max_delay() const noexcept { return cap_; }
  weir::jitter jitter_kind() const noexcept { return jitter_; }

 private:
  enum class shape { constant, linear, exponential };

  backoff(shape s, duration initial, double factor, duration cap)
      : shape_(s), initial_(initial), factor_(factor), cap_(cap) {
    if (initial.count() < 0)
      detail::invalid_option("backoff", "initial", initial, "not be negative");
    if (cap.count() < 0) detail::invalid_option("backoff", "cap", cap, "not be negative");
    if (!(factor >= 0)) detail::invalid_option("backoff", "factor", factor, "not be negative");
    if (cap < initial)
      detail::invalid_option(
          "backoff", "cap", cap,
          fmt::format("be at least the initial delay, {}", detail::duration_text(initial)));
  }

  double cap() const { return static_cast<double>(cap_.count()); }

  // The un-jittered delay for `attempt`, clamped to the cap before it can overflow.
  double ceiling(unsigned attempt) const {
    const double first = static_cast<double>(initial_.count());
    double d = first;
    switch (shape_) {
      case shape::constant: break;
      case shape::linear: d = first + factor_ * attempt; break;
      case shape::exponential: d = first * std::pow(factor_, static_cast<double>(attempt)); break;
    }
    return std::isfinite(d) ? std::clamp(d, 0.0, cap()) : cap();
  }

  template <class Random>
  static double uniform(double low, double high, Random& random) {
    if (!(high > low)) return low;
    return std::uniform_real_distribution<double>(low, high)(random);
  }

  // Clamped in floating point first: a cap near nanoseconds::max() must not cast out of range.
  duration to_duration(double ns) const {
    if (!(ns > 0)) return duration::zero();
    if (ns >= cap()) return cap_;
    return duration(static_cast<std::int64_t>(ns));
  }

  shape shape_;
  duration initial_;
  double factor_;  // linear: step in ns; exponential: multiplier
  duration cap_;
  weir::jitter jitter_ = weir::jitter::none;
};

}  // namespace weir
