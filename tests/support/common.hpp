// Helpers shared by the test translation units.
#pragma once

#include <weir/core/error.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <exception>
#include <optional>
#include <utility>

namespace weir_test {

// Runs `body` (a coroutine made from an executor) to its end on a fresh io_context; rethrows
// what it threw.
template <class Body>
void run_coroutine(Body body) {
  boost::asio::io_context io(1);
  std::exception_ptr failure;
  boost::asio::co_spawn(io, body(io.get_executor()), [&](std::exception_ptr e) { failure = e; });
  io.run();
  if (failure) std::rethrow_exception(failure);
}

// A call that takes `d` on `Clock`'s timers, then answers `v`: one to cancel while it runs.
template <class Clock>
boost::asio::awaitable<int> slow_answer(std::chrono::nanoseconds d, int v = 1) {
  boost::asio::basic_waitable_timer<Clock> t(
      co_await boost::asio::this_coro::executor,
      std::chrono::duration_cast<typename Clock::duration>(d));
  co_await t.async_wait(boost::asio::use_awaitable);
  co_return v;
}

// Records how a limiter's acquisition completed.
struct acquisition {
  std::optional<weir::error_code> result;
  std::chrono::nanoseconds waited{-1};
  auto handler() {
    return [this](weir::error_code ec, std::chrono::nanoseconds w) {
      result = ec;
      waited = w;
    };
  }
};

// The weir::exception in `e`, if that is what it holds (a copy, valid until the next call on
// this thread).
inline const weir::exception* weir_exception(const std::exception_ptr& e) {
  try {
    if (e) std::rethrow_exception(e);
  } catch (const weir::exception& x) {
    static thread_local std::optional<weir::exception> kept;
    kept.emplace(x);
    return &*kept;
  } catch (...) {
  }
  return nullptr;
}

// Runs an awaitable as a coroutine and keeps how it ended.
template <class T>
struct finished {
  std::optional<T> value;
  std::exception_ptr error;
  bool done = false;

  template <class Awaitable>
  void start(boost::asio::io_context& io, Awaitable a) {
    boost::asio::co_spawn(io, std::move(a), [this](std::exception_ptr e, auto... v) {
      done = true;
      error = e;
      if constexpr (sizeof...(v) == 1)
        if (!e) value.emplace(std::move(v)...);
    });
  }

  // Started with a cancellation slot, so the test can cancel it.
  template <class Awaitable, class Slot>
  void start(boost::asio::io_context& io, Awaitable a, Slot slot) {
    boost::asio::co_spawn(
        io, std::move(a),
        boost::asio::bind_cancellation_slot(slot, [this](std::exception_ptr e, auto... v) {
          done = true;
          error = e;
          if constexpr (sizeof...(v) == 1)
            if (!e) value.emplace(std::move(v)...);
        }));
  }

  weir::error_code code() const {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const boost::system::system_error& x) {
      return x.code();
    } catch (...) {
    }
    return {};
  }

  const weir::exception* weir_error() const { return weir_exception(error); }
};

}  // namespace weir_test
