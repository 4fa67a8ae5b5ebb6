// One operation raced against a deadline: the first to finish decides, and the other is
// cancelled and waited for, so nothing outlives the race. Unlike Asio's `||` (which waits for
// one *success*), a failure that comes before the deadline is returned at once as it is.
#pragma once

#include <weir/core/outcome.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <exception>
#include <optional>
#include <utility>

namespace weir::detail {

template <class T>
struct bounded_outcome {
  outcome<T> result;     // what the operation produced (a cancellation when the deadline won)
  bool deadline_passed;  // the deadline came first
};

template <class T, class Operation>
boost::asio::awaitable<void> capture_into(std::optional<outcome<T>>& out, Operation& op) {
  out.emplace(co_await capture(op()));
}

// Runs `op()` until `deadline`. A cancellation of the caller reaches the operation and comes
// back as the operation's own outcome.
template <class Clock, class T, class Operation>
boost::asio::awaitable<bounded_outcome<T>> run_until(typename Clock::time_point deadline,
                                                     Operation& op) {
  namespace asio = boost::asio;
  const auto ex = co_await asio::this_coro::executor;
  asio::basic_waitable_timer<Clock> timer(ex, deadline);
  std::optional<outcome<T>> result;
  auto attempt = asio::co_spawn(ex, capture_into<T>(result, op), asio::deferred);
  auto group =
      asio::experimental::make_parallel_group(std::move(attempt), timer.async_wait(asio::deferred));
  auto [order, spawn_error, timer_error] =
      co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
  if (spawn_error) std::rethrow_exception(spawn_error);  // op() threw before it could start
  const bool passed = order[0] == 1 && !timer_error;
  co_return bounded_outcome<T>{std::move(*result), passed};
}

}  // namespace weir::detail
