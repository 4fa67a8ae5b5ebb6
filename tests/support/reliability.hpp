// What the reliability tests share (they are built together, in this order: see
// tests/CMakeLists.txt).
#pragma once

#include <weir/composition/pipeline.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/failure/hedging.hpp>
#include <weir/failure/retry.hpp>
#include <weir/failure/timeout.hpp>
#include <weir/routing/router.hpp>
#include <weir/routing/strategy.hpp>
#include <weir/testing/fake_provider.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/throttling/token_bucket.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include "common.hpp"

#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::fake_classifier;
using weir::testing::fake_response;
using weir::testing::run_ready;
using weir_test::finished;
using context = weir::basic_call_context<clock_type>;
using breaker_type = weir::circuit_breaker<clock_type>;
using retry_type = weir::retry<clock_type>;

namespace {

// Waits an hour of virtual time (so, until cancelled) and then returns 1.
asio::awaitable<int> hang() {
  asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor, 1h);
  co_await t.async_wait(asio::use_awaitable);
  co_return 1;
}

asio::awaitable<int> fail_with(std::exception_ptr e) {
  std::rethrow_exception(e);
  co_return 0;
}

asio::awaitable<int> value(int v) { co_return v; }

auto transient() { return std::make_exception_ptr(std::runtime_error("connection reset")); }

bool aborted(const std::exception_ptr& e) { return weir::is_cancellation(e); }

// Not ended one nanosecond before `after` from now; ended with a timeout exactly then.
template <class T>
void times_out_after(asio::io_context& io, const finished<T>& f, ns after) {
  advance<clock_type>(io, after - 1ns);
  CHECK_FALSE(f.done);
  advance<clock_type>(io, 1ns);
  REQUIRE(f.done);
  CHECK(f.code() == weir::error::timeout);
}

}  // namespace
