// What the composition tests share (pipeline, stream, metrics, alerts, hedging, fallback; built
// together, in this order: see tests/CMakeLists.txt).
#pragma once

#include <weir/failure/timeout.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/weir.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <future>
#include <string>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::run_ready;
using context = weir::basic_call_context<clock_type>;

namespace {
// An operation that fails its first `failures` attempts with a connection reset.
struct flaky {
  int failures = 0;
  int calls = 0;
  asio::awaitable<int> attempt() {
    if (++calls <= failures) throw boost::system::system_error(asio::error::connection_reset);
    co_return calls;
  }
  auto operator()() {
    return [this] { return attempt(); };
  }
};

// Runs `a`, letting `time` pass on the virtual clock, and returns its value if it had one.
template <class Awaitable>
std::optional<int> run_to_end(asio::io_context& io, Awaitable a,
                              std::exception_ptr* error = nullptr, ns time = 10min) {
  std::optional<int> value;
  asio::co_spawn(io, std::move(a), [&](std::exception_ptr e, int v) {
    if (e && error) *error = e;
    if (!e) value = v;
  });
  advance<clock_type>(io, time);
  return value;
}
}  // namespace
