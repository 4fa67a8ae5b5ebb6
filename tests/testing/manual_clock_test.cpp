// Specifications of weir/testing/manual_clock.hpp: virtual time for Asio timers.
#include "../support/core.hpp"

TEST_CASE("the manual clock stands still until advanced", "[manual_clock]") {
  auto t0 = clock_type::now();
  CHECK(clock_type::now() == t0);
  clock_type::advance(90s);
  CHECK(clock_type::now() - t0 == 90s);
  CHECK_THROWS_AS(clock_type::advance(-1s), std::invalid_argument);
}

TEST_CASE("timers on virtual time fire in deadline order, each at its own deadline",
          "[manual_clock]") {
  asio::io_context io;
  const auto t0 = clock_type::now();
  std::vector<std::pair<int, clock_type::duration>> fired;
  std::vector<std::unique_ptr<timer>> timers;
  for (auto [id, after] : {std::pair{3, 30s}, std::pair{1, 10s}, std::pair{2, 20s}}) {
    auto& t = timers.emplace_back(std::make_unique<timer>(io, after));
    t->async_wait([&, id = id](weir::error_code ec) {
      REQUIRE_FALSE(ec);
      fired.emplace_back(id, clock_type::now() - t0);
    });
  }
  weir::testing::run_ready(io);
  CHECK(fired.empty());

  weir::testing::advance<clock_type>(io, 60s);
  REQUIRE(fired.size() == 3);
  CHECK(fired[0] == std::pair{1, clock_type::duration(10s)});
  CHECK(fired[1] == std::pair{2, clock_type::duration(20s)});
  CHECK(fired[2] == std::pair{3, clock_type::duration(30s)});
  CHECK(clock_type::now() - t0 == 60s);
}

TEST_CASE("a coroutine waiting a minute resumes exactly at its deadline, not before",
          "[manual_clock]") {
  asio::io_context io;
  const auto t0 = clock_type::now();
  std::optional<clock_type::duration> resumed_after;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        timer t(co_await asio::this_coro::executor, 60s);
        co_await t.async_wait(asio::use_awaitable);
        resumed_after = clock_type::now() - t0;
      },
      asio::detached);

  weir::testing::advance<clock_type>(io, 60s - 1ns);
  CHECK_FALSE(resumed_after);
  weir::testing::advance<clock_type>(io, 1ns);
  REQUIRE(resumed_after);
  CHECK(*resumed_after == 60s);
}

TEST_CASE("chained waits unfold step by step within one advance", "[manual_clock]") {
  asio::io_context io;
  const auto t0 = clock_type::now();
  std::vector<clock_type::duration> wakeups;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        timer t(co_await asio::this_coro::executor);
        for (auto delay : {1s, 2s, 4s, 8s, 16s}) {
          t.expires_after(delay);
          co_await t.async_wait(asio::use_awaitable);
          wakeups.push_back(clock_type::now() - t0);
        }
      },
      asio::detached);

  weir::testing::advance<clock_type>(io, 10min);
  CHECK(wakeups == std::vector<clock_type::duration>{1s, 3s, 7s, 15s, 31s});
}

TEST_CASE("a cancelled virtual timer completes with operation_aborted without time moving",
          "[manual_clock]") {
  asio::io_context io;
  timer t(io, 1h);
  std::optional<weir::error_code> result;
  t.async_wait([&](weir::error_code ec) { result = ec; });
  weir::testing::run_ready(io);
  t.cancel();
  weir::testing::run_ready(io);
  REQUIRE(result);
  CHECK(*result == asio::error::operation_aborted);
}
