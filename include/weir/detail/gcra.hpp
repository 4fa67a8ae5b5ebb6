// GCRA arithmetic shared by token_bucket and rate_limits. A limiter's state is its theoretical
// arrival time (TAT): the moment at which it would be empty again if nothing more were admitted.
// Admitting `n` units moves TAT by n emission intervals; a request fits when the new TAT is at
// most `tolerance` (burst × interval) ahead of now. Times are int64 nanoseconds of the clock.
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/rate.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>

namespace weir::detail {

using nanos = std::int64_t;

template <class TimePoint>
constexpr nanos to_nanos(TimePoint t) noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

template <class Clock>
constexpr typename Clock::time_point from_nanos(nanos ns) noexcept {
  return typename Clock::time_point(
      std::chrono::duration_cast<typename Clock::duration>(std::chrono::nanoseconds(ns)));
}

// Rates slower than one unit in ~3 years or faster than 10⁹/s are refused: the former is a
// misconfiguration, the latter cannot be told apart at nanosecond resolution.
inline constexpr double max_interval_ns = 1e17;

// Nanoseconds per unit at `r`; a clear invalid_argument for a rate that is not positive.
inline nanos emission_interval(rate r) {
  if (!(r.per_second > 0) || !std::isfinite(r.per_second) || 1e9 / r.per_second > max_interval_ns)
    throw weir::exception(
        error::invalid_argument,
        fmt::format("rate must be positive, finite and at least 1 per 10^8 s, not {}/s",
                    r.per_second));
  return std::max<nanos>(1, std::llround(1e9 / r.per_second));
}

// interval × burst, refusing a burst of zero or one so large the product cannot be represented.
inline nanos tolerance(nanos interval, std::uint64_t burst) {
  if (burst == 0) invalid_option("limit", "burst", burst, "be at least 1");
  if (burst > static_cast<std::uint64_t>(std::numeric_limits<nanos>::max() / 4 / interval))
    invalid_option("limit", "burst", burst,
                   "be small enough that burst × interval fits in 2^61 ns");
  return interval * static_cast<nanos>(burst);
}

struct reservation_time {
  nanos new_tat;  // TAT after admitting the units
  nanos wait;     // how long from now until the units are there (≤ 0: now)
};

// A cost larger than the burst is admitted once the limiter is empty (TAT ≤ now), all at once:
// the limiter goes into debt and later requests wait until it is paid. So a request as large as
// a whole minute's token limit waits for room instead of being refused forever.
constexpr nanos effective_tolerance(nanos increment, nanos tolerance) noexcept {
  return std::max(increment, tolerance);
}

constexpr reservation_time reserve(nanos tat, nanos now, nanos increment,
                                   nanos tolerance) noexcept {
  const nanos new_tat = std::max(tat, now) + increment;
  return {new_tat, new_tat - effective_tolerance(increment, tolerance) - now};
}

// units × interval, refusing a cost so large that the limiter's clock arithmetic would overflow
// (more than ~2^61 ns, some 70 years of the limit).
inline nanos cost_increment(std::uint64_t units, nanos interval, const char* dimension) {
  // A product checked, not a quotient: this runs on every acquire, where a 64-bit division
  // would be the slowest instruction.
  nanos cost = 0;
  if (units > static_cast<std::uint64_t>(std::numeric_limits<nanos>::max()) ||
      __builtin_mul_overflow(static_cast<nanos>(units), interval, &cost) ||
      cost > std::numeric_limits<nanos>::max() / 4)
    throw weir::exception(
        error::invalid_argument,
        fmt::format("{}: cost {} is more than the limit allows in 70 years", dimension, units));
  return cost;
}

// The most a limiter may owe (~73 years of refill): re-pricing a debt at a slower rate saturates
// here instead of overflowing.
inline constexpr nanos max_owed = std::numeric_limits<nanos>::max() / 4;

// `owed` nanoseconds of refill at `from` per unit, re-priced at `to` per unit: the same units
// (rounded down, so whole units stay whole), at most max_owed.
constexpr nanos reprice(nanos owed, nanos from, nanos to) noexcept {
  __extension__ using wide = __int128;  // owed × to may pass 2^63
  const wide v = static_cast<wide>(owed) * to / from;
  return v > max_owed ? max_owed : static_cast<nanos>(v);
}

// The smallest TAT at which nothing can be admitted before `until`.
constexpr nanos tat_paused_until(nanos until, nanos interval, nanos tolerance) noexcept {
  return until + tolerance - interval;
}

}  // namespace weir::detail
