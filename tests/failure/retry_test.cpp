// Specifications of weir/failure/retry.hpp and weir/failure/retry_budget.hpp, on virtual time.
#include "../support/failure.hpp"

// ---- retry ----------------------------------------------------------------------------------

namespace {

// An operation whose attempts fail as scripted, recording when each one started.
struct scripted {
  std::vector<std::exception_ptr>
      failures{};  // attempt i fails with failures[i] while there is one
  std::vector<ns> started{};
  clock_type::time_point t0 = clock_type::now();

  auto operator()() {
    return [this]() -> asio::awaitable<int> {
      started.push_back(clock_type::now() - t0);
      const auto i = started.size() - 1;
      if (i < failures.size()) std::rethrow_exception(failures[i]);
      co_return static_cast<int>(i + 1);
    };
  }
};

std::exception_ptr rate_limited_for(ns after) {
  return std::make_exception_ptr(weir::exception(weir::error::rate_limited, "429", after));
}
std::exception_ptr connection_reset() {
  return std::make_exception_ptr(boost::system::system_error(asio::error::connection_reset));
}

}  // namespace

using retry_type = weir::retry<clock_type>;

TEST_CASE("with Retry-After: 7 the next attempt starts at exactly +7 s", "[retry]") {
  asio::io_context io;
  retry_type retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  scripted op{.failures = {rate_limited_for(7s)}};
  finished<int> f;
  f.start(io, retry(op()));
  advance<clock_type>(io, 7s - 1ns);
  CHECK(op.started.size() == 1);
  advance<clock_type>(io, 1ns);
  REQUIRE(f.done);
  CHECK(f.value == 2);
  CHECK(op.started == std::vector<ns>{0s, 7s});
}

TEST_CASE("retry waits the larger of its backoff and the server's hint", "[retry]") {
  asio::io_context io;
  retry_type retry({.max_attempts = 3, .backoff = weir::backoff::constant(5s)});
  scripted op{.failures = {rate_limited_for(2s)}};
  finished<int> f;
  f.start(io, retry(op()));
  advance<clock_type>(io, 1min);
  CHECK(op.started == std::vector<ns>{0s, 5s});
}

TEST_CASE("retry gives up with retries_exhausted carrying the attempts and the last failure",
          "[retry]") {
  asio::io_context io;
  std::vector<weir::retry_attempt> seen;
  retry_type retry({.max_attempts = 3,
                    .backoff = weir::backoff::exponential(1s, 2.0, 10s),
                    .on_retry = [&](const weir::retry_attempt& a) { seen.push_back(a); }});
  scripted op{.failures = {connection_reset(), connection_reset(), connection_reset()}};
  finished<int> f;
  f.start(io, retry(op()));
  advance<clock_type>(io, 1min);
  REQUIRE(f.done);
  CHECK(op.started == std::vector<ns>{0s, 1s, 3s});
  auto* e = f.weir_error();
  REQUIRE(e);
  CHECK(e->code() == weir::error::retries_exhausted);
  CHECK(e->attempts() == 3);
  CHECK_THROWS_AS(std::rethrow_exception(e->cause()), boost::system::system_error);
  REQUIRE(seen.size() == 2);
  CHECK(seen[0].attempt == 1);
  CHECK(seen[0].delay == 1s);
  CHECK(seen[1].delay == 2s);
  CHECK(seen[1].cause.kind == weir::verdict::retryable);
}

TEST_CASE("a hint beyond max_retry_after or past the deadline fails at once with rate_limited",
          "[retry]") {
  asio::io_context io;
  SECTION("beyond max_retry_after") {
    retry_type retry({.max_attempts = 5, .max_retry_after = 30s});
    scripted op{.failures = {rate_limited_for(120s)}};
    finished<int> f;
    f.start(io, retry(op()));
    run_ready(io);
    REQUIRE(f.done);  // no virtual time passed: no pointless sleeping
    auto* e = f.weir_error();
    REQUIRE(e);
    CHECK(e->code() == weir::error::rate_limited);
    CHECK(e->retry_after() == ns(120s));
  }
  SECTION("past max_elapsed") {
    retry_type retry({.max_attempts = 5, .max_elapsed = 5s});
    scripted op{.failures = {rate_limited_for(7s)}};
    finished<int> f;
    f.start(io, retry(op()));
    run_ready(io);
    REQUIRE(f.done);
    CHECK(f.code() == weir::error::rate_limited);
  }
}

TEST_CASE("fatal failures are not retried and reach the caller as they were", "[retry]") {
  asio::io_context io;
  retry_type retry({.max_attempts = 5});
  scripted op{
      .failures = {std::make_exception_ptr(weir::exception(weir::error::invalid_argument))}};
  finished<int> f;
  f.start(io, retry(op()));
  advance<clock_type>(io, 1min);
  CHECK(op.started.size() == 1);
  CHECK(f.code() == weir::error::invalid_argument);
}

TEST_CASE("a classifier can judge values: retry until the answer is acceptable", "[retry]") {
  asio::io_context io;
  auto status_429_is_rate_limited = [](const weir::outcome<int>& o) {
    if (o.has_value() && o.value() == 429)
      return weir::classification{weir::verdict::rate_limited, {.retry_after = 3s}};
    if (o.has_value() && o.value() == 400) return weir::classification{weir::verdict::fatal, {}};
    return weir::default_classifier{}(o);
  };
  weir::retry<clock_type, decltype(status_429_is_rate_limited)> retry(
      {.max_attempts = 4,
       .backoff = weir::backoff::constant(1s),
       .classifier = status_429_is_rate_limited});
  std::vector<int> answers{429, 429, 200};
  std::size_t calls = 0;
  finished<int> f;
  f.start(io, retry([&]() -> asio::awaitable<int> { co_return answers[calls++]; }));
  advance<clock_type>(io, 1min);
  CHECK(f.value == 200);
  CHECK(calls == 3);

  answers = {400, 200};
  calls = 0;
  finished<int> fatal;
  fatal.start(io, retry([&]() -> asio::awaitable<int> { co_return answers[calls++]; }));
  advance<clock_type>(io, 1min);
  CHECK(fatal.value == 400);  // a fatal answer is returned as it is, not retried
}

TEST_CASE("retry works for operations returning awaitable<void>", "[retry]") {
  asio::io_context io;
  retry_type retry({.max_attempts = 2, .backoff = weir::backoff::constant(1s)});
  int calls = 0;
  finished<int> f;
  bool done = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        co_await retry([&]() -> asio::awaitable<void> {
          if (++calls == 1) throw std::runtime_error("transient");
          co_return;
        });
        done = true;
      },
      asio::detached);
  advance<clock_type>(io, 5s);
  CHECK(done);
  CHECK(calls == 2);
}

TEST_CASE("cancellation aborts the backoff wait at once", "[retry]") {
  asio::io_context io;
  retry_type retry({.max_attempts = 5, .backoff = weir::backoff::constant(1h)});
  scripted op{.failures = {connection_reset()}};
  asio::cancellation_signal cancel;
  std::exception_ptr ended;
  bool done = false;
  asio::co_spawn(io, retry(op()),
                 asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, int) {
                   done = true;
                   ended = e;
                 }));
  run_ready(io);
  CHECK_FALSE(done);
  cancel.emit(asio::cancellation_type::terminal);
  run_ready(io);
  REQUIRE(done);
  CHECK(op.started.size() == 1);
  CHECK_THROWS_AS(std::rethrow_exception(ended), boost::system::system_error);
}

TEST_CASE("1 000 concurrent failing calls with a 10% budget cause at most the budgeted retries",
          "[retry]") {
  asio::io_context io;
  weir::retry_budget budget({.ratio = 0.1, .reserve = 10, .capacity = 100});
  retry_type retry({.max_attempts = 5, .backoff = weir::backoff::constant(1s), .budget = budget});
  int attempts = 0;
  std::vector<finished<int>> calls(1000);
  for (auto& c : calls)
    c.start(io, retry([&]() -> asio::awaitable<int> {
              ++attempts;
              throw boost::system::system_error(asio::error::connection_refused);
              co_return 0;
            }));
  advance<clock_type>(io, 1min);
  int budget_exhausted = 0, retries_exhausted = 0;
  for (auto& c : calls) {
    REQUIRE(c.done);  // every call ends, exactly once, in a typed error
    budget_exhausted += c.code() == weir::error::budget_exhausted;
    retries_exhausted += c.code() == weir::error::retries_exhausted;
  }
  CHECK(budget_exhausted + retries_exhausted == 1000);
  CHECK(attempts - 1000 <= 110);  // the reserve of 10 plus 10% of 1 000 calls
  CHECK(attempts - 1000 >= 100);
}

TEST_CASE("misconfigured retries and budgets are invalid_argument", "[retry]") {
  CHECK_THROWS_AS(retry_type({.max_attempts = 0}), weir::exception);
  CHECK_THROWS_AS(retry_type({.max_elapsed = -1s}), weir::exception);
  CHECK_THROWS_AS(weir::retry_budget({.ratio = -0.1}), weir::exception);
  CHECK_THROWS_AS(weir::retry_budget({.ratio = std::nan("")}), weir::exception);
  CHECK_THROWS_AS(weir::retry_budget({.reserve = 10, .capacity = 5}), weir::exception);
}
