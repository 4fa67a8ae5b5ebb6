// Across components: every kind of wait cancelled, io_contexts destroyed mid-flight, soaks.
#include "../support/routing.hpp"

// ---- reliability: cancellation, shutdown, soak -------------------------------------------------

#include <weir/weir.hpp>

#include <malloc.h>

namespace {

// Whether an exception_ptr holds a cancellation.
bool aborted(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return x.code() == asio::error::operation_aborted;
  } catch (...) {
    return false;
  }
}

// Spawns `a` with a cancellation slot; counts completions and remembers whether it was aborted.
struct cancellable {
  asio::cancellation_signal signal;
  int completions = 0;
  bool was_aborted = false;

  template <class Awaitable>
  void spawn(asio::io_context& io, Awaitable a) {
    asio::co_spawn(
        io, std::move(a),
        asio::bind_cancellation_slot(signal.slot(), [this](std::exception_ptr e, auto...) {
          ++completions;
          was_aborted = e && aborted(e);
        }));
  }
  void cancel() { signal.emit(asio::cancellation_type::terminal); }
};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int soak_calls = 100'000;  // sanitizers are ten times slower; the shape is the same
#else
constexpr int soak_calls = 1'000'000;
#endif

// Bytes the C heap has handed out and not taken back (0 under ASan, whose allocator glibc does
// not see: the flatness checks then pass vacuously, and LSan checks for leaks instead).
std::size_t heap_in_use() { return mallinfo2().uordblks; }

}  // namespace

TEST_CASE("cancelling each kind of wait completes it once, aborted, and gives back what it took",
          "[reliability]") {
  asio::io_context io;

  SECTION("a token bucket wait") {
    weir::token_bucket<clock_type> bucket(io.get_executor(),
                                          {.rate = weir::per_second(1), .burst = 1});
    REQUIRE(bucket.try_acquire());
    cancellable wait;
    wait.spawn(io, bucket.async_acquire(1, asio::use_awaitable));
    advance<clock_type>(io, 100ms);
    wait.cancel();
    advance<clock_type>(io, 0ns);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    advance<clock_type>(io, 900ms);
    CHECK(bucket.try_acquire());  // the cancelled wait's token went back
  }
  SECTION("a request queue admission") {
    weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
    auto held = queue.try_admit();
    cancellable wait;
    wait.spawn(io, queue.async_admit(asio::use_awaitable));
    advance<clock_type>(io, 0ns);
    CHECK(queue.queued() == 1);
    wait.cancel();
    advance<clock_type>(io, 0ns);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    CHECK(queue.queued() == 0);
    held.release();
    CHECK(queue.in_flight() == 0);
  }
  SECTION("a retry's backoff") {
    weir::retry<clock_type> retry({.max_attempts = 5, .backoff = weir::backoff::constant(10s)});
    int calls = 0;
    auto failing = [&]() -> asio::awaitable<int> {
      ++calls;
      throw std::runtime_error("transient");
      co_return 0;
    };
    cancellable wait;
    wait.spawn(io, retry(failing));
    advance<clock_type>(io, 5s);
    wait.cancel();
    advance<clock_type>(io, 60s);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    CHECK(calls == 1);
  }
  SECTION("a router waiting for capacity") {
    router_type r(io.get_executor(), two_models(), unpaced());
    provider a, b;
    const auto t0 = clock_type::now();
    for (auto* p : {&a, &b})
      p->script = [t0](const weir::routing::model_spec&, clock_type::time_point now) {
        return now == t0 ? fake_response::too_many(20s) : fake_response::ok();
      };
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    cancellable wait;
    wait.spawn(io, r.route(prompt{}, {}));
    advance<clock_type>(io, 5s);
    CHECK(wait.completions == 0);
    wait.cancel();
    advance<clock_type>(io, 0ns);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    advance<clock_type>(io, 15s);
    CHECK(route_now(io, r).value->route.provider == "a");  // nothing stayed reserved
    CHECK(a.calls() + b.calls() == 3);
  }
}

TEST_CASE("destroying an io_context mid-flight destroys every pending handler, no permit leaked",
          "[reliability]") {
  auto sentinel = std::make_shared<int>(0);
  {
    asio::io_context io;
    weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 8});
    weir::token_bucket<clock_type> bucket(io.get_executor(),
                                          {.rate = weir::per_hour(1), .burst = 1});
    router_type r(io.get_executor(), two_models(), unpaced());
    provider a, b;
    a.script = b.script = [](const weir::routing::model_spec&, clock_type::time_point) {
      return fake_response::too_many(1h);
    };
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    auto held = queue.try_admit();
    REQUIRE(bucket.try_acquire());
    for (int i = 0; i < 3; ++i)
      asio::co_spawn(
          io,
          [&queue, s = sentinel]() -> asio::awaitable<void> {
            auto p = co_await queue.async_admit(asio::use_awaitable);
          },
          asio::detached);
    asio::co_spawn(
        io,
        [&bucket, s = sentinel]() -> asio::awaitable<void> {
          co_await bucket.async_acquire(1, asio::use_awaitable);
        },
        asio::detached);
    asio::co_spawn(
        io,
        [&r, s = sentinel]() -> asio::awaitable<void> {
          // The awaitable first, then co_await: g++ 12 mishandles temporaries with destructors
          // inside a co_await expression (double free).
          auto op = r.route(prompt{}, {});
          co_await std::move(op);
        },
        asio::detached);
    advance<clock_type>(io, 1s);
    CHECK(sentinel.use_count() == 6);  // five waits pending
    CHECK(queue.queued() == 3);
  }
  CHECK(sentinel.use_count() == 1);  // every pending coroutine was destroyed with the context
}

TEST_CASE("soak: a million calls through the full pipeline, memory flat, counts exact",
          "[reliability]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 64, .max_queued = 64});
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.requests = weir::limit{weir::per_second(1e9), 4'000'000}});
  weir::usage_monitor<clock_type> monitor({.window = 1h, .buckets = 60});
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1'000});
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(0ns)});
  weir::metrics counts("soak");
  auto guarded = weir::pipeline(weir::pipeline_options{.watch = counts.observer()}, retry, breaker,
                                limits, monitor, queue);
  int calls = 0, ok = 0;
  std::size_t heap_after_warmup = 0, heap_at_end = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < soak_calls; ++i) {
          if (i == soak_calls / 10) heap_after_warmup = heap_in_use();
          ok += co_await guarded([&]() -> asio::awaitable<int> {
            if (++calls % 10 == 0) throw std::runtime_error("transient");  // every 10th attempt
            co_return 1;
          });
        }
        heap_at_end = heap_in_use();
      },
      asio::detached);
  io.run();
  CHECK(ok == soak_calls);
  const auto m = counts.read();
  CHECK(m.attempts == static_cast<std::uint64_t>(calls));
  CHECK(m.successes == static_cast<std::uint64_t>(soak_calls));
  CHECK(m.failures == m.retries);
  CHECK(m.failures == static_cast<std::uint64_t>(calls - soak_calls));
  CHECK(monitor.totals().requests == static_cast<std::uint64_t>(calls));
  CHECK(queue.in_flight() == 0);
  CHECK(heap_at_end <= heap_after_warmup + 64 * 1024);
}

TEST_CASE("soak: a million routes with fallbacks, memory flat, counts exact", "[reliability]") {
  asio::io_context io;
  options o = unpaced();
  o.fallback_budget.emplace(weir::retry_budget_options{.ratio = 0.5, .reserve = 10});
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  int n = 0;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point) {
    return ++n % 7 == 0 ? fake_response::server_error() : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  int ok = 0, failed = 0;
  std::size_t heap_after_warmup = 0, heap_at_end = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < soak_calls; ++i) {
          if (i == soak_calls / 10) heap_after_warmup = heap_in_use();
          try {
            auto op = r.route(prompt{}, {});  // not inside the co_await: see above
            auto res = co_await std::move(op);
            ok += res.response.status == 200;
          } catch (const weir::exception&) {
            ++failed;
          }
        }
        heap_at_end = heap_in_use();
      },
      asio::detached);
  io.run();
  CHECK(ok == soak_calls);
  CHECK(failed == 0);
  CHECK(a.calls() == static_cast<unsigned>(soak_calls));
  CHECK(b.calls() == a.answered(500));  // each failure fell back exactly once
  CHECK(a.answered(200) + b.answered(200) == static_cast<unsigned>(soak_calls));
  CHECK(heap_at_end <= heap_after_warmup + 64 * 1024);
}

TEST_CASE("a spent fallback budget ends routes with budget_exhausted", "[reliability]") {
  asio::io_context io;
  options o = unpaced();
  o.fallback_budget.emplace(weir::retry_budget_options{.ratio = 0, .reserve = 2, .capacity = 2});
  o.max_attempts = 2;  // each model once: a third attempt would retry a after its backoff
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  a.script = b.script = [](const weir::routing::model_spec&, clock_type::time_point) {
    return fake_response::server_error();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  auto first = route_now(io, r);  // a fails, b (paid from the reserve) fails
  REQUIRE(first.error);
  CHECK(first.error->code() == weir::error::retries_exhausted);
  auto second = route_now(io, r);  // a fails, b paid with the last unit
  auto third = route_now(io, r);   // a fails, nothing left for b
  REQUIRE(third.error);
  CHECK(third.error->code() == weir::error::budget_exhausted);
  CHECK(third.error->attempts() == 1);
  CHECK(a.calls() == 3);
  CHECK(b.calls() == 2);
}
