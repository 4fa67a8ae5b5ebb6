#include "../support/admission.hpp"

using keyed = weir::keyed_limiter<clock_type>;

TEST_CASE("each key has its own bucket; one key's flood leaves the others full", "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(1), .burst = 2}});
  CHECK(limits.try_acquire("flood"));
  CHECK(limits.try_acquire("flood"));
  CHECK_FALSE(limits.try_acquire("flood"));
  CHECK(limits.time_until("flood") == 1s);
  CHECK(limits.try_acquire("quiet"));
  CHECK(limits.try_acquire("quiet"));
  CHECK(limits.time_until("never-seen") == 0s);
  clock_type::advance(1s);
  CHECK(limits.try_acquire("flood"));
  CHECK_FALSE(limits.try_acquire("flood"));
  CHECK(limits.size() == 2);
}

TEST_CASE("limit_of gives each key its own limit, asked once per key", "[keyed]") {
  asio::io_context io;
  int asked = 0;
  keyed limits(
      io.get_executor(),
      {.limit = {.rate = weir::per_second(1), .burst = 1}, .limit_of = [&](std::string_view key) {
         ++asked;
         return key.starts_with("pro-") ? weir::key_limit{.rate = weir::per_second(10), .burst = 5}
                                        : weir::key_limit{.rate = weir::per_second(1), .burst = 1};
       }});
  int pro = 0, free = 0;
  for (int i = 0; i < 10; ++i) {
    pro += limits.try_acquire("pro-7");
    free += limits.try_acquire("free-3");
  }
  CHECK(pro == 5);
  CHECK(free == 1);
  CHECK(asked == 2);
  CHECK_THROWS_MATCHES(
      keyed(io.get_executor(), {.limit = {.rate = weir::per_second(1), .burst = 0}}),
      weir::exception, Catch::Matchers::Predicate<weir::exception>([](const weir::exception& e) {
        return e.code() == weir::error::invalid_argument;
      }));
}

TEST_CASE("idle keys are dropped and come back full, as if kept", "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(10), .burst = 3}});
  for (int i = 0; i < 1000; ++i) CHECK(limits.try_acquire(fmt::format("tenant-{}", i), 3));
  CHECK(limits.size() == 1000);
  // Each bucket is empty: 300 ms until full again.
  limits.evict_idle();
  CHECK(limits.size() == 1000);
  CHECK_FALSE(limits.try_acquire("tenant-5"));
  clock_type::advance(300ms);
  limits.evict_idle();
  CHECK(limits.size() == 0);
  CHECK(limits.try_acquire("tenant-5", 3));
  CHECK_FALSE(limits.try_acquire("tenant-5"));
}

TEST_CASE("memory stays flat while ten times as many keys pass as fit", "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(),
               {.limit = {.rate = weir::per_second(1000), .burst = 1}, .shards = 4});
  std::size_t largest = 0;
  // One new key per microsecond; each is full again 1 ms later, so about 1000 are live at once.
  for (int i = 0; i < 200'000; ++i) {
    REQUIRE(limits.try_acquire(fmt::format("k{}", i), 1, clock_type::now()));
    clock_type::advance(1us);
    if (i % 1000 == 0) largest = std::max(largest, limits.memory_bytes());
  }
  CHECK(limits.size() < 4 * 1024);
  CHECK(largest < 4 * 2048 * sizeof(weir::detail::key_entry));
}

TEST_CASE("keys longer than the inline room are kept exactly", "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(1), .burst = 1}});
  const std::string a(100, 'a');
  std::string b = a;
  b.back() = 'b';
  CHECK(limits.try_acquire(a));
  CHECK(limits.try_acquire(b));
  CHECK_FALSE(limits.try_acquire(a));
  CHECK(limits.memory_bytes() >= 200);
}

TEST_CASE("async_acquire waits its key's turn, refuses past max_wait, gives back on cancel",
          "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(1), .burst = 1}});
  REQUIRE(limits.try_acquire("a"));

  acquisition first, refused, other;
  limits.async_acquire("a", 1, first.handler());
  limits.async_acquire("a", 1, 500ms, refused.handler());
  limits.async_acquire("b", 1, other.handler());
  run_ready(io);
  CHECK(other.result == weir::error_code());
  CHECK(refused.result == weir::error::rate_limited);
  CHECK(refused.waited == 2s);  // behind the first waiter
  CHECK_FALSE(first.result);
  advance<clock_type>(io, 1s);
  CHECK(first.result == weir::error_code());
  CHECK(first.waited == 1s);

  // A wait cancelled half way returns its unit: the next caller is served when it would have been.
  acquisition cancelled;
  asio::cancellation_signal signal;
  limits.async_acquire("a", 1, asio::bind_cancellation_slot(signal.slot(), cancelled.handler()));
  advance<clock_type>(io, 500ms);
  signal.emit(asio::cancellation_type::partial);
  run_ready(io);
  CHECK(cancelled.result == asio::error::operation_aborted);
  advance<clock_type>(io, 500ms);
  CHECK(limits.try_acquire("a"));
}

TEST_CASE("asio::use_awaitable.as_default_on rebinds a keyed limiter that shares its keys",
          "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(10), .burst = 1}});
  auto awaiting = asio::use_awaitable.as_default_on(limits);
  std::chrono::nanoseconds waited{-1};
  REQUIRE(limits.try_acquire("a"));
  asio::co_spawn(
      io, [&]() -> asio::awaitable<void> { waited = co_await awaiting.async_acquire("a", 1); },
      asio::detached);
  advance<clock_type>(io, 1s);
  CHECK(waited == 100ms);  // behind the unit the original took: one key, one bucket
}

TEST_CASE("settle refunds what a call did not use and charges what it used beyond", "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(100), .burst = 1000}});
  REQUIRE(limits.try_acquire("t", 1000));
  CHECK_FALSE(limits.try_acquire("t", 100));
  limits.settle("t", 1000, 200);  // 800 back
  CHECK(limits.try_acquire("t", 800));
  CHECK_FALSE(limits.try_acquire("t", 1));
  limits.settle("t", 0, 100);  // one more second of debt
  CHECK(limits.time_until("t") == 1s + 10ms);
}

TEST_CASE("as a pipeline stage the key is the call's tenant", "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(1), .burst = 1}});
  auto guarded = weir::pipeline(limits);
  auto call = [] { return []() -> asio::awaitable<int> { co_return 7; }; };
  weir::basic_call_context<clock_type> alice{.tenant = "alice"}, bob{.tenant = "bob"};
  weir_test::finished<int> a1, a2, b1;
  a1.start(io, guarded(alice, call()));
  run_ready(io);
  CHECK(a1.value == 7);
  a2.start(io, guarded(alice, call()));
  b1.start(io, guarded(bob, call()));
  run_ready(io);
  CHECK(b1.value == 7);  // bob is not behind alice
  CHECK_FALSE(a2.done);
  advance<clock_type>(io, 1s);
  CHECK(a2.value == 7);

  // A wait past the deadline is refused at once, saying when the key has room.
  weir::basic_call_context<clock_type> late{.deadline = clock_type::now() + 100ms,
                                            .tenant = "alice"};
  weir_test::finished<int> a3;
  a3.start(io, guarded(late, call()));
  run_ready(io);
  REQUIRE(a3.weir_error());
  CHECK(a3.code() == weir::error::rate_limited);
  CHECK(a3.weir_error()->refused_locally());
}

TEST_CASE("a keyed limiter counting tokens settles the estimate against the usage", "[keyed]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_second(100), .burst = 1000},
                                   .counts = weir::counts::tokens});
  auto guarded = weir::pipeline(limits);
  weir::basic_call_context<clock_type> ctx{.tokens = 900, .tenant = "t"};
  weir_test::finished<int> f;
  f.start(io, guarded(ctx, [&]() -> asio::awaitable<int> {
            ctx.actual_tokens = 100;
            co_return 1;
          }));
  run_ready(io);
  CHECK(f.value == 1);
  CHECK(limits.try_acquire("t", 900));  // 800 of the estimate came back
}

TEST_CASE("four threads on shared keys admit exactly each key's burst", "[keyed][concurrency]") {
  asio::io_context io(4);
  keyed limits(io.get_executor(), {.limit = {.rate = weir::per_hour(1), .burst = 10}, .shards = 8});
  std::atomic<int> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round)
        for (int k = 0; k < 500; ++k)
          if (limits.try_acquire(fmt::format("key-{}", (k * 7 + t) % 500))) admitted.fetch_add(1);
    });
  for (auto& t : threads) t.join();
  CHECK(admitted.load() == 500 * 10);
  CHECK(limits.size() == 500);
}

// Issue 35: the rules token_bucket has for a cost above the burst, no limit and a rate of zero.
TEST_CASE("a keyed limiter with above_burst::refuse refuses a cost above the key's burst",
          "[keyed][issue35]") {
  asio::io_context io;
  keyed refusing(io.get_executor(), {.limit = {.rate = weir::per_second(5), .burst = 3},
                                     .above_burst = weir::above_burst::refuse});
  CHECK_THROWS_WITH(refusing.try_acquire("a", 4),
                    Catch::Contains("cost 4 is above the key's burst 3"));
  acquisition a;
  CHECK_THROWS_AS(refusing.async_acquire("a", 4, a.handler()), weir::exception);
  CHECK(refusing.try_acquire("a", 3));  // nothing was taken
  keyed indebted(io.get_executor(), {.limit = {.rate = weir::per_second(5), .burst = 3}});
  CHECK(indebted.try_acquire("a", 4));  // the default: from a full bucket, into debt
  CHECK(indebted.time_until("a") == 400ms);
}

TEST_CASE("a key whose limit is weir::unlimited is admitted at once, whatever the cost",
          "[keyed][issue35]") {
  asio::io_context io;
  keyed limits(io.get_executor(), {.limit_of =
                                       [](std::string_view key) {
                                         return key == "internal"
                                                    ? weir::key_limit{.rate = weir::unlimited}
                                                    : weir::key_limit{.rate = weir::per_second(1)};
                                       },
                                   .above_burst = weir::above_burst::refuse});
  for (int i = 0; i < 100; ++i) CHECK(limits.try_acquire("internal", 1000));
  CHECK(limits.time_until("internal", 1'000'000) == 0ns);
  acquisition a;
  limits.async_acquire("internal", 5, a.handler());
  run_ready(io);
  REQUIRE(a.result);
  CHECK_FALSE(*a.result);
  CHECK(limits.try_acquire("customer"));
  CHECK_FALSE(limits.try_acquire("customer"));
}

TEST_CASE("a keyed limiter's rate of zero is invalid_argument", "[keyed][issue35]") {
  asio::io_context io;
  CHECK_THROWS_AS(keyed(io.get_executor(), {.limit = {.rate = weir::per_second(0), .burst = 1}}),
                  weir::exception);
  keyed limits(io.get_executor(), {.limit_of = [](std::string_view) { return weir::key_limit{}; }});
  CHECK_THROWS_AS(limits.try_acquire("a"), weir::exception);
}
