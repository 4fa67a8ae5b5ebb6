// Specifications for the throttling policies, on virtual time.
#include <weir/rate_limits.hpp>
#include <weir/request_queue.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/token_bucket.hpp>
#include <weir/usage_monitor.hpp>

#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = weir::testing::manual_clock;
using bucket_type = weir::token_bucket<clock_type>;
using weir::testing::advance;
using weir::testing::run_ready;

namespace {
// Records how an acquisition completed.
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
}  // namespace

TEST_CASE("a 10/s bucket with burst 5 admits exactly 605 in 60 virtual seconds") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 5});
  int admitted = 0;
  const auto end = clock_type::now() + 60s;
  while (clock_type::now() <= end) {
    while (bucket.try_acquire()) ++admitted;
    clock_type::advance(1ms);
  }
  CHECK(admitted == 605);
}

TEST_CASE("try_acquire takes weighted costs and time_until says when they fit") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(100), .burst = 100});
  CHECK(bucket.try_acquire(60));
  CHECK_FALSE(bucket.try_acquire(60));
  CHECK(bucket.available() == 40);
  CHECK(bucket.time_until(60) == 200ms);
  clock_type::advance(199ms);
  CHECK_FALSE(bucket.try_acquire(60));
  clock_type::advance(1ms);
  CHECK(bucket.try_acquire(60));
}

TEST_CASE("misconfigured buckets and oversized costs are invalid_argument errors") {
  asio::io_context io;
  auto ex = io.get_executor();
  auto is_invalid = [](const weir::exception& e) {
    return e.code() == weir::error::invalid_argument;
  };
  using weir::exception;
  CHECK_THROWS_MATCHES(bucket_type(ex, {.rate = weir::per_second(0), .burst = 1}), exception,
                       Catch::Predicate<exception>(is_invalid));
  CHECK_THROWS_MATCHES(bucket_type(ex, {.rate = weir::per_second(-5), .burst = 1}), exception,
                       Catch::Predicate<exception>(is_invalid));
  CHECK_THROWS_MATCHES(bucket_type(ex, {.rate = weir::per_second(5), .burst = 0}), exception,
                       Catch::Predicate<exception>(is_invalid));
  CHECK_THROWS_MATCHES(bucket_type(ex, {.rate = weir::per_second(std::nan("")), .burst = 1}),
                       exception, Catch::Predicate<exception>(is_invalid));
  bucket_type bucket(ex, {.rate = weir::per_second(5), .burst = 3});
  CHECK_THROWS_MATCHES(bucket.set_rate(weir::per_second(0)), exception,
                       Catch::Predicate<exception>(is_invalid));
  // A cost the clock arithmetic cannot hold is refused where it is asked, with its number.
  const std::uint64_t absurd = std::uint64_t{1} << 62;
  CHECK_THROWS_WITH(bucket.try_acquire(absurd), Catch::Contains("cost 4611686018427387904"));
  acquisition a;
  CHECK_THROWS_WITH(bucket.async_acquire(absurd, a.handler()),
                    Catch::Contains("token_bucket: cost 4611686018427387904"));
}

TEST_CASE("a cost above the bucket's burst waits for a full bucket and leaves it in debt") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(5), .burst = 3});
  CHECK(bucket.try_acquire(4));  // a full bucket takes it
  CHECK_FALSE(bucket.try_acquire(1));
  // In debt by one unit beyond the burst: the next unit is there 4 intervals (800 ms) later.
  CHECK(bucket.time_until(1) == 800ms - 600ms + 200ms);
  acquisition a;
  bucket.async_acquire(10, a.handler());  // waits until the bucket is empty, then takes all
  advance<clock_type>(io, 799ms);
  CHECK_FALSE(a.result);
  advance<clock_type>(io, 1ms);
  REQUIRE(a.result);
  CHECK(a.waited == 800ms);
}

TEST_CASE("async_acquire waits exactly until the tokens are there") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(2), .burst = 1});
  REQUIRE(bucket.try_acquire());
  acquisition a;
  bucket.async_acquire(1, a.handler());
  advance<clock_type>(io, 499ms);
  CHECK_FALSE(a.result);
  advance<clock_type>(io, 1ms);
  REQUIRE(a.result);
  CHECK_FALSE(*a.result);
  CHECK(a.waited == 500ms);
}

TEST_CASE("1000 concurrent waiters complete in FIFO order, a large one not starved by small ones") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(100), .burst = 10});
  REQUIRE(bucket.try_acquire(10));
  std::vector<int> order;
  for (int i = 0; i < 1000; ++i) {
    const std::uint64_t cost = i == 3 ? 10 : 1;  // a large request among small ones
    bucket.async_acquire(cost, [&order, i](weir::error_code ec, auto) {
      if (!ec) order.push_back(i);
    });
  }
  // Latecomers using try_acquire cannot jump the queue either.
  CHECK_FALSE(bucket.try_acquire());
  advance<clock_type>(io, 20s);
  REQUIRE(order.size() == 1000);
  CHECK(std::is_sorted(order.begin(), order.end()));
}

TEST_CASE("the coroutine form takes free units without passing through the scheduler",
          "[token_bucket][rate_limits][request_queue]") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 3});
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.requests = weir::limit{weir::per_second(1), 3}});
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 3, .max_queued = 3});
  int done = 0;
  auto free_three = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 3; ++i) {
      co_await bucket.acquire();
      co_await limits.acquire({.requests = 1});
      auto slot = co_await queue.admit();
      slot.detach();
    }
    ++done;
  };
  asio::co_spawn(io, free_three(), asio::detached);
  // One handler starts the coroutine; nine acquisitions later it has finished in that handler.
  CHECK(io.poll_one() == 1);
  CHECK(done == 1);

  // Nothing left: the same calls wait as async_acquire does, and a max_wait too short throws.
  std::chrono::nanoseconds waited{};
  bool refused = false;
  auto wait_one = [&]() -> asio::awaitable<void> {
    waited = co_await bucket.acquire(1);
    try {
      co_await bucket.acquire(1, 10ms);
    } catch (const boost::system::system_error& e) {
      refused = e.code() == weir::error::rate_limited;
    }
  };
  asio::co_spawn(io, wait_one(), asio::detached);
  advance<clock_type>(io, 1s);
  CHECK(waited == 1s);
  CHECK(refused);
}

TEST_CASE("with an executor that names a default token, the limiters' operations need none",
          "[token_bucket][rate_limits]") {
  clock_type::reset();
  asio::io_context io;
  using awaiting = asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>;
  weir::token_bucket<clock_type, awaiting> bucket(awaiting(io.get_executor()),
                                                  {.rate = weir::per_second(10), .burst = 1});
  weir::rate_limits<clock_type, awaiting> limits(
      awaiting(io.get_executor()), {.requests = weir::limit{weir::per_second(10), 1}});
  std::chrono::nanoseconds bucket_wait{-1}, limits_wait{-1};
  auto body = [&]() -> asio::awaitable<void> {
    co_await bucket.async_acquire(1);
    bucket_wait = co_await bucket.async_acquire(1);
    co_await limits.async_acquire({.requests = 1});
    limits_wait = co_await limits.async_acquire({.requests = 1}, 1s);
  };
  asio::co_spawn(io, body(), asio::detached);
  advance<clock_type>(io, 1s);
  CHECK(bucket_wait == 100ms);
  CHECK(limits_wait == 100ms);
}

TEST_CASE("waiters due together are woken by the bucket's one timer in their order",
          "[token_bucket]") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1000), .burst = 1});
  REQUIRE(bucket.try_acquire());
  std::vector<int> order;
  std::vector<asio::cancellation_signal> cancel(50);
  for (int i = 0; i < 50; ++i)
    bucket.async_acquire(
        1, asio::bind_cancellation_slot(cancel[i].slot(), [&order, i](weir::error_code ec, auto) {
          order.push_back(ec ? -1 : i);  // -1: cancelled
        }));
  // The head leaves: the timer is re-armed for the next one, 1 ms earlier for everyone.
  cancel[0].emit(asio::cancellation_type::terminal);
  run_ready(io);
  REQUIRE(order == std::vector<int>{-1});
  CHECK(bucket.time_until(1) == 50ms);
  // One jump of the clock: every waiter is due at once, and they complete in reservation order.
  clock_type::advance(1s);
  run_ready(io);
  REQUIRE(order.size() == 50);
  for (int i = 1; i < 50; ++i) CHECK(order[i] == i);
}

TEST_CASE("a cancelled waiter's tokens go to the next one") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  REQUIRE(bucket.try_acquire());
  asio::cancellation_signal cancel_first;
  acquisition first, second;
  bucket.async_acquire(1, asio::bind_cancellation_slot(cancel_first.slot(), first.handler()));
  bucket.async_acquire(1, second.handler());
  CHECK(bucket.time_until(1) == 3s);  // both reservations are held

  advance<clock_type>(io, 500ms);
  cancel_first.emit(asio::cancellation_type::terminal);
  run_ready(io);
  REQUIRE(first.result);
  CHECK(*first.result == asio::error::operation_aborted);

  // The second waiter now stands where the first stood: it is served at 1 s, not 2 s.
  advance<clock_type>(io, 499ms);
  CHECK_FALSE(second.result);
  advance<clock_type>(io, 1ms);
  REQUIRE(second.result);
  CHECK_FALSE(*second.result);
  CHECK(bucket.time_until(1) == 1s);  // nothing more is held
}

TEST_CASE("destroying the io_context with waiters pending leaves nothing behind") {
  clock_type::reset();
  int completions = 0;
  std::optional<bucket_type> survivor;
  {
    asio::io_context io;
    bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
    REQUIRE(bucket.try_acquire());
    for (int i = 0; i < 3; ++i)
      bucket.async_acquire(1, [&](weir::error_code, auto) { ++completions; });
    run_ready(io);
    survivor.emplace(bucket);
  }
  CHECK(completions == 0);  // handlers are destroyed, never called, as Asio does
  CHECK(survivor->available(clock_type::now() + 10s) >= 1);
}

TEST_CASE("max_wait refuses at once with rate_limited and the expected wait") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  REQUIRE(bucket.try_acquire());
  acquisition a;
  bucket.async_acquire(1, 500ms, a.handler());
  run_ready(io);
  REQUIRE(a.result);
  CHECK(*a.result == weir::error::rate_limited);
  CHECK(a.waited == 1s);
  CHECK(bucket.time_until(1) == 1s);  // the refusal took nothing
}

TEST_CASE("async_acquire works with use_awaitable, deferred and callbacks") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  std::vector<std::string> done;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        co_await bucket.async_acquire(1, asio::use_awaitable);
        done.push_back("awaitable");
      },
      asio::detached);
  run_ready(io);  // the coroutine starts, and queues first
  auto deferred_op = bucket.async_acquire(1, asio::deferred);
  std::move(deferred_op)([&](weir::error_code ec, auto) {
    if (!ec) done.push_back("deferred");
  });
  bucket.async_acquire(1, [&](weir::error_code ec, auto) {
    if (!ec) done.push_back("callback");
  });
  advance<clock_type>(io, 3s);
  CHECK(done == std::vector<std::string>{"awaitable", "deferred", "callback"});
}

TEST_CASE("set_rate and set_burst re-size the bucket at run time") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  bucket.set_burst(4);
  bucket.set_rate(weir::per_second(4));
  CHECK(bucket.burst() == 4);
  CHECK(bucket.rate().per_second == Approx(4));
  CHECK(bucket.try_acquire(4));
  CHECK(bucket.time_until(1) == 250ms);
}

TEST_CASE("pause_until holds the bucket empty until the given moment", "[token_bucket]") {
  clock_type::reset();
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 10});
  bucket.pause_until(clock_type::now() + 20s);
  CHECK(bucket.time_until(1) == 20s);
  clock_type::advance(20s);
  CHECK(bucket.try_acquire());
}

TEST_CASE("a 4-thread io_context hammering one bucket admits exactly the allowed number",
          "[concurrency]") {
  clock_type::reset();
  asio::io_context io(4);
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1000), .burst = 100});
  std::atomic<int> admitted{0};
  std::atomic<bool> stop{false};
  for (int t = 0; t < 4; ++t) {
    asio::post(io, [&] {
      while (!stop.load()) {
        if (bucket.try_acquire()) admitted.fetch_add(1);
      }
    });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  // 1 virtual second in 10 ms steps while the threads compete: 100 burst + 1000 refilled.
  for (int step = 0; step < 100; ++step) {
    while (bucket.available() != 0) std::this_thread::yield();
    clock_type::advance(10ms);
  }
  while (bucket.available() != 0) std::this_thread::yield();
  stop = true;
  for (auto& t : threads) t.join();
  CHECK(admitted.load() == 1100);
}

// ---- rate_limits ----------------------------------------------------------------------------

using limits_type = weir::rate_limits<clock_type>;

TEST_CASE("waiters woken by the bucket's timer while others are cancelled on other threads",
          "[concurrency]") {
  // Real time: the bucket's timer and the waiters' own give-up timers race across four threads.
  // Each waiter runs on a strand of its own and cancels its wait from a timer on that strand, so
  // that its cancellation and its completion meet on one executor, as Asio requires of a
  // cancellation slot; the bucket is shared by all of them.
  using steady_bucket = weir::token_bucket<>;
  asio::io_context io(4);
  constexpr double rate = 5000;
  steady_bucket bucket(io.get_executor(), {.rate = weir::per_second(rate), .burst = 1});
  constexpr int waiters = 400;
  std::atomic<int> admitted{0}, gave_up{0}, ended{0};
  std::mutex times_mutex;
  std::vector<std::chrono::steady_clock::time_point> admissions;
  auto wait = [](steady_bucket& b, std::chrono::microseconds patience, std::atomic<int>& ok,
                 std::atomic<int>& no, std::atomic<int>& done, std::mutex& m,
                 std::vector<std::chrono::steady_clock::time_point>& at) -> asio::awaitable<void> {
    auto stop = std::make_shared<asio::cancellation_signal>();
    asio::steady_timer give_up(co_await asio::this_coro::executor, patience);
    give_up.async_wait([stop](weir::error_code ec) {
      if (!ec) stop->emit(asio::cancellation_type::terminal);
    });
    auto [ec, waited] = co_await b.async_acquire(
        1, asio::bind_cancellation_slot(stop->slot(), asio::as_tuple(asio::use_awaitable)));
    give_up.cancel();
    if (!ec) {
      ok.fetch_add(1);
      std::lock_guard lock(m);
      at.push_back(std::chrono::steady_clock::now());
    } else {
      no.fetch_add(1);
    }
    done.fetch_add(1);
  };
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < waiters; ++i)
    asio::co_spawn(asio::make_strand(io),
                   wait(bucket, std::chrono::microseconds(1000 + (i * 7919) % 40000), admitted,
                        gave_up, ended, times_mutex, admissions),
                   asio::detached);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(ended.load() == waiters);  // every waiter ended, once
  CHECK(admitted.load() + gave_up.load() == waiters);
  REQUIRE(admitted.load() > 0);
  CHECK(gave_up.load() > 0);
  // Never faster than the rate: the bucket started full with a burst of one, so the last of n
  // admissions came at least (n - 1) / rate after the start.
  const std::chrono::duration<double> span =
      *std::max_element(admissions.begin(), admissions.end()) - start;
  CHECK(static_cast<double>(admissions.size() - 1) <= rate * span.count());
}

TEST_CASE("set_limit: a slower rate holds from the next request; a pause is left as it is") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  REQUIRE(limits.try_acquire({.requests = 1}));
  limits.set_limit(weir::dimension::requests, {weir::per_second(5), 1});
  CHECK(limits.time_until({.requests = 1}) == 200ms);  // one new interval after the last
  limits.pause_until(weir::dimension::requests, clock_type::now() + 5s);
  limits.set_limit(weir::dimension::requests, {weir::per_second(4), 1});
  CHECK(limits.time_until({.requests = 1}) == 5s);  // exactly as the server said
}

TEST_CASE("request and token limits are reserved together or not at all") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(600, 10),
                                         .tokens = weir::limit::per_minute(6000, 1000)});
  CHECK(limits.try_acquire({.requests = 1, .tokens = 900}));
  // Requests have room, tokens do not: nothing is taken from either.
  CHECK_FALSE(limits.try_acquire({.requests = 1, .tokens = 200}));
  for (int i = 0; i < 9; ++i) CHECK(limits.try_acquire({.requests = 1, .tokens = 10}));
  CHECK_FALSE(limits.try_acquire({.requests = 1, .tokens = 0}));  // requests exhausted now
  // 990 of 1000 tokens are used and they refill at 100/s: 200 more fit after 1.9 s.
  CHECK(limits.time_until({.requests = 1, .tokens = 200}) == 1900ms);
}

TEST_CASE("separate input and output token limits bind independently") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.input_tokens = weir::limit::per_minute(60'000, 1000),
                                         .output_tokens = weir::limit::per_minute(6'000, 100)});
  CHECK(limits.try_acquire({.requests = 1, .input_tokens = 1000, .output_tokens = 10}));
  CHECK_FALSE(limits.try_acquire({.requests = 1, .input_tokens = 0, .output_tokens = 100}));
  CHECK(limits.time_until({.requests = 1, .input_tokens = 0, .output_tokens = 100}) == 100ms);
}

TEST_CASE("settle refunds an overestimate and charges an underestimate exactly") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.tokens = weir::limit::per_minute(60'000, 1000)});
  const weir::usage estimate{.requests = 1, .tokens = 800};
  REQUIRE(limits.try_acquire(estimate));
  CHECK(limits.time_until({.requests = 0, .tokens = 1000}) == 800ms);

  limits.settle(estimate, {.requests = 1, .tokens = 300});  // used less: 500 come back
  CHECK(limits.time_until({.requests = 0, .tokens = 1000}) == 300ms);

  clock_type::advance(300ms);
  REQUIRE(limits.try_acquire(estimate));
  limits.settle(estimate, {.requests = 1, .tokens = 1200});  // used more: 400 more are charged
  CHECK(limits.time_until({.requests = 0, .tokens = 1000}) == 1200ms);
}

TEST_CASE("a refund goes to the waiter at the head of the queue") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.tokens = weir::limit::per_minute(60'000, 1000)});
  const weir::usage estimate{.requests = 1, .tokens = 1000};
  REQUIRE(limits.try_acquire(estimate));
  acquisition waiting;
  limits.async_acquire({.requests = 1, .tokens = 500}, waiting.handler());
  run_ready(io);
  CHECK_FALSE(waiting.result);
  limits.settle(estimate, {.requests = 1, .tokens = 400});  // 600 come back at once
  run_ready(io);
  REQUIRE(waiting.result);
  CHECK_FALSE(*waiting.result);
  CHECK(waiting.waited == 0s);
}

TEST_CASE("rate_limits waiters are FIFO, cancellable and bounded by max_wait") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(60, 1),
                                         .tokens = weir::limit::per_minute(6000, 100)});
  REQUIRE(limits.try_acquire({.requests = 1, .tokens = 100}));
  asio::cancellation_signal cancel;
  acquisition a, b, c, refused;
  limits.async_acquire({.requests = 1, .tokens = 100},
                       asio::bind_cancellation_slot(cancel.slot(), a.handler()));
  limits.async_acquire({.requests = 1, .tokens = 50}, b.handler());
  limits.async_acquire({.requests = 1, .tokens = 10}, 2s, refused.handler());
  run_ready(io);
  REQUIRE(refused.result);
  CHECK(*refused.result == weir::error::rate_limited);
  CHECK(refused.waited == 3s);

  cancel.emit(asio::cancellation_type::terminal);
  run_ready(io);
  CHECK(*a.result == asio::error::operation_aborted);
  // b moves into a's place: one request per second, so it is served at 1 s.
  advance<clock_type>(io, 999ms);
  CHECK_FALSE(b.result);
  advance<clock_type>(io, 1ms);
  REQUIRE(b.result);
  CHECK_FALSE(*b.result);

  limits.async_acquire({.requests = 1, .tokens = 100}, c.handler());
  advance<clock_type>(io, 10s);
  REQUIRE(c.result);
  CHECK(c.waited == 1s);
}

TEST_CASE("a request above the token burst waits for room instead of being refused") {
  // limit::per_minute(30'000) has a burst of one token; an 8 000-token request is still
  // admitted (a provider would accept it), when the limiter is empty.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.tokens = weir::limit::per_minute(30'000)});
  CHECK(limits.try_acquire({.requests = 1, .tokens = 8000}));
  // The next one waits until the first is paid: 8 000 tokens at 500/s.
  CHECK(limits.time_until({.requests = 1, .tokens = 8000}) == 16s);
  acquisition a;
  limits.async_acquire({.requests = 1, .tokens = 8000}, a.handler());
  advance<clock_type>(io, 16s - 1ns);
  CHECK_FALSE(a.result);
  advance<clock_type>(io, 1ns);
  REQUIRE(a.result);
  CHECK_FALSE(*a.result);
  CHECK(a.waited == 16s);
  // A cost past any sense is refused at once, naming the dimension and the number.
  CHECK_THROWS_WITH(
      limits.async_acquire({.requests = 1, .tokens = std::uint64_t{1} << 62}, a.handler()),
      Catch::Contains("tokens: cost 4611686018427387904"));
}

// ---- usage_monitor --------------------------------------------------------------------------

using monitor_type = weir::usage_monitor<clock_type>;

TEST_CASE("usage_monitor matches a brute-force reference over a randomized event stream") {
  clock_type::reset();
  monitor_type monitor({.window = 10s, .buckets = 20});
  const auto bucket = 500ms;
  struct event {
    clock_type::time_point at;
    weir::usage_event e;
  };
  std::vector<event> all;
  std::mt19937_64 rng(42);
  for (int i = 0; i < 20'000; ++i) {
    clock_type::advance(std::chrono::microseconds(rng() % 20'000));
    weir::usage_event e{.requests = 1 + rng() % 3,
                        .tokens = rng() % 5000,
                        .error = rng() % 7 == 0,
                        .rate_limited = rng() % 11 == 0};
    monitor.record(e);
    all.push_back({clock_type::now(), e});
    if (i % 997 == 0) {
      // Reference: every event whose bucket is one of the last 20, counted one by one.
      const auto now_bucket = clock_type::now().time_since_epoch() / bucket;
      weir::usage_totals expected;
      for (const auto& [at, ev] : all) {
        if (now_bucket - at.time_since_epoch() / bucket >= 20) continue;
        expected.requests += ev.requests;
        expected.tokens += ev.tokens;
        expected.errors += ev.error;
        expected.rate_limited += ev.rate_limited;
      }
      REQUIRE(monitor.totals() == expected);
    }
  }
}

TEST_CASE("usage_monitor forgets what left the window, however long it was idle") {
  clock_type::reset();
  monitor_type monitor({.window = 60s, .buckets = 60});
  monitor.record({.requests = 5, .tokens = 100});
  CHECK(monitor.totals().requests == 5);
  clock_type::advance(59s);
  CHECK(monitor.totals().requests == 5);
  clock_type::advance(1s);
  CHECK(monitor.totals() == weir::usage_totals{});
  clock_type::advance(24h * 400);
  CHECK(monitor.totals() == weir::usage_totals{});
  // An event stamped before the bucket was reused is outside the window and is dropped.
  const auto old = clock_type::now() - 120s;
  monitor.record({.requests = 1});
  monitor.record({.requests = 7}, old);
  CHECK(monitor.totals().requests == 1);
}

TEST_CASE("utilization compares the window with the configured limits") {
  clock_type::reset();
  monitor_type monitor({.window = 60s,
                        .buckets = 60,
                        .requests_limit = weir::per_minute(100),
                        .tokens_limit = weir::per_minute(10'000)});
  for (int i = 0; i < 50; ++i) monitor.record({.tokens = 100});
  CHECK(monitor.utilization() == Approx(0.5));
  CHECK(monitor.requests_per_minute() == Approx(50));
  CHECK(monitor.tokens_per_minute() == Approx(5000));
  monitor.record({.tokens = 4000});  // tokens now bind: 9000 of 10 000
  CHECK(monitor.utilization() == Approx(0.9));
}

TEST_CASE("pacing_delay is zero below the threshold, grows smoothly, and holds a full window") {
  clock_type::reset();
  monitor_type monitor({.window = 60s, .buckets = 60, .requests_limit = weir::per_minute(100)});
  std::chrono::nanoseconds previous{0};
  for (int used = 1; used <= 99; ++used) {
    monitor.record({});
    const auto delay = monitor.pacing_delay();
    if (used <= 80) CHECK(delay == 0ns);
    CHECK(delay >= previous);
    CHECK(delay <= 600ms);  // one request's interval at 100/min
    previous = delay;
  }
  CHECK(previous.count() == Approx(600e6 * 0.95 * 0.95).epsilon(0.001));  // u = 0.99
  // The 100th fills the window: the next request waits until the first bucket slides out.
  monitor.record({});
  CHECK(monitor.pacing_delay() == 60s);
  clock_type::advance(59s + 500ms);
  CHECK(monitor.pacing_delay() == 500ms);
}

TEST_CASE("usage_monitor rejects a misconfiguration") {
  CHECK_THROWS_AS(monitor_type({.window = 0s}), weir::exception);
  CHECK_THROWS_AS(monitor_type({.window = 60s, .buckets = 0}), weir::exception);
  CHECK_THROWS_AS(monitor_type({.requests_limit = weir::per_minute(0)}), weir::exception);
  CHECK_THROWS_AS(monitor_type({.slow_down_above = 1.5}), weir::exception);
}

TEST_CASE("usage_monitor counts exactly under four recording threads", "[concurrency]") {
  clock_type::reset();
  monitor_type monitor({.window = 60s, .buckets = 6});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 20'000; ++i) monitor.record({.tokens = 3, .error = i % 2 == 0});
    });
  for (auto& t : threads) t.join();
  CHECK(monitor.totals() == weir::usage_totals{80'000, 240'000, 40'000, 0});
}

// ---- request_queue --------------------------------------------------------------------------

namespace {
struct admission {
  std::optional<weir::error_code> result;
  weir::permit held;
  auto handler() {
    return [this](weir::error_code ec, weir::permit p) {
      result = ec;
      held = std::move(p);
    };
  }
};
}  // namespace

TEST_CASE("request_queue admits up to max_concurrent and rejects beyond max_queued at once") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 2, .max_queued = 1});
  admission a, b, c, d;
  queue.async_admit(a.handler());
  queue.async_admit(b.handler());
  queue.async_admit(c.handler());
  queue.async_admit(d.handler());
  run_ready(io);
  CHECK(a.held);
  CHECK(b.held);
  CHECK_FALSE(c.result);  // waiting
  REQUIRE(d.result);
  CHECK(*d.result == weir::error::queue_full);
  CHECK(queue.in_flight() == 2);
  CHECK(queue.queued() == 1);

  a.held.release();  // the slot passes straight to the waiter
  run_ready(io);
  CHECK(c.held);
  CHECK(queue.in_flight() == 2);
  CHECK(queue.queued() == 0);
}

TEST_CASE("permits return their slot on success, exception and cancellation") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
  auto guarded = [&](bool fail) -> asio::awaitable<void> {
    auto p = co_await queue.async_admit(asio::use_awaitable);
    if (fail) throw std::runtime_error("the call failed");
  };
  int failures = 0;
  for (bool fail : {false, true, false, true})
    asio::co_spawn(io, guarded(fail), [&](std::exception_ptr e) { failures += e != nullptr; });
  run_ready(io);
  CHECK(failures == 2);
  CHECK(queue.in_flight() == 0);

  auto held = queue.try_admit();
  REQUIRE(held);
  asio::cancellation_signal cancel;
  admission waiting;
  queue.async_admit(asio::bind_cancellation_slot(cancel.slot(), waiting.handler()));
  run_ready(io);
  cancel.emit(asio::cancellation_type::terminal);
  run_ready(io);
  REQUIRE(waiting.result);
  CHECK(*waiting.result == asio::error::operation_aborted);
  CHECK(queue.queued() == 0);
  held.release();
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("interactive requests are admitted before batch ones, FIFO within a priority") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 10});
  auto first = queue.try_admit();
  std::vector<std::string> order;
  std::vector<weir::permit> permits;
  auto record = [&](std::string name) {
    return [&, name](weir::error_code ec, weir::permit p) {
      if (!ec) order.push_back(name);
      p.release();
    };
  };
  queue.async_admit(weir::priority::batch, record("batch-1"));
  queue.async_admit(weir::priority::interactive, record("interactive-1"));
  queue.async_admit(weir::priority::batch, record("batch-2"));
  queue.async_admit(weir::priority::interactive, record("interactive-2"));
  run_ready(io);
  first.release();
  run_ready(io);
  CHECK(order == std::vector<std::string>{"interactive-1", "interactive-2", "batch-1", "batch-2"});
}

TEST_CASE("shutdown completes every waiter with shut_down and refuses later admissions") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 10});
  auto held = queue.try_admit();
  std::vector<admission> waiting(5);
  for (auto& w : waiting) queue.async_admit(w.handler());
  run_ready(io);
  queue.shutdown();
  run_ready(io);
  for (auto& w : waiting) CHECK(w.result == weir::error_code(weir::error::shut_down));
  admission late;
  queue.async_admit(late.handler());
  run_ready(io);
  CHECK(late.result == weir::error_code(weir::error::shut_down));
  CHECK_FALSE(queue.try_admit());
  held.release();
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("a request_queue without room for a single request is invalid_argument") {
  asio::io_context io;
  CHECK_THROWS_AS(weir::request_queue(io.get_executor(), {.max_concurrent = 0}), weir::exception);
}

TEST_CASE("request_queue never exceeds max_concurrent on a 4-thread io_context", "[concurrency]") {
  asio::io_context io(4);
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 3, .max_queued = 1000});
  std::atomic<int> inside{0}, most{0}, done{0};
  for (int i = 0; i < 400; ++i)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          auto p = co_await queue.async_admit(asio::use_awaitable);
          const int now = ++inside;
          int seen = most.load();
          while (now > seen && !most.compare_exchange_weak(seen, now)) {
          }
          co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
          --inside;
          ++done;
        },
        asio::detached);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(done == 400);
  CHECK(most <= 3);
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("a sender that honours pacing_delay eases into the limit without crossing it") {
  clock_type::reset();
  monitor_type monitor({.window = 60s, .buckets = 60, .requests_limit = weir::per_minute(100)});
  std::uint64_t most_in_window = 0, sent = 0;
  const auto end = clock_type::now() + 10min;
  while (clock_type::now() < end) {
    // Unpaced, this sender would send every 50 ms: 12 times the limit.
    clock_type::advance(std::max<std::chrono::nanoseconds>(50ms, monitor.pacing_delay()));
    monitor.record({});
    ++sent;
    most_in_window = std::max(most_in_window, monitor.totals().requests);
  }
  CHECK(most_in_window <= 100);
  CHECK(sent >= 900);  // ≥ 90% of the 1000 the limit allows in 10 minutes
}
