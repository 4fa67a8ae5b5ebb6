// A deadline around any callable returning asio::awaitable<T>. When it passes, the inner operation
// is cancelled through Asio's per-operation cancellation (its pending handler completes with
// operation_aborted) and the call fails with weir::error::timeout, the operation's own failure as
// its cause. A failure before the deadline comes back at once, as it is (with its retry_after);
// a cancellation of the caller comes back as operation_aborted.
//
// Where it stands decides what it bounds: inside a retry it limits each attempt, outside it limits
// the whole call, waits included.
//
//     weir::timeout<> per_attempt(10s);
//     auto reply = co_await per_attempt([&] { return client.async_post(req, asio::use_awaitable); });
#pragma once

#include <weir/detail/deadline.hpp>
#include <weir/error.hpp>
#include <weir/outcome.hpp>

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <type_traits>

namespace weir {

template <class Clock = std::chrono::steady_clock>
class timeout {
 public:
  using clock_type = Clock;

  // Throws weir::exception(invalid_argument) for a limit ≤ 0.
  explicit timeout(std::chrono::nanoseconds limit) : limit_(limit) {
    if (limit.count() <= 0)
      throw weir::exception(error::invalid_argument,
                            fmt::format("timeout: limit must be positive, not {}", limit));
  }

  template <class Operation>
  auto operator()(Operation op) const {
    using value = awaitable_value_t<std::invoke_result_t<Operation&>>;
    return run<value>(limit_, std::move(op));
  }

  std::chrono::nanoseconds limit() const noexcept { return limit_; }

 private:
  template <class T, class Operation>
  static boost::asio::awaitable<T> run(std::chrono::nanoseconds limit, Operation op) {
    auto bounded = co_await detail::run_until<Clock, T>(
        Clock::now() + std::chrono::duration_cast<typename Clock::duration>(limit), op);
    if (bounded.deadline_passed)
      throw weir::exception(error::timeout, fmt::format("no result within {}", limit), {},
                            bounded.result.failure());
    if constexpr (std::is_void_v<T>)
      std::move(bounded.result).get();
    else
      co_return std::move(bounded.result).get();
  }

  std::chrono::nanoseconds limit_;
};

}  // namespace weir
