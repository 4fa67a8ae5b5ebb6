// Specifications of weir/composition/pipeline.hpp: policies composed, on virtual time.
#include "../support/composition.hpp"

TEST_CASE("retry outside the limiter takes a permit for every attempt, inside one for all",
          "[pipeline]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  SECTION("outside") {
    weir::token_bucket<clock_type> bucket(io.get_executor(),
                                          {.rate = weir::per_hour(1), .burst = 10});
    flaky op{.failures = 2};
    CHECK(run_to_end(io, weir::pipeline(retry, bucket)(op())) == 3);
    CHECK(bucket.available() == 7);
  }
  SECTION("inside") {
    weir::token_bucket<clock_type> bucket(io.get_executor(),
                                          {.rate = weir::per_hour(1), .burst = 10});
    flaky op{.failures = 2};
    CHECK(run_to_end(io, weir::pipeline(bucket, retry)(op())) == 3);
    CHECK(bucket.available() == 9);
  }
}

TEST_CASE("retry outside the queue re-admits per attempt and releases the slot during its wait",
          "[pipeline]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
  weir::retry<clock_type> retry({.max_attempts = 2, .backoff = weir::backoff::constant(10s)});
  flaky op{.failures = 1};
  std::optional<int> result;
  asio::co_spawn(io, weir::pipeline(retry, queue)(op()),
                 [&](std::exception_ptr, int v) { result = v; });
  run_ready(io);
  CHECK(queue.in_flight() == 0);  // backing off, it holds no slot
  advance<clock_type>(io, 10s);
  CHECK(result == 2);
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("retry outside the breaker waits exactly until it half-opens", "[pipeline]") {
  asio::io_context io;
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .break_duration = 30s});
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  flaky op{.failures = 1};
  std::vector<ns> attempts;
  const auto t0 = clock_type::now();
  auto timed = [&] {
    attempts.push_back(clock_type::now() - t0);
    return op.attempt();
  };
  CHECK(run_to_end(io, weir::pipeline(retry, breaker)(timed)) == 2);
  // The failure opened the breaker; the retry's next try was refused with retry_after 29 s
  // (it came 1 s into the break), so the call ran again exactly when the breaker half-opened.
  CHECK(attempts == std::vector<ns>{0s, 30s});
  CHECK(breaker.state() == weir::breaker_state::closed);
}

TEST_CASE("a call whose own deadline passes mid-call is no answer to the breaker", "[pipeline]") {
  asio::io_context io;
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .break_duration = 30s});
  auto slow = [&]() -> asio::awaitable<int> {
    asio::basic_waitable_timer<clock_type> timer(co_await asio::this_coro::executor, 2s);
    co_await timer.async_wait(asio::use_awaitable);
    co_return 1;
  };
  weir::basic_call_context<clock_type> context{.deadline = clock_type::now() + 1s};
  std::exception_ptr failure;
  asio::co_spawn(io, weir::pipeline(breaker)(context, slow),
                 [&](std::exception_ptr e, int) { failure = e; });
  advance<clock_type>(io, 2s);
  REQUIRE(failure);
  CHECK_THROWS_MATCHES(std::rethrow_exception(failure), weir::exception,
                       Catch::Matchers::Predicate<weir::exception>([](const weir::exception& x) {
                         return x.code() == weir::error::timeout;
                       }));
  CHECK(breaker.state() == weir::breaker_state::closed);  // the caller gave up, nothing failed
  // A timeout of the breaker's own measure, inside it, is a failure of the provider.
  weir::timeout<clock_type> timeout(1s);
  CHECK_FALSE(run_to_end(io, weir::pipeline(breaker, timeout)(slow)));
  CHECK(breaker.state() == weir::breaker_state::open);
}

TEST_CASE("the call context carries tokens to the limits and the monitor, and settles them",
          "[pipeline]") {
  asio::io_context io;
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.tokens = weir::limit::per_minute(60'000, 10'000)});
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  auto guarded = weir::pipeline(monitor, limits);
  context ctx{.tokens = 4000, .operation = "summarise"};
  auto op = [&]() -> asio::awaitable<int> {
    ctx.actual_tokens = 1500;  // the response said so
    co_return 1;
  };
  CHECK(run_to_end(io, guarded(ctx, op), nullptr, 0s) == 1);
  CHECK(monitor.totals().tokens == 1500);
  CHECK(limits.time_until({.requests = 0, .tokens = 10'000}) == 1500ms);  // settled, not 4000
}

TEST_CASE("a call that used more than it said is charged from when the limits let it through",
          "[pipeline]") {
  // 100 tokens a second with a burst of one; the call, estimated at 100, runs 3 s and uses 300.
  // The limit refilled while it ran, as the server's did: nothing is owed at its end. Settled
  // from its end, as before, the next call waited 2 s, and every underestimated call lost the
  // refill of its own duration.
  clock_type::reset();
  asio::io_context io;
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.tokens = weir::limit{weir::per_second(100), 1}});
  auto guarded = weir::pipeline(limits);
  context ctx{.tokens = 100};
  auto op = [&]() -> asio::awaitable<int> {
    asio::basic_waitable_timer<clock_type> running(co_await asio::this_coro::executor, 3s);
    co_await running.async_wait(asio::use_awaitable);
    ctx.actual_tokens = 300;
    co_return 1;
  };
  CHECK(run_to_end(io, guarded(ctx, op), nullptr, 3s) == 1);
  CHECK(limits.time_until({.requests = 0, .tokens = 1}) == 0s);
}

TEST_CASE("a deadline in the context makes a limiter refuse at once instead of waiting past it",
          "[pipeline]") {
  asio::io_context io;
  weir::token_bucket<clock_type> bucket(io.get_executor(),
                                        {.rate = weir::per_second(1), .burst = 1});
  REQUIRE(bucket.try_acquire());
  context ctx{.deadline = clock_type::now() + 500ms};
  std::exception_ptr error;
  flaky op;
  CHECK_FALSE(run_to_end(io, weir::pipeline(bucket)(ctx, op()), &error));
  try {
    std::rethrow_exception(error);
  } catch (const weir::exception& e) {
    CHECK(e.code() == weir::error::rate_limited);
    CHECK(e.retry_after() == ns(1s));
  }
}

TEST_CASE(
    "a full queue rejects through the pipeline with queue_full, and releases nothing it lacks",
    "[pipeline]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 0});
  auto held = queue.try_admit();
  std::exception_ptr error;
  flaky op;
  CHECK_FALSE(run_to_end(io, weir::pipeline(queue)(op()), &error));
  CHECK_THROWS_WITH(std::rethrow_exception(error), Catch::Contains("request queue is full"));
  CHECK(queue.in_flight() == 1);
}

TEST_CASE("a decorator in the middle wraps the policies after it, and pipelines nest",
          "[pipeline]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  weir::timeout<clock_type> per_attempt(2s);
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  int calls = 0;
  auto hangs_once = [&]() -> asio::awaitable<int> {
    if (++calls == 1) {
      asio::basic_waitable_timer<clock_type> hang(co_await asio::this_coro::executor, 1h);
      co_await hang.async_wait(asio::use_awaitable);
    }
    co_return calls;
  };
  weir::usage_monitor<clock_type> outside({.window = 60s, .buckets = 60});
  auto inner = weir::pipeline(monitor);
  CHECK(run_to_end(io, weir::pipeline(retry, outside, per_attempt, inner)(hangs_once), nullptr,
                   3s) == 2);
  // The monitor inside the timeout saw both attempts, the first cancelled by the timeout: as to
  // the breaker, a cancelled call is no answer, so no error. Outside, the timeout's failure is one.
  CHECK(monitor.totals().requests == 2);
  CHECK(monitor.totals().errors == 0);
  CHECK(outside.totals().requests == 2);
  CHECK(outside.totals().errors == 1);
}

TEST_CASE("events come in order with the right fields, and read as one line each", "[pipeline]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(2s)});
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 5});
  std::vector<std::string> lines;
  std::vector<weir::event> events;
  weir::pipeline_options options;
  options.watch = [&](const weir::event& e) {
    events.push_back(e);
    lines.push_back(fmt::format("{}", e));
  };
  auto guarded = weir::pipeline(options, retry, breaker);
  context ctx{.operation = "chat"};
  auto op = [calls = 0]() mutable -> asio::awaitable<int> {
    if (++calls == 1) throw weir::exception(weir::error::rate_limited, "429", 3s);
    co_return 7;
  };
  CHECK(run_to_end(io, guarded(ctx, op)) == 7);
  CHECK(lines == std::vector<std::string>{
                     "chat: attempt 1 started",
                     "chat: attempt 1 failed (rate-limited) in 0.0 ms",
                     "chat: rate limited by the server, retry after 3000.0 ms",
                     "chat: retry 2 scheduled in 3000.0 ms (rate-limited)",
                     "chat: attempt 2 started",
                     "chat: attempt 2 succeeded in 0.0 ms",
                 });
  REQUIRE(std::holds_alternative<weir::retry_scheduled>(events[3]));
  CHECK(std::get<weir::retry_scheduled>(events[3]).delay == 3s);
}

TEST_CASE("throttling, rejections and breaker changes are events too", "[pipeline]") {
  asio::io_context io;
  weir::token_bucket<clock_type> bucket(
      io.get_executor(), {.rate = weir::per_second(1), .burst = 1, .name = "openai rpm"});
  weir::circuit_breaker<clock_type> breaker(
      {.consecutive_failures = 1, .break_duration = 30s, .name = "openai"});
  std::vector<std::string> lines;
  auto guarded = weir::pipeline(
      weir::pipeline_options{
          .watch = [&](const weir::event& e) { lines.push_back(fmt::format("{}", e)); }},
      breaker, bucket);
  REQUIRE(bucket.try_acquire());
  flaky op{.failures = 5};
  run_to_end(io, guarded(op()), nullptr, 1s);
  run_to_end(io, guarded(op()), nullptr, 0s);
  CHECK(lines == std::vector<std::string>{
                     "call: throttled for 1000.0 ms by openai rpm",
                     "call: attempt 1 started",
                     "call: attempt 1 failed (retryable) in 0.0 ms",
                     "call: circuit breaker closed -> open (openai)",
                     "call: rejected (circuit open) by openai, retry after 30000.0 ms",
                 });
}

TEST_CASE("async_execute works with callbacks, deferred and use_future", "[pipeline]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 2, .backoff = weir::backoff::constant(1s)});
  auto guarded = weir::pipeline(retry);
  std::vector<int> got;
  flaky a{.failures = 1}, b, c;
  guarded.async_execute(io.get_executor(), a(),
                        [&](std::exception_ptr, int v) { got.push_back(v); });
  auto deferred = guarded.async_execute(io.get_executor(), b(), asio::deferred);
  std::move(deferred)([&](std::exception_ptr, int v) { got.push_back(v * 10); });
  auto future = guarded.async_execute(io.get_executor(), c(), asio::use_future);
  advance<clock_type>(io, 5s);
  CHECK(future.get() == 1);
  CHECK(got == std::vector<int>{10, 2});
}

TEST_CASE("a pipeline shared by four threads keeps every count exact", "[pipeline][concurrency]") {
  asio::io_context io(4);
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 4, .max_queued = 10'000});
  weir::usage_monitor<> monitor({.window = 1h, .buckets = 60});
  weir::circuit_breaker<> breaker({.consecutive_failures = 1'000'000});
  weir::retry<> retry({.max_attempts = 2, .backoff = weir::backoff::constant(0ns)});
  auto guarded = weir::pipeline(retry, breaker, monitor, queue);
  std::atomic<int> ok{0};
  for (int i = 0; i < 2000; ++i)
    asio::co_spawn(io, guarded([i, first = true]() mutable -> asio::awaitable<int> {
                     if (std::exchange(first, false) && i % 2)
                       throw std::runtime_error("transient");
                     co_return i;
                   }),
                   [&](std::exception_ptr e, int) { ok += !e; });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(ok == 2000);
  CHECK(monitor.totals().requests == 3000);  // inside the retry: one record per attempt
  CHECK(monitor.totals().errors == 1000);
  CHECK(queue.in_flight() == 0);
}

namespace {
// A reply of 429 is a refusal; anything else is judged as usual.
struct status_429_refuses {
  weir::classification operator()(const weir::outcome<int>& o) const {
    if (o.has_value() && o.value() == 429) return {weir::verdict::rate_limited, {}};
    return weir::default_classifier{}(o);
  }
};
}  // namespace

TEST_CASE(
    "the classifier and the observer are options, and the options' type follows the classifier",
    "[pipeline][retry][circuit_breaker]") {
  static_assert(
      std::is_same_v<decltype(weir::retry(weir::basic_retry_options<status_429_refuses>{})),
                     weir::retry<std::chrono::steady_clock, status_429_refuses>>);
  static_assert(
      std::is_same_v<decltype(weir::circuit_breaker(
                         weir::basic_circuit_breaker_options<status_429_refuses>{})),
                     weir::circuit_breaker<std::chrono::steady_clock, status_429_refuses>>);

  asio::io_context io;
  weir::usage_monitor<clock_type> monitor({.window = 1h, .buckets = 60});
  std::vector<weir::verdict> judged;
  auto guarded = weir::pipeline(
      weir::basic_pipeline_options<status_429_refuses>{
          .watch =
              [&](const weir::event& e) {
                if (const auto* f = std::get_if<weir::attempt_failed>(&e))
                  judged.push_back(f->kind);
              }},
      monitor);
  auto refused = []() -> asio::awaitable<int> { co_return 429; };
  CHECK(run_to_end(io, guarded(refused)) == 429);
  CHECK(judged == std::vector{weir::verdict::rate_limited});
  CHECK(monitor.totals().requests == 1);
  CHECK(monitor.totals().rate_limited == 1);

  // A retry judges with the classifier in its own options.
  weir::retry<clock_type, status_429_refuses> retry(
      {.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  int calls = 0;
  auto refused_twice = [&]() -> asio::awaitable<int> { co_return ++calls < 3 ? 429 : 200; };
  CHECK(run_to_end(io, retry(refused_twice)) == 200);
  CHECK(calls == 3);
}
