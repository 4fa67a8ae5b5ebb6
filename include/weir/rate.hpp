// A rate: how many units (requests, tokens) per unit of time.
#pragma once

#include <chrono>

namespace weir {

struct rate {
  double per_second = 0;

  friend constexpr bool operator==(rate, rate) = default;
};

constexpr rate per_second(double n) { return rate{n}; }
constexpr rate per_minute(double n) { return rate{n / 60.0}; }
constexpr rate per_hour(double n) { return rate{n / 3600.0}; }

}  // namespace weir
