// A retry budget shared across calls (Finagle-style): every call deposits `ratio` of a retry and
// every retry withdraws one, so when everything fails retries add at most `ratio` extra load
// (plus the `reserve` a quiet service starts with). Copies share one budget.
#pragma once

#include <weir/error.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>

namespace weir {

struct retry_budget_options {
  double ratio = 0.1;            // retries allowed per call made
  std::uint32_t reserve = 10;    // retries available before any call has deposited
  std::uint32_t capacity = 100;  // the most retries that can be saved up by a quiet period
};

class retry_budget {
 public:
  // Throws weir::exception(invalid_argument) for a ratio outside [0, 1000] or capacity < reserve.
  explicit retry_budget(retry_budget_options o = {}) : state_(std::make_shared<state>(o)) {}

  // A call is being made: it earns `ratio` of a retry for everyone.
  void deposit() const noexcept {
    auto& s = *state_;
    auto balance = s.balance.load(std::memory_order_relaxed);
    while (balance < s.capacity &&
           !s.balance.compare_exchange_weak(balance, std::min(s.capacity, balance + s.per_call),
                                            std::memory_order_relaxed)) {
    }
  }

  // Takes one retry from the budget if there is one.
  bool try_withdraw() const noexcept {
    auto& s = *state_;
    auto balance = s.balance.load(std::memory_order_relaxed);
    while (balance >= unit) {
      if (s.balance.compare_exchange_weak(balance, balance - unit, std::memory_order_relaxed))
        return true;
    }
    return false;
  }

  // Retries that could be taken now.
  double available() const noexcept {
    return static_cast<double>(state_->balance.load(std::memory_order_relaxed)) / unit;
  }

 private:
  // Balances are kept in millionths of a retry so that deposits of a fraction add up exactly.
  static constexpr std::int64_t unit = 1'000'000;

  struct state {
    explicit state(const retry_budget_options& o)
        : per_call(std::llround(validated(o).ratio * unit)),
          capacity(static_cast<std::int64_t>(o.capacity) * unit),
          balance(static_cast<std::int64_t>(o.reserve) * unit) {}

    static const retry_budget_options& validated(const retry_budget_options& o) {
      if (!(o.ratio >= 0 && o.ratio <= 1000))
        throw weir::exception(error::invalid_argument, "retry budget ratio must be in [0, 1000]");
      if (o.capacity < o.reserve)
        throw weir::exception(error::invalid_argument,
                              "retry budget capacity must be at least its reserve");
      return o;
    }
    std::int64_t per_call;
    std::int64_t capacity;
    std::atomic<std::int64_t> balance;
  };

  std::shared_ptr<state> state_;
};

}  // namespace weir
