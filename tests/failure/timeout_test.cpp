// Specifications of weir/failure/timeout.hpp, on virtual time.
#include "../support/failure.hpp"

// ---- timeout --------------------------------------------------------------------------------

TEST_CASE("a timed-out attempt's operation is really cancelled", "[timeout]") {
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

TEST_CASE("an operation that beats its deadline returns its value", "[timeout]") {
  asio::io_context io;
  weir::timeout<clock_type> limit(5s);
  finished<int> f;
  f.start(io, limit([]() -> asio::awaitable<int> { co_return 42; }));
  run_ready(io);
  CHECK(f.value == 42);
  CHECK_THROWS_AS(weir::timeout<clock_type>(0s), weir::exception);
}

TEST_CASE("a timeout inside a retry bounds each attempt, and the retry tries again", "[timeout]") {
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
          "[timeout][concurrency]") {
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
