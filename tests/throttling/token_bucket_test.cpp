// Specifications of weir/throttling/token_bucket.hpp, on virtual time.
#include "../support/throttling.hpp"

TEST_CASE("a 10/s bucket with burst 5 admits exactly 605 in 60 virtual seconds", "[token_bucket]") {
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

TEST_CASE("try_acquire takes weighted costs and time_until says when they fit", "[token_bucket]") {
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

TEST_CASE("misconfigured buckets and oversized costs are invalid_argument errors",
          "[token_bucket]") {
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

TEST_CASE("a cost above the bucket's burst waits for a full bucket and leaves it in debt",
          "[token_bucket]") {
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

TEST_CASE("async_acquire waits exactly until the tokens are there", "[token_bucket]") {
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

TEST_CASE("1000 concurrent waiters complete in FIFO order, a large one not starved by small ones",
          "[token_bucket]") {
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

TEST_CASE("asio::use_awaitable.as_default_on rebinds a bucket, limits or queue that share state",
          "[token_bucket][rate_limits][request_queue]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 1});
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.requests = weir::limit{weir::per_second(10), 1}});
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1});
  auto awaiting_bucket = asio::use_awaitable.as_default_on(bucket);
  auto awaiting_limits = asio::use_awaitable.as_default_on(limits);
  auto awaiting_queue = asio::use_awaitable.as_default_on(queue);
  static_assert(
      std::is_same_v<decltype(awaiting_bucket)::executor_type,
                     asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>>);
  std::chrono::nanoseconds bucket_wait{-1}, limits_wait{-1};
  bool second_admitted = false;
  auto body = [&]() -> asio::awaitable<void> {
    // The original takes the one unit; the rebound copy waits for the next: one bucket.
    REQUIRE(bucket.try_acquire());
    bucket_wait = co_await awaiting_bucket.async_acquire(1);
    co_await limits.async_acquire({.requests = 1}, asio::use_awaitable);
    limits_wait = co_await awaiting_limits.async_acquire({.requests = 1});
    auto first = co_await awaiting_queue.async_admit();
    CHECK(queue.in_flight() == 1);  // the slot is the original queue's too
    first.release();
    auto second = co_await awaiting_queue.async_admit();
    second_admitted = true;
  };
  asio::co_spawn(io, body(), [](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
  });
  advance<clock_type>(io, 1s);
  CHECK(bucket_wait == 100ms);
  CHECK(limits_wait == 100ms);
  CHECK(second_admitted);
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("waiters due together are woken by the bucket's one timer in their order",
          "[token_bucket]") {
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

TEST_CASE("a cancelled waiter's tokens go to the next one", "[token_bucket]") {
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

TEST_CASE("destroying the io_context with waiters pending leaves nothing behind",
          "[token_bucket]") {
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

TEST_CASE("max_wait refuses at once with rate_limited and the expected wait", "[token_bucket]") {
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

TEST_CASE("async_acquire works with use_awaitable, deferred and callbacks", "[token_bucket]") {
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

TEST_CASE("set_rate and set_burst re-size the bucket at run time, keeping what it holds",
          "[token_bucket]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  bucket.set_burst(4);  // holds the 1 it had: a bigger bucket, not a fuller one
  bucket.set_rate(weir::per_second(4));
  CHECK(bucket.burst() == 4);
  CHECK(bucket.rate().per_second == Approx(4));
  CHECK(bucket.available() == 1);
  CHECK(bucket.time_until(4) == 750ms);
  clock_type::advance(750ms);
  CHECK(bucket.try_acquire(4));
  CHECK(bucket.time_until(1) == 250ms);
}

// Issue 35: the bucket's level (units held, or owed) survives a change of rate or burst.
TEST_CASE(
    "raising the rate on a drained bucket brings its next unit forward (20 at 10/s to 20/s: "
    "50 ms)",
    "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 20});
  REQUIRE(bucket.try_acquire(20));
  CHECK(bucket.time_until(1) == 100ms);
  bucket.set_rate(weir::per_second(20));
  CHECK(bucket.time_until(1) == 50ms);  // was 1050 ms: the time to full kept, not the level
  CHECK(bucket.time_until(20) == 1s);
  CHECK(bucket.available() == 0);
}

TEST_CASE("lowering the rate on a drained bucket frees nothing (20 at 10/s to 5/s)",
          "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 20});
  REQUIRE(bucket.try_acquire(20));
  bucket.set_rate(weir::per_second(5));
  CHECK(bucket.available() == 0);  // was 10: half the burst released by a rate cut
  CHECK_FALSE(bucket.try_acquire());
  CHECK(bucket.time_until(1) == 200ms);
  CHECK(bucket.time_until(20) == 4s);
}

TEST_CASE("lowering the burst on a drained bucket makes a smaller bucket, not a debt",
          "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 20});
  REQUIRE(bucket.try_acquire(20));
  bucket.set_burst(10);
  CHECK(bucket.time_until(1) == 100ms);  // was 1100 ms: ten units of debt
  CHECK(bucket.time_until(10) == 1s);
  clock_type::advance(5s);
  CHECK(bucket.available() == 10);  // and it holds no more than its new size
}

TEST_CASE("a part-full bucket keeps the units it holds through rate and burst changes",
          "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 20});
  REQUIRE(bucket.try_acquire(10));
  bucket.set_rate(weir::per_second(20));
  CHECK(bucket.available() == 10);
  CHECK(bucket.time_until(11) == 50ms);
  bucket.set_burst(5);  // holds more than the new size: full
  CHECK(bucket.available() == 5);
  CHECK(bucket.time_until(5) == 0ns);
  bucket.set_burst(20);  // a larger bucket fills at the rate
  CHECK(bucket.available() == 5);
  CHECK(bucket.time_until(6) == 50ms);
  CHECK(bucket.time_until(20) == 750ms);
}

namespace {
// Three waiters queued behind a drained bucket of burst 2 at 5/s (200 ms a unit): 2 units due at
// 400 ms, 1 at 600 ms, 2 at 1000 ms. Returns when each is served, after `change` at 200 ms.
template <class Change>
std::vector<std::chrono::nanoseconds> served_after(Change change) {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(5), .burst = 2});
  const auto start = clock_type::now();
  REQUIRE(bucket.try_acquire(2));
  std::vector<std::chrono::nanoseconds> served;
  for (std::uint64_t cost : {2, 1, 2})
    bucket.async_acquire(cost, [&](weir::error_code ec, std::chrono::nanoseconds) {
      if (!ec) served.push_back(clock_type::now() - start);
    });
  advance<clock_type>(io, 200ms);
  change(bucket);
  advance<clock_type>(io, 10s);
  return served;
}
}  // namespace

TEST_CASE("raising the rate brings queued waiters forward, in order", "[token_bucket][issue35]") {
  CHECK(served_after([](bucket_type&) {}) ==
        std::vector<std::chrono::nanoseconds>{400ms, 600ms, 1000ms});
  // At 200 ms the bucket owes 6 units (1.2 s); at 10/s they are 600 ms.
  CHECK(served_after([](bucket_type& b) { b.set_rate(weir::per_second(10)); }) ==
        std::vector<std::chrono::nanoseconds>{300ms, 400ms, 600ms});
}

TEST_CASE("lowering the rate holds queued waiters back, in order, and frees nothing",
          "[token_bucket][issue35]") {
  CHECK(served_after([](bucket_type& b) {
          b.set_rate(weir::per_second(2.5));
          CHECK_FALSE(b.try_acquire());
          CHECK(b.time_until(1) == 2s);  // 7 units owed at 400 ms, less the burst's 2
        }) == std::vector<std::chrono::nanoseconds>{600ms, 1000ms, 1800ms});
}

TEST_CASE("a burst change leaves queued waiters' turns where they were",
          "[token_bucket][issue35]") {
  // Each waiter waits for the units it needs; the size of the bucket around them does not move
  // that moment (none of these costs is above the new bursts).
  for (std::uint64_t b : {2, 3, 8})
    CHECK(served_after([b](bucket_type& bucket) { bucket.set_burst(b); }) ==
          std::vector<std::chrono::nanoseconds>{400ms, 600ms, 1000ms});
}

TEST_CASE("a pause holds through a rate change", "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 10});
  bucket.pause_until(clock_type::now() + 20s);
  acquisition a;
  bucket.async_acquire(1, a.handler());
  bucket.set_rate(weir::per_second(1000));
  CHECK(bucket.time_until(1) == 20s + 1ms);
  advance<clock_type>(io, 20s - 1ms);
  CHECK_FALSE(a.result);
  advance<clock_type>(io, 1ms);
  REQUIRE(a.result);
  CHECK_FALSE(*a.result);
}

TEST_CASE("a debt re-priced at a far slower rate saturates instead of overflowing",
          "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1e9), .burst = 1});
  REQUIRE(bucket.try_acquire(std::uint64_t{1} << 40));  // a debt of ~18 minutes at 1e9/s
  bucket.set_rate(weir::per_second(1e-8));              // 10^8 s a unit
  CHECK(bucket.time_until(1) > std::chrono::hours(24 * 365 * 70));
  bucket.set_rate(weir::per_second(1e9));
  CHECK(bucket.time_until(1) > 0ns);
}

TEST_CASE("with above_burst::refuse a cost above the burst is invalid_argument, not a debt",
          "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(
      io.get_executor(),
      {.rate = weir::per_second(5), .burst = 3, .above_burst = weir::above_burst::refuse});
  CHECK_THROWS_WITH(bucket.try_acquire(4), Catch::Contains("cost 4 is above the burst 3"));
  CHECK_THROWS_AS(bucket.time_until(4), weir::exception);
  acquisition a;
  CHECK_THROWS_AS(bucket.async_acquire(4, a.handler()), weir::exception);
  CHECK(bucket.available() == 3);  // nothing was taken
  CHECK(bucket.try_acquire(3));
  bucket.set_burst(5);
  bucket.async_acquire(4, a.handler());  // fits the new burst
  advance<clock_type>(io, 800ms);
  REQUIRE(a.result);
  CHECK_FALSE(*a.result);
  CHECK(bucket.options().above_burst == weir::above_burst::refuse);
}

TEST_CASE("weir::unlimited admits everything, waiters included, and the bucket leaves it full",
          "[token_bucket][issue35]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 2});
  REQUIRE(bucket.try_acquire(2));
  acquisition first, second;
  bucket.async_acquire(1, first.handler());
  bucket.async_acquire(5, second.handler());
  advance<clock_type>(io, 100ms);
  bucket.set_rate(weir::unlimited);
  run_ready(io);
  REQUIRE(first.result);
  REQUIRE(second.result);
  CHECK_FALSE(*first.result);
  CHECK_FALSE(*second.result);
  CHECK(bucket.rate() == weir::unlimited);
  CHECK(bucket.try_acquire(1'000'000'000));
  CHECK(bucket.time_until(1'000'000'000) == 0ns);
  CHECK(bucket.available() == std::numeric_limits<std::uint64_t>::max());
  bucket.pause_until(clock_type::now() + 1h);  // the limit is off: nothing holds it
  CHECK(bucket.try_acquire());

  bucket.set_rate(weir::per_second(1));
  CHECK(bucket.available() == 2);
  CHECK(bucket.try_acquire(2));
  CHECK_FALSE(bucket.try_acquire());
  // A pause from before the limit was switched off does not come back with it.
  bucket.pause_until(clock_type::now() + 1h);
  bucket.set_rate(weir::unlimited);
  bucket.set_rate(weir::per_second(1));
  bucket.set_burst(2);
  CHECK(bucket.available() == 2);

  bucket_type open(io.get_executor(), {.rate = weir::unlimited, .burst = 1});
  acquisition now;
  open.async_acquire(1000, now.handler());
  run_ready(io);
  REQUIRE(now.result);
  CHECK_FALSE(*now.result);
}

TEST_CASE("a rate of zero is invalid_argument, pointing to pause_until and weir::unlimited",
          "[token_bucket][issue35]") {
  asio::io_context io;
  CHECK_THROWS_WITH(bucket_type(io.get_executor(), {.rate = weir::per_second(0), .burst = 1}),
                    Catch::Contains("token_bucket: rate is 0/s") &&
                        Catch::Contains("pause_until") && Catch::Contains("weir::unlimited"));
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  CHECK_THROWS_AS(bucket.set_rate(weir::per_second(0)), weir::exception);
  CHECK(bucket.rate().per_second == Approx(1));  // the refused change left the bucket as it was
}

TEST_CASE("pause_until holds the bucket empty until the given moment", "[token_bucket]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(10), .burst = 10});
  bucket.pause_until(clock_type::now() + 20s);
  CHECK(bucket.time_until(1) == 20s);
  clock_type::advance(20s);
  CHECK(bucket.try_acquire());
}

TEST_CASE("a 4-thread io_context hammering one bucket admits exactly the allowed number",
          "[token_bucket][concurrency]") {
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

TEST_CASE("a token_bucket stage gives back the unit of a call an inner stage refused",
          "[token_bucket][pipeline]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  weir::request_queue full(io.get_executor(), {.max_concurrent = 1, .max_queued = 0});
  auto held = full.try_admit();
  auto guarded = weir::pipeline(bucket.stage(), full);
  weir_test::finished<int> refused;
  refused.start(io, guarded([] { return []() -> asio::awaitable<int> { co_return 1; }(); }));
  run_ready(io);
  CHECK(refused.code() == weir::error::queue_full);
  // The refused call was never sent: its unit is back, so the next call need not wait 1 s.
  CHECK(bucket.try_acquire(1, clock_type::now()));
}

TEST_CASE("a token_bucket refund releases the first waiter earlier, in order", "[token_bucket]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 1});
  REQUIRE(bucket.try_acquire(1, clock_type::now()));
  acquisition first, second;
  bucket.async_acquire(1, first.handler());
  bucket.async_acquire(1, second.handler());
  run_ready(io);
  CHECK_FALSE(first.result);
  bucket.settle(1, 0, clock_type::now());  // the unit taken comes back: first is due now
  run_ready(io);
  REQUIRE(first.result);
  CHECK_FALSE(*first.result);
  CHECK_FALSE(second.result);
  advance<clock_type>(io, 999ms);
  CHECK_FALSE(second.result);
  advance<clock_type>(io, 1ms);  // at 1 s instead of 2 s
  REQUIRE(second.result);
  CHECK_FALSE(*second.result);
}
