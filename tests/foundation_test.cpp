// Specifications for the ground everything stands on: typed errors, outcomes, virtual time.
#include <weir/testing/manual_clock.hpp>
#include <weir/weir.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <stdexcept>
#include <system_error>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = weir::testing::manual_clock;
using timer = asio::basic_waitable_timer<clock_type>;

TEST_CASE("weir error codes compare with their enum and read well") {
  weir::error_code ec = weir::error::queue_full;
  CHECK(ec == weir::error::queue_full);
  CHECK(ec != weir::error::timeout);
  CHECK(ec.category().name() == std::string("weir"));
  CHECK(ec.message() == "request queue is full");
  CHECK(fmt::format("{}", weir::error::circuit_open) == "circuit breaker is open");

  std::error_code std_ec = weir::error::timeout;
  CHECK(std_ec.message() == "operation timed out");
}

TEST_CASE("every weir error has its own message") {
  std::vector<std::string> seen;
  for (int e = static_cast<int>(weir::error::rate_limited);
       e <= static_cast<int>(weir::error::unavailable); ++e) {
    auto message = weir::make_error_code(static_cast<weir::error>(e)).message();
    CHECK(message != "unknown weir error");
    CHECK(std::find(seen.begin(), seen.end(), message) == seen.end());
    seen.push_back(message);
  }
  CHECK(weir::error_code(99, weir::error_category()).message() == "unknown weir error");
}

TEST_CASE("weir::exception carries the code, the server's retry_after and the last failure") {
  auto cause = std::make_exception_ptr(std::runtime_error("connection reset"));
  try {
    throw weir::exception(weir::error::retries_exhausted, "after 3 attempts", 7s, cause, 3);
  } catch (const boost::system::system_error& e) {
    auto& x = dynamic_cast<const weir::exception&>(e);
    CHECK(x.code() == weir::error::retries_exhausted);
    CHECK(x.retry_after() == std::chrono::nanoseconds(7s));
    CHECK(x.attempts() == 3);
    CHECK(x.cause() == cause);
    CHECK(std::string(x.what()).find("all retry attempts failed") != std::string::npos);
  }
}

TEST_CASE("an outcome knows a cancellation, as an error code or as an exception") {
  using o = weir::outcome<int>;
  const auto aborted = boost::asio::error::operation_aborted;
  CHECK(o::from_error(aborted).cancelled());
  CHECK(
      o::from_exception(std::make_exception_ptr(boost::system::system_error(aborted))).cancelled());
  CHECK_FALSE(o::from_value(1).cancelled());
  CHECK_FALSE(o::from_error(weir::error::timeout).cancelled());
  CHECK_FALSE(o::from_exception(std::make_exception_ptr(std::runtime_error("x"))).cancelled());
}

TEST_CASE("an outcome holds exactly one of value, error code or exception") {
  auto v = weir::outcome<int>::from_value(42);
  CHECK(v.has_value());
  CHECK(std::move(v).get() == 42);

  auto e = weir::outcome<int>::from_error(weir::error::timeout);
  CHECK(e.has_error());
  CHECK_THROWS_AS(std::move(e).get(), boost::system::system_error);

  auto x = weir::outcome<void>::from_exception(std::make_exception_ptr(std::logic_error("bad")));
  CHECK(x.has_exception());
  CHECK_THROWS_AS(std::move(x).get(), std::logic_error);
  CHECK(x.failure() != nullptr);
}

TEST_CASE("the default classifier judges values, weir errors, cancellation and other failures") {
  weir::default_classifier classify;
  using o = weir::outcome<int>;
  CHECK(classify(o::from_value(1)).kind == weir::verdict::success);
  CHECK(classify(o::from_error(weir::error::rate_limited)).kind == weir::verdict::rate_limited);
  CHECK(classify(o::from_error(weir::error::timeout)).kind == weir::verdict::retryable);
  CHECK(classify(o::from_error(weir::error::queue_full)).kind == weir::verdict::fatal);
  CHECK(classify(o::from_error(asio::error::operation_aborted)).kind == weir::verdict::fatal);
  CHECK(classify(o::from_error(asio::error::connection_reset)).kind == weir::verdict::retryable);

  auto limited = classify(o::from_exception(
      std::make_exception_ptr(weir::exception(weir::error::rate_limited, {}, 20s))));
  CHECK(limited.kind == weir::verdict::rate_limited);
  CHECK(limited.hint.retry_after == std::chrono::nanoseconds(20s));

  auto unknown = classify(o::from_exception(std::make_exception_ptr(std::runtime_error("?"))));
  CHECK(unknown.kind == weir::verdict::retryable);
}

TEST_CASE("a user classifier is any callable from outcome to classification") {
  auto only_values_over_ten = [](const weir::outcome<int>& o) {
    if (o.has_value() && o.value() > 10) return weir::classification{};
    return weir::classification{weir::verdict::retryable, {}};
  };
  static_assert(weir::classifier_for<decltype(only_values_over_ten), int>);
  CHECK(only_values_over_ten(weir::outcome<int>::from_value(3)).kind == weir::verdict::retryable);
}

TEST_CASE("capture turns an awaitable's value or exception into an outcome") {
  asio::io_context io;
  std::optional<weir::outcome<int>> good, bad;
  auto keep = [](asio::awaitable<int> op,
                 std::optional<weir::outcome<int>>& into) -> asio::awaitable<void> {
    into = co_await weir::capture(std::move(op));
  };
  asio::co_spawn(io, keep([]() -> asio::awaitable<int> { co_return 5; }(), good), asio::detached);
  asio::co_spawn(io,
                 keep(
                     []() -> asio::awaitable<int> {
                       throw std::runtime_error("boom");
                       co_return 0;
                     }(),
                     bad),
                 asio::detached);
  io.run();
  REQUIRE(good);
  CHECK(good->value() == 5);
  REQUIRE(bad);
  CHECK(bad->has_exception());
}

TEST_CASE("the manual clock stands still until advanced") {
  clock_type::reset();
  auto t0 = clock_type::now();
  CHECK(clock_type::now() == t0);
  clock_type::advance(90s);
  CHECK(clock_type::now() - t0 == 90s);
  CHECK_THROWS_AS(clock_type::advance(-1s), std::invalid_argument);
}

TEST_CASE("timers on virtual time fire in deadline order, each at its own deadline") {
  clock_type::reset();
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

TEST_CASE("a coroutine waiting a minute resumes exactly at its deadline, not before") {
  clock_type::reset();
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

TEST_CASE("chained waits unfold step by step within one advance") {
  clock_type::reset();
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

TEST_CASE("a cancelled virtual timer completes with operation_aborted without time moving") {
  clock_type::reset();
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
