// A rate: how many units (requests, tokens) per unit of time.
#pragma once

#include <chrono>
#include <limits>

namespace weir {

struct rate {
  double per_second = 0;

  friend constexpr bool operator==(rate, rate) = default;
};

constexpr rate per_second(double n) { return rate{n}; }
constexpr rate per_minute(double n) { return rate{n / 60.0}; }
constexpr rate per_hour(double n) { return rate{n / 3600.0}; }

// No limit: a token_bucket at this rate admits every cost at once (a limit switched off without
// removing its stage). Limiters that share state with others (rate_limits, keyed_limiter, Redis)
// refuse it.
inline constexpr rate unlimited{std::numeric_limits<double>::infinity()};

// What a limiter does with a cost larger than its burst.
enum class above_burst {
  debt,    // admits it from a full bucket, which it leaves in debt: later requests wait it off
  refuse,  // refuses it with invalid_argument, as a bucket that can never hold it would
};

}  // namespace weir
