// Specifications for the failure policies, on virtual time.
#include <weir/backoff.hpp>
#include <weir/circuit_breaker.hpp>
#include <weir/retry.hpp>
#include <weir/retry_budget.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/timeout.hpp>

#include "support.hpp"

#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::finished;
using weir::testing::run_ready;

TEST_CASE("exponential backoff doubles from the initial delay up to the cap") {
  auto b = weir::backoff::exponential(500ms, 2.0, 8s);
  std::vector<ns> got;
  for (unsigned n = 0; n < 7; ++n) got.push_back(b.delay(n));
  CHECK(got == std::vector<ns>{500ms, 1s, 2s, 4s, 8s, 8s, 8s});
}

TEST_CASE("linear and constant backoff") {
  auto linear = weir::backoff::linear(1s, 250ms, 2s);
  CHECK(linear.delay(0) == 1s);
  CHECK(linear.delay(2) == 1500ms);
  CHECK(linear.delay(100) == 2s);
  CHECK(weir::backoff::constant(3s).delay(9) == 3s);
}

TEST_CASE("no backoff overflows or goes negative at attempt 10 000") {
  std::mt19937_64 rng(7);
  for (auto j :
       {weir::jitter::none, weir::jitter::full, weir::jitter::equal, weir::jitter::decorrelated}) {
    for (auto b : {weir::backoff::exponential(1ms, 10.0, 1h), weir::backoff::linear(1ms, 1h, 2h),
                   weir::backoff::constant(5s)}) {
      auto d = b.with(j).delay(10'000, b.max_delay(), rng);
      CHECK(d >= 0ns);
      CHECK(d <= b.max_delay());
    }
  }
}

TEST_CASE("jittered delays stay within their documented bounds over 100 000 seeded draws") {
  std::mt19937_64 rng(2026);
  const auto base = weir::backoff::exponential(100ms, 2.0, 10s);
  auto full = base.with(weir::jitter::full);
  auto equal = base.with(weir::jitter::equal);
  auto decorrelated = base.with(weir::jitter::decorrelated);
  ns previous = 0ns;
  double full_sum = 0;
  for (int i = 0; i < 100'000; ++i) {
    const unsigned n = i % 12;
    const ns ceiling = base.delay(n);
    const ns f = full.delay(n, 0ns, rng);
    REQUIRE(f >= 0ns);
    REQUIRE(f <= ceiling);
    full_sum += static_cast<double>(f.count()) / static_cast<double>(ceiling.count());
    const ns e = equal.delay(n, 0ns, rng);
    REQUIRE(e >= ceiling / 2);
    REQUIRE(e <= ceiling);
    const ns d = decorrelated.delay(n, previous, rng);
    REQUIRE(d >= 100ms);
    const ns grows_from = previous > 0ns ? previous : 100ms;  // the initial delay at first
    REQUIRE(d <= std::min<ns>(10s, grows_from * 3));
    previous = d;
  }
  // Full jitter is uniform: its mean sits at half the ceiling.
  CHECK(full_sum / 100'000 == Approx(0.5).margin(0.01));
}

TEST_CASE("seeded jitter is reproducible") {
  auto b = weir::backoff::exponential(100ms, 2.0, 10s).with(weir::jitter::full);
  std::mt19937_64 a(1), c(1);
  for (unsigned n = 0; n < 20; ++n) CHECK(b.delay(n, 0ns, a) == b.delay(n, 0ns, c));
}

TEST_CASE("a misconfigured backoff is invalid_argument") {
  CHECK_THROWS_AS(weir::backoff::exponential(1s, 0.5, 10s), weir::exception);
  CHECK_THROWS_AS(weir::backoff::exponential(1s, 2.0, 100ms), weir::exception);
  CHECK_THROWS_AS(weir::backoff::constant(-1s), weir::exception);
  CHECK_THROWS_AS(weir::backoff::linear(1s, -1s, 5s), weir::exception);
}

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

TEST_CASE("with Retry-After: 7 the next attempt starts at exactly +7 s") {
  clock_type::reset();
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

TEST_CASE("retry waits the larger of its backoff and the server's hint") {
  clock_type::reset();
  asio::io_context io;
  retry_type retry({.max_attempts = 3, .backoff = weir::backoff::constant(5s)});
  scripted op{.failures = {rate_limited_for(2s)}};
  finished<int> f;
  f.start(io, retry(op()));
  advance<clock_type>(io, 1min);
  CHECK(op.started == std::vector<ns>{0s, 5s});
}

TEST_CASE("retry gives up with retries_exhausted carrying the attempts and the last failure") {
  clock_type::reset();
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

TEST_CASE("a hint beyond max_retry_after or past the deadline fails at once with rate_limited") {
  clock_type::reset();
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

TEST_CASE("fatal failures are not retried and reach the caller as they were") {
  clock_type::reset();
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

TEST_CASE("a classifier can judge values: retry until the answer is acceptable") {
  clock_type::reset();
  asio::io_context io;
  auto status_429_is_rate_limited = [](const weir::outcome<int>& o) {
    if (o.has_value() && o.value() == 429)
      return weir::classification{weir::verdict::rate_limited, {.retry_after = 3s}};
    if (o.has_value() && o.value() == 400) return weir::classification{weir::verdict::fatal, {}};
    return weir::default_classifier{}(o);
  };
  weir::retry<clock_type, decltype(status_429_is_rate_limited)> retry(
      {.max_attempts = 4, .backoff = weir::backoff::constant(1s)}, status_429_is_rate_limited);
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

TEST_CASE("retry works for operations returning awaitable<void>") {
  clock_type::reset();
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

TEST_CASE("cancellation aborts the backoff wait at once") {
  clock_type::reset();
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

TEST_CASE("1 000 concurrent failing calls with a 10% budget cause at most the budgeted retries") {
  clock_type::reset();
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

TEST_CASE("misconfigured retries and budgets are invalid_argument") {
  CHECK_THROWS_AS(retry_type({.max_attempts = 0}), weir::exception);
  CHECK_THROWS_AS(retry_type({.max_elapsed = -1s}), weir::exception);
  CHECK_THROWS_AS(weir::retry_budget({.ratio = -0.1}), weir::exception);
  CHECK_THROWS_AS(weir::retry_budget({.ratio = std::nan("")}), weir::exception);
  CHECK_THROWS_AS(weir::retry_budget({.reserve = 10, .capacity = 5}), weir::exception);
}

// ---- circuit_breaker ------------------------------------------------------------------------

using breaker_type = weir::circuit_breaker<clock_type>;

namespace {
asio::awaitable<int> failing() {
  throw boost::system::system_error(asio::error::connection_refused);
  co_return 0;
}
asio::awaitable<int> succeeding() { co_return 1; }

// Runs one call through the breaker to its end and returns how it ended.
weir::error_code call_through(asio::io_context& io, breaker_type& breaker, bool fail) {
  finished<int> f;
  f.start(io, breaker([fail] { return fail ? failing() : succeeding(); }));
  run_ready(io);
  REQUIRE(f.done);
  return f.code();
}
}  // namespace

TEST_CASE(
    "a breaker opens after 5 consecutive failures, rejects for the whole break, lets exactly "
    "one probe through, and closes on its success") {
  clock_type::reset();
  asio::io_context io;
  std::vector<std::pair<weir::breaker_state, weir::breaker_state>> changes;
  breaker_type breaker(
      {.consecutive_failures = 5,
       .break_duration = 30s,
       .on_state_change = [&](auto from, auto to) { changes.emplace_back(from, to); }});
  for (int i = 0; i < 4; ++i)
    CHECK(call_through(io, breaker, true) == asio::error::connection_refused);
  CHECK(breaker.state() == weir::breaker_state::closed);
  CHECK(call_through(io, breaker, true) == asio::error::connection_refused);
  CHECK(breaker.state() == weir::breaker_state::open);

  finished<int> rejected;
  rejected.start(io, breaker([] { return succeeding(); }));
  run_ready(io);
  auto* e = rejected.weir_error();
  REQUIRE(e);
  CHECK(e->code() == weir::error::circuit_open);
  CHECK(e->retry_after() == ns(30s));
  clock_type::advance(30s - 1ns);
  CHECK(call_through(io, breaker, false) == weir::error::circuit_open);

  clock_type::advance(1ns);
  // Exactly one probe: hold it in flight and try a second call meanwhile.
  asio::basic_waitable_timer<clock_type> slow_reply(io, 1s);
  finished<int> probe;
  probe.start(io, breaker([&]() -> asio::awaitable<int> {
                co_await slow_reply.async_wait(asio::use_awaitable);
                co_return 1;
              }));
  run_ready(io);
  CHECK(breaker.state() == weir::breaker_state::half_open);
  CHECK(call_through(io, breaker, false) == weir::error::circuit_open);
  advance<clock_type>(io, 1s);
  CHECK(probe.value == 1);
  CHECK(breaker.state() == weir::breaker_state::closed);
  using s = weir::breaker_state;
  CHECK(changes == std::vector<std::pair<s, s>>{
                       {s::closed, s::open}, {s::open, s::half_open}, {s::half_open, s::closed}});
}

TEST_CASE("a failed probe re-opens the breaker for a growing break") {
  clock_type::reset();
  asio::io_context io;
  breaker_type breaker({.consecutive_failures = 1,
                        .break_duration = 10s,
                        .break_growth = 2.0,
                        .max_break_duration = 25s});
  call_through(io, breaker, true);
  clock_type::advance(10s);
  call_through(io, breaker, true);  // the probe fails
  CHECK(breaker.state() == weir::breaker_state::open);
  CHECK(breaker.try_admit().retry_after == 20s);
  clock_type::advance(20s);
  call_through(io, breaker, true);
  CHECK(breaker.try_admit().retry_after == 25s);  // capped
  clock_type::advance(25s);
  CHECK(call_through(io, breaker, false) == weir::error_code());
  CHECK(breaker.state() == weir::breaker_state::closed);
  call_through(io, breaker, true);
  CHECK(breaker.try_admit().retry_after == 10s);  // a close resets the growth
}

TEST_CASE("a success ends a failure streak") {
  clock_type::reset();
  asio::io_context io;
  breaker_type breaker({.consecutive_failures = 3});
  for (int round = 0; round < 5; ++round) {
    call_through(io, breaker, true);
    call_through(io, breaker, true);
    call_through(io, breaker, false);
  }
  CHECK(breaker.state() == weir::breaker_state::closed);
}

TEST_CASE("failure-rate mode trips only past the threshold with the minimum throughput") {
  clock_type::reset();
  asio::io_context io;
  SECTION("count-based window") {
    breaker_type breaker({.failure_rate = weir::failure_rate_window{
                              .threshold = 0.5, .minimum_throughput = 10, .calls = 10}});
    for (int i = 0; i < 4; ++i) call_through(io, breaker, true);
    CHECK(breaker.state() == weir::breaker_state::closed);  // 4 of 4, but fewer than 10 calls
    for (int i = 0; i < 5; ++i) call_through(io, breaker, false);
    CHECK(breaker.state() == weir::breaker_state::closed);  // 4 of 9
    call_through(io, breaker, true);
    CHECK(breaker.state() == weir::breaker_state::open);  // 5 of 10
  }
  SECTION("time-based window forgets old failures") {
    breaker_type breaker(
        {.failure_rate = weir::failure_rate_window{
             .threshold = 0.5, .minimum_throughput = 4, .duration = 10s, .buckets = 10}});
    call_through(io, breaker, true);
    call_through(io, breaker, true);
    call_through(io, breaker, true);
    clock_type::advance(10s);  // those three leave the window
    call_through(io, breaker, true);
    call_through(io, breaker, false);
    call_through(io, breaker, false);
    call_through(io, breaker, false);
    CHECK(breaker.state() == weir::breaker_state::closed);  // 1 of 4
  }
}

TEST_CASE("slow calls count as failures") {
  clock_type::reset();
  asio::io_context io;
  breaker_type breaker({.consecutive_failures = 2, .slow_call_threshold = 2s});
  for (int i = 0; i < 2; ++i) {
    finished<int> f;
    f.start(io, breaker([&]() -> asio::awaitable<int> {
              asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor, 3s);
              co_await t.async_wait(asio::use_awaitable);
              co_return 1;
            }));
    advance<clock_type>(io, 3s);
    CHECK(f.value == 1);  // the caller still gets its answer
  }
  CHECK(breaker.state() == weir::breaker_state::open);
}

TEST_CASE("isolate holds the breaker open until reset") {
  clock_type::reset();
  asio::io_context io;
  breaker_type breaker;
  breaker.isolate();
  clock_type::advance(24h);
  CHECK(call_through(io, breaker, false) == weir::error::circuit_open);
  breaker.reset();
  CHECK(call_through(io, breaker, false) == weir::error_code());
}

TEST_CASE("a result from before a state change does not move the new state") {
  clock_type::reset();
  breaker_type breaker({.consecutive_failures = 1, .break_duration = 5s});
  auto early = breaker.try_admit();  // admitted while closed
  auto tripping = breaker.try_admit();
  breaker.record(tripping, true);
  CHECK(breaker.state() == weir::breaker_state::open);
  clock_type::advance(5s);
  auto probe = breaker.try_admit();
  CHECK(probe.probe);
  breaker.record(early, false);  // the old call's success must not close it
  CHECK(breaker.state() == weir::breaker_state::half_open);
  breaker.record(probe, false);
  CHECK(breaker.state() == weir::breaker_state::closed);
}

TEST_CASE("misconfigured breakers are invalid_argument") {
  CHECK_THROWS_AS(breaker_type({.consecutive_failures = 0}), weir::exception);
  CHECK_THROWS_AS(breaker_type({.half_open_permits = 1, .successes_to_close = 2}), weir::exception);
  CHECK_THROWS_AS(breaker_type({.break_duration = -1s}), weir::exception);
  CHECK_THROWS_AS(breaker_type({.failure_rate = weir::failure_rate_window{.threshold = 0}}),
                  weir::exception);
}

TEST_CASE("a breaker shared by four threads opens after its threshold and no later",
          "[concurrency]") {
  asio::io_context io(4);
  weir::circuit_breaker<> breaker(
      {.consecutive_failures = 10, .break_duration = 1h, .max_break_duration = 1h});
  std::atomic<int> reached{0}, refused{0}, other{0};
  for (int i = 0; i < 4000; ++i)
    asio::co_spawn(io, breaker([&]() -> asio::awaitable<int> {
                     ++reached;
                     throw std::runtime_error("down");
                     co_return 0;
                   }),
                   [&](std::exception_ptr e, int) {
                     try {
                       std::rethrow_exception(e);
                     } catch (const weir::exception& x) {
                       (x.code() == weir::error::circuit_open ? refused : other) += 1;
                     } catch (...) {
                     }
                   });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(breaker.state() == weir::breaker_state::open);
  // Each call is admitted and judged without suspending, so at most the three other threads'
  // calls can slip in between the tenth failure and the opening: a lost count would show here.
  CHECK(reached >= 10);
  CHECK(reached <= 13);
  CHECK(refused == 4000 - reached);
  CHECK(other == 0);
}

// ---- timeout --------------------------------------------------------------------------------

TEST_CASE("a timed-out attempt's operation is really cancelled") {
  clock_type::reset();
  asio::io_context io;
  weir::timeout<clock_type> limit(1s);
  std::optional<weir::error_code> inner;
  finished<int> f;
  f.start(io, limit([&]() -> asio::awaitable<int> {
            asio::basic_waitable_timer<clock_type> slow(co_await asio::this_coro::executor, 10s);
            auto [ec] = co_await slow.async_wait(asio::as_tuple(asio::use_awaitable));
            inner = ec;
            co_return 1;
          }));
  advance<clock_type>(io, 1s - 1ns);
  CHECK_FALSE(f.done);
  advance<clock_type>(io, 1ns);
  REQUIRE(f.done);
  CHECK(f.code() == weir::error::timeout);
  REQUIRE(inner);
  CHECK(*inner == asio::error::operation_aborted);
}

TEST_CASE("an operation that beats its deadline returns its value") {
  clock_type::reset();
  asio::io_context io;
  weir::timeout<clock_type> limit(5s);
  finished<int> f;
  f.start(io, limit([]() -> asio::awaitable<int> { co_return 42; }));
  run_ready(io);
  CHECK(f.value == 42);
  CHECK_THROWS_AS(weir::timeout<clock_type>(0s), weir::exception);
}

TEST_CASE("a timeout inside a retry bounds each attempt, and the retry tries again") {
  clock_type::reset();
  asio::io_context io;
  weir::timeout<clock_type> per_attempt(1s);
  retry_type retry({.max_attempts = 3, .backoff = weir::backoff::constant(500ms)});
  int calls = 0;
  finished<int> f;
  f.start(io, retry([&] {
            return per_attempt([&]() -> asio::awaitable<int> {
              if (++calls < 3) {  // the first two hang
                asio::basic_waitable_timer<clock_type> hang(co_await asio::this_coro::executor, 1h);
                co_await hang.async_wait(asio::use_awaitable);
              }
              co_return calls;
            });
          }));
  advance<clock_type>(io, 1min);
  CHECK(f.value == 3);
}

TEST_CASE("one retry and budget shared by four threads count every attempt exactly",
          "[concurrency]") {
  asio::io_context io(4);
  weir::retry_budget budget({.ratio = 0.5, .reserve = 0, .capacity = 10'000});
  weir::retry<> retry({.max_attempts = 2,
                       .backoff = weir::backoff::constant(0ns).with(weir::jitter::full),
                       .budget = budget});
  std::atomic<int> attempts{0}, succeeded{0}, refused{0};
  for (int i = 0; i < 2000; ++i)
    asio::co_spawn(io, retry([&, first = std::make_shared<bool>(true)]() -> asio::awaitable<int> {
                     ++attempts;
                     if (std::exchange(*first, false)) throw std::runtime_error("transient");
                     co_return 1;
                   }),
                   [&](std::exception_ptr e, int) { (e ? refused : succeeded) += 1; });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(succeeded + refused == 2000);
  CHECK(attempts == 2000 + succeeded);  // every success took exactly one retry
  CHECK(succeeded <= 1000);             // at most half a retry per call
  CHECK(budget.available() == Approx(1000.0 - succeeded));
}
