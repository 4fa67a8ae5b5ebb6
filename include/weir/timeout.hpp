// A deadline around any callable returning asio::awaitable<T>. When it passes, the inner operation
// is cancelled through Asio's per-operation cancellation (its pending handler completes with
// operation_aborted) and the call fails with weir::error::timeout.
//
// Where it stands decides what it bounds: inside a retry it limits each attempt, outside it limits
// the whole call, waits included.
//
//     weir::timeout<> per_attempt(10s);
//     auto reply = co_await per_attempt([&] { return client.async_post(req, asio::use_awaitable);
//     });
#pragma once

#include <weir/error.hpp>
#include <weir/outcome.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <type_traits>
#include <variant>

namespace weir {

template <class Clock = std::chrono::steady_clock>
class timeout {
 public:
  using clock_type = Clock;

  // Throws weir::exception(invalid_argument) for a limit ≤ 0.
  explicit timeout(std::chrono::nanoseconds limit) : limit_(limit) {
    if (limit.count() <= 0)
      throw weir::exception(error::invalid_argument, "timeout must be positive");
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
    using namespace boost::asio::experimental::awaitable_operators;
    boost::asio::basic_waitable_timer<Clock> deadline(co_await boost::asio::this_coro::executor,
                                                      limit);
    auto first = co_await (op() || deadline.async_wait(boost::asio::use_awaitable));
    if (first.index() == 1) throw weir::exception(error::timeout, "the deadline passed");
    if constexpr (!std::is_void_v<T>) co_return std::move(std::get<0>(first));
  }

  std::chrono::nanoseconds limit_;
};

}  // namespace weir
