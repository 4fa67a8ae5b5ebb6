// A retry budget shared across calls (Finagle-style): every call deposits `ratio` of a retry and
// every retry withdraws one, and both expire after `ttl`. So over any `ttl`, retries add at most
// `ratio` extra load plus the `reserve` a quiet service starts with. (Deposits that never expired
// would let a long quiet spell save up a storm.) Copies share one budget.
#pragma once

#include <weir/core/error.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>

namespace weir {

struct retry_budget_options {
  double ratio = 0.1;            // retries allowed per call made
  std::uint32_t reserve = 10;    // retries available however few calls were made
  std::uint32_t capacity = 100;  // the most retries that can be saved up
  std::chrono::nanoseconds ttl = std::chrono::seconds(10);  // how long a deposit counts
};

class retry_budget {
 public:
  // Throws weir::exception(invalid_argument) for a ratio outside [0, 1000], capacity < reserve
  // or a ttl ≤ 0.
  explicit retry_budget(retry_budget_options o = {}) : state_(std::make_shared<state>(o)) {}

  // A call is being made: it earns `ratio` of a retry for everyone, for `ttl`. `now` is any
  // monotonic clock's time since its epoch (the policies pass their own clock's).
  void deposit(std::chrono::nanoseconds now = steady_now()) const {
    auto& s = *state_;
    std::lock_guard lock(s.mutex);
    s.add(now.count(), s.per_call);
  }

  // Takes one retry from the budget if there is one.
  bool try_withdraw(std::chrono::nanoseconds now = steady_now()) const {
    auto& s = *state_;
    std::lock_guard lock(s.mutex);
    if (s.balance(now.count()) < unit) return false;
    s.add(now.count(), -unit);
    return true;
  }

  // Retries that could be taken now.
  double available(std::chrono::nanoseconds now = steady_now()) const {
    auto& s = *state_;
    std::lock_guard lock(s.mutex);
    return static_cast<double>(std::max<std::int64_t>(0, s.balance(now.count()))) / unit;
  }

 private:
  static std::chrono::nanoseconds steady_now() {
    return std::chrono::steady_clock::now().time_since_epoch();
  }

  // Balances are kept in millionths of a retry so that deposits of a fraction add up exactly.
  static constexpr std::int64_t unit = 1'000'000;
  static constexpr std::size_t slots = 10;  // the ttl in tenths: a deposit expires within 10%

  struct state {
    explicit state(const retry_budget_options& o)
        : per_call(std::llround(validated(o).ratio * unit)),
          capacity(static_cast<std::int64_t>(o.capacity) * unit),
          reserve(static_cast<std::int64_t>(o.reserve) * unit),
          slot_width(std::max<std::int64_t>(1, o.ttl.count() / static_cast<std::int64_t>(slots))) {}

    static const retry_budget_options& validated(const retry_budget_options& o) {
      if (!(o.ratio >= 0 && o.ratio <= 1000))
        throw weir::exception(
            error::invalid_argument,
            fmt::format("retry_budget: ratio must be in [0, 1000], not {}", o.ratio));
      if (o.capacity < o.reserve)
        throw weir::exception(
            error::invalid_argument,
            fmt::format("retry_budget: capacity ({}) must be at least reserve ({})", o.capacity,
                        o.reserve));
      if (o.ttl.count() <= 0) detail::invalid_option("retry_budget", "ttl", o.ttl, "be positive");
      return o;
    }

    // Under mutex: deposits less withdrawals of the last ttl, plus the reserve, up to capacity.
    std::int64_t balance(std::int64_t now) {
      const auto current = now / slot_width;
      std::int64_t sum = 0;
      for (std::size_t i = 0; i < slots; ++i)
        if (epoch[i] > current - static_cast<std::int64_t>(slots)) sum += amount[i];
      return std::min(capacity, reserve + sum);
    }

    void add(std::int64_t now, std::int64_t delta) {
      const auto current = now / slot_width;
      const auto i = static_cast<std::size_t>(((current % slots) + slots) % slots);
      if (epoch[i] != current) {
        epoch[i] = current;
        amount[i] = 0;
      }
      amount[i] += delta;
    }

    std::int64_t per_call;
    std::int64_t capacity;
    std::int64_t reserve;
    std::int64_t slot_width;
    std::mutex mutex;
    std::array<std::int64_t, slots> amount{};
    std::array<std::int64_t, slots> epoch = [] {
      std::array<std::int64_t, slots> e;
      e.fill(std::numeric_limits<std::int64_t>::min() / 2);
      return e;
    }();
  };

  std::shared_ptr<state> state_;
};

}  // namespace weir
