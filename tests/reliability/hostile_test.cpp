// Issue 36: hostile servers and careless callers. What a call through the stages must keep when
// deadlines, limits and odd inputs meet at the worst moment.

// ---- 1: a deadline passing as a waiting stage admits -------------------------------------------

TEST_CASE("a deadline passing at the instant the queue admits gives the slot back",
          "[reliability][issue36]") {
  // One slot, held by a call that takes 5 s. A second call waits for it inside a 5 s timeout (or
  // a retry's max_elapsed of 5 s): the slot comes free at the very instant the deadline passes.
  // The second call fails with timeout, and the slot it was handed goes back to the queue.
  auto run = [](auto outer) {
    asio::io_context io;
    weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 10});
    auto five_seconds = [&]() -> asio::awaitable<int> {
      asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor, 5s);
      co_await t.async_wait(asio::use_awaitable);
      co_return 1;
    };
    finished<int> holder, late;
    holder.start(io, weir::pipeline(queue)(five_seconds));
    late.start(io, weir::pipeline(outer, queue)(five_seconds));
    advance<clock_type>(io, 5s);
    REQUIRE(holder.done);
    REQUIRE(late.done);
    CHECK(late.code() == weir::error::timeout);
    CHECK(weir::outcome<int>::from_exception(late.error).refused_locally());
    CHECK(queue.in_flight() == 0);
    finished<int> next;
    next.start(io, weir::pipeline(queue)([] { return value(7); }));
    run_ready(io);
    CHECK(next.value == 7);
  };
  SECTION("a timeout") { run(weir::timeout<clock_type>(5s)); }
  SECTION("a retry's max_elapsed") { run(retry_type({.max_attempts = 3, .max_elapsed = 5s})); }
}

TEST_CASE("a call refused inside a limiter before it was sent gets its reservation back",
          "[reliability][issue36]") {
  // Five requests a minute with a burst of five, around an open breaker: the calls it refuses
  // never reached the provider, so they leave the limiter as they found it.
  asio::io_context io;
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.requests = weir::limit::per_minute(5, 5)});
  breaker_type breaker({.consecutive_failures = 1, .break_duration = 60s});
  auto guarded = weir::pipeline(limits, breaker);
  finished<int> failing;
  failing.start(io, guarded([] { return fail_with(transient()); }));
  run_ready(io);
  REQUIRE(failing.done);
  for (int i = 0; i < 4; ++i) {
    finished<int> refused;
    refused.start(io, guarded([] { return value(1); }));
    run_ready(io);
    REQUIRE(refused.done);
    CHECK(refused.code() == weir::error::circuit_open);
  }
  // 4 of 5 left: only the sent call took one.
  for (int i = 0; i < 4; ++i) CHECK(limits.try_acquire({.requests = 1}));
  CHECK_FALSE(limits.try_acquire({.requests = 1}));
}

// ---- 7: the caller's deadline
// --------------------------------------------------------------------

namespace {
// An operation that counts its calls and fails fast, or hangs for an hour.
struct counted {
  int calls = 0;
  auto failing() {
    return [this] {
      ++calls;
      return fail_with(transient());
    };
  }
  auto hanging() {
    return [this] {
      ++calls;
      return hang();
    };
  }
};
}  // namespace

TEST_CASE("a call whose deadline has passed sends nothing", "[reliability][issue36]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 4, .max_queued = 10});
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.requests = weir::limit::per_minute(600, 10)});
  auto guarded = weir::pipeline(retry_type({.max_attempts = 5}),
                                breaker_type(weir::circuit_breaker_options{}), limits, queue);
  counted op;
  context ctx{.deadline = clock_type::now()};
  finished<int> f;
  f.start(io, guarded(ctx, op.failing()));
  run_ready(io);
  REQUIRE(f.done);
  CHECK(op.calls == 0);
  CHECK(f.code() == weir::error::timeout);
  CHECK(weir::outcome<int>::from_exception(f.error).refused_locally());
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("a retry outside an open breaker gives up at once when half-open is past the deadline",
          "[reliability][issue36]") {
  asio::io_context io;
  breaker_type breaker({.consecutive_failures = 1, .break_duration = 60s});
  auto guarded = weir::pipeline(retry_type({.max_attempts = 5, .max_retry_after = 120s}), breaker);
  counted op;
  finished<int> opening;
  opening.start(io, weir::pipeline(breaker)(op.failing()));
  run_ready(io);
  REQUIRE(breaker.state() == weir::breaker_state::open);

  context ctx{.deadline = clock_type::now() + 50ms};
  finished<int> f;
  f.start(io, guarded(ctx, op.failing()));
  run_ready(io);  // no virtual time passes
  REQUIRE(f.done);
  CHECK(f.code() == weir::error::timeout);
  CHECK(op.calls == 1);  // only the call that opened the breaker
}

TEST_CASE("a retry's backoff that would reach the deadline is not waited",
          "[reliability][issue36]") {
  // Attempts at 0, 1 s and 2 s; the next would be at 3 s, past the deadline at 2.5 s: the call
  // ends at 2 s, the last failure its cause.
  asio::io_context io;
  retry_type retry({.max_attempts = 10, .backoff = weir::backoff::constant(1s)});
  counted op;
  context ctx{.deadline = clock_type::now() + 2500ms};
  finished<int> f;
  f.start(io, weir::pipeline(retry)(ctx, op.failing()));
  advance<clock_type>(io, 2s);
  REQUIRE(f.done);
  CHECK(op.calls == 3);
  CHECK(f.code() == weir::error::timeout);
  REQUIRE(f.weir_error());
  CHECK(f.weir_error()->cause());
}

TEST_CASE("a call still running at its deadline is cancelled then", "[reliability][issue36]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 10});
  counted op;
  context ctx{.deadline = clock_type::now() + 50ms};
  finished<int> f;
  f.start(io,
          weir::pipeline(breaker_type(weir::circuit_breaker_options{}), queue)(ctx, op.hanging()));
  times_out_after(io, f, 50ms);
  CHECK(op.calls == 1);
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("no hedge is sent after the deadline", "[reliability][issue36]") {
  asio::io_context io;
  weir::hedging<clock_type> hedge({.delay = 100ms});
  counted op;
  context ctx{.deadline = clock_type::now() + 50ms};
  finished<int> f;
  f.start(io, weir::pipeline(hedge, retry_type({.max_attempts = 3}))(ctx, op.hanging()));
  times_out_after(io, f, 50ms);
  advance<clock_type>(io, 1s);
  CHECK(op.calls == 1);
}

TEST_CASE("the router sends nothing after the deadline and ends by it", "[reliability][issue36]") {
  asio::io_context io;
  router_type r(io.get_executor(), one_provider({}), unpaced());
  weir::testing::fake_provider<clock_type> a;
  r.connect("a", a.call<prompt>());
  SECTION("passed before the route") {
    finished<weir::routing::routed<fake_response>> f;
    f.start(io, r.route(prompt{}, {.deadline = clock_type::now()}));
    run_ready(io);
    REQUIRE(f.done);
    CHECK(f.code() == weir::error::timeout);
    CHECK(a.calls() == 0);
  }
  SECTION("passing during an attempt") {
    a.latency = 1h;
    finished<weir::routing::routed<fake_response>> f;
    f.start(io, r.route(prompt{}, {.deadline = clock_type::now() + 50ms}));
    advance<clock_type>(io, 50ms);
    REQUIRE(f.done);
    CHECK(a.calls() == 1);
    CHECK(f.weir_error());
  }
}
