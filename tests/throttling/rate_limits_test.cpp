// Specifications of weir/throttling/rate_limits.hpp, on virtual time.
#include "../support/throttling.hpp"

// ---- rate_limits ----------------------------------------------------------------------------

using limits_type = weir::rate_limits<clock_type>;

TEST_CASE("waiters woken by the bucket's timer while others are cancelled on other threads",
          "[rate_limits][concurrency]") {
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

TEST_CASE("set_limit: a slower rate holds from the next request; a pause is left as it is",
          "[rate_limits]") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  REQUIRE(limits.try_acquire({.requests = 1}));
  limits.set_limit(weir::dimension::requests, {weir::per_second(5), 1});
  CHECK(limits.time_until({.requests = 1}) == 200ms);  // one new interval after the last
  limits.pause_until(weir::dimension::requests, clock_type::now() + 5s);
  limits.set_limit(weir::dimension::requests, {weir::per_second(4), 1});
  CHECK(limits.time_until({.requests = 1}) == 5s);  // exactly as the server said
}

TEST_CASE("set_limit: a spent burst cut smaller is owed, or forgiven when asked", "[rate_limits]") {
  asio::io_context io;
  const weir::limit ten_seconds{weir::per_second(1000), 10'000}, one{weir::per_second(1000), 1'000};
  limits_type owed(io.get_executor(), {.tokens = ten_seconds});
  limits_type forgiven(io.get_executor(), {.tokens = ten_seconds});
  for (auto* l : {&owed, &forgiven}) REQUIRE(l->try_acquire({.requests = 1, .tokens = 10'000}));
  owed.set_limit(weir::dimension::tokens, one);
  forgiven.set_limit(weir::dimension::tokens, one, clock_type::now(), weir::spent_burst::forgiven);
  CHECK(owed.time_until({.requests = 1, .tokens = 500}) == 9'500ms);    // paid back first
  CHECK(forgiven.time_until({.requests = 1, .tokens = 500}) == 500ms);  // as empty as it can be
  // Half of a burst spent, then a burst smaller than that half: as spent as the new one allows.
  clock_type::advance(10s);
  REQUIRE(forgiven.try_acquire({.requests = 1, .tokens = 500}));
  forgiven.set_limit(weir::dimension::tokens, {weir::per_second(1000), 400}, clock_type::now(),
                     weir::spent_burst::forgiven);
  CHECK(forgiven.time_until({.requests = 1, .tokens = 100}) == 100ms);
  // A debt past the old burst is the usage's: forgiving a burst does not forgive it.
  clock_type::advance(10s);
  REQUIRE(forgiven.try_acquire({.requests = 1, .tokens = 400}));
  forgiven.settle({.requests = 1, .tokens = 400}, {.requests = 1, .tokens = 2'400});
  forgiven.set_limit(weir::dimension::tokens, {weir::per_second(1000), 200}, clock_type::now(),
                     weir::spent_burst::forgiven);
  CHECK(forgiven.time_until({.requests = 1, .tokens = 100}) == 2'300ms);
}

TEST_CASE("request and token limits are reserved together or not at all", "[rate_limits]") {
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

TEST_CASE("separate input and output token limits bind independently", "[rate_limits]") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {.input_tokens = weir::limit::per_minute(60'000, 1000),
                                         .output_tokens = weir::limit::per_minute(6'000, 100)});
  CHECK(limits.try_acquire({.requests = 1, .input_tokens = 1000, .output_tokens = 10}));
  CHECK_FALSE(limits.try_acquire({.requests = 1, .input_tokens = 0, .output_tokens = 100}));
  CHECK(limits.time_until({.requests = 1, .input_tokens = 0, .output_tokens = 100}) == 100ms);
}

TEST_CASE("settle refunds an overestimate and charges an underestimate exactly", "[rate_limits]") {
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

TEST_CASE("in a pipeline, a failure that reports no usage gives its tokens back, not its request",
          "[rate_limits]") {
  // The rule the router settles by too (detail::settled_usage): a timeout or a refusal used no
  // tokens at the provider, so its estimate does not hold the next calls back.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(600, 10),
                                         .tokens = weir::limit::per_minute(60'000, 1000)});
  auto guarded = weir::pipeline(limits);
  const auto call = [&](bool fail) {
    weir::basic_call_context<clock_type> ctx{.tokens = 800};
    weir_test::finished<int> f;
    f.start(io, guarded(ctx, [fail]() -> asio::awaitable<int> {
              if (fail) throw weir::exception(weir::error::timeout, "no answer");
              co_return 1;
            }));
    run_ready(io);
    REQUIRE(f.done);
  };
  call(true);
  CHECK(limits.time_until({.requests = 0, .tokens = 1000}) == 0ms);  // was 800 ms
  CHECK(limits.time_until({.requests = 10, .tokens = 0}) == 100ms);  // the request counts
  call(false);
  CHECK(limits.time_until({.requests = 0, .tokens = 1000}) == 800ms);  // a success keeps it
}

TEST_CASE("a charge counts from when the call was let through, else from now", "[rate_limits]") {
  // 100 tokens a second, a burst of one; calls estimated at 100 that used 300 over 3 s.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.tokens = weir::limit{weir::per_second(100), 1}});
  const weir::usage estimate{.requests = 1, .tokens = 100}, used{.requests = 1, .tokens = 300};
  const weir::usage one{.requests = 0, .tokens = 1};
  const auto let_through = clock_type::now();
  REQUIRE(limits.try_acquire(estimate, let_through));
  clock_type::advance(3s);
  limits.settle(estimate, used, let_through);  // refilled meanwhile: nothing owed
  CHECK(limits.time_until(one) == 0s);

  REQUIRE(limits.try_acquire(estimate));
  clock_type::advance(3s);
  limits.settle(estimate, used);  // from now: 2 s owed
  CHECK(limits.time_until(one) == 2s);
}

TEST_CASE("a refund goes to the waiter at the head of the queue", "[rate_limits]") {
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

TEST_CASE("a request given back lets the next waiter go at once, and the pace holds after it",
          "[rate_limits]") {
  // One request a second with no burst: the call let through at 0 s failed before the server
  // counted it, and its answer came at 0.3 s. The first waiter goes then, not at 0 s (that would
  // put it one second before the second waiter); the second a second later.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(1), 1}});
  REQUIRE(limits.try_acquire({.requests = 1}));
  acquisition first, second;
  limits.async_acquire({.requests = 1}, first.handler());
  limits.async_acquire({.requests = 1}, second.handler());
  const auto sent = clock_type::now();
  advance<clock_type>(io, 300ms);
  CHECK_FALSE(first.result);
  limits.give_back(weir::dimension::requests, 1, sent);
  run_ready(io);
  REQUIRE(first.result);
  CHECK(first.waited == 300ms);
  advance<clock_type>(io, 999ms);
  CHECK_FALSE(second.result);
  advance<clock_type>(io, 1ms);
  REQUIRE(second.result);
  CHECK(second.waited == 1300ms);
  // When the first waiter's call fails (sent at 0.3 s, answered at 1.4 s), the second has gone
  // since: nothing is given back (the third would go right after the second).
  acquisition third;
  limits.async_acquire({.requests = 1}, third.handler());
  advance<clock_type>(io, 100ms);
  limits.give_back(weir::dimension::requests, 1, sent + 300ms);
  run_ready(io);
  CHECK_FALSE(third.result);
  // With nobody waiting, a slot given back is room from now, never more than a full burst.
  advance<clock_type>(io, 10s);
  limits.give_back(weir::dimension::requests, 1, clock_type::now());
  CHECK(limits.try_acquire({.requests = 1}));
  const auto last = clock_type::now();
  CHECK_FALSE(limits.try_acquire({.requests = 1}));
  advance<clock_type>(io, 200ms);
  limits.give_back(weir::dimension::requests, 1, last);
  CHECK(limits.try_acquire({.requests = 1}));
  CHECK_FALSE(limits.try_acquire({.requests = 1}));
  // Never into a pause (the server said nothing is left until then): a call sent just before a
  // pause of 0.6 s and failed 0.1 s into it gives its slot back from the pause's end, not now.
  advance<clock_type>(io, 2s);
  const auto before_pause = clock_type::now();
  REQUIRE(limits.try_acquire({.requests = 1}));
  limits.pause_until(weir::dimension::requests, before_pause + 600ms);
  advance<clock_type>(io, 100ms);
  CHECK(limits.give_back(weir::dimension::requests, 1, before_pause));
  CHECK(limits.time_until({.requests = 1}) == 500ms);
}

TEST_CASE("rate_limits waiters are FIFO, cancellable and bounded by max_wait", "[rate_limits]") {
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

TEST_CASE("a request above the token burst waits for room instead of being refused",
          "[rate_limits]") {
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

TEST_CASE("a call estimated at zero tokens waits behind a token debt and reserves what calls use",
          "[rate_limits]") {
  // 100 tokens a second, one at a time: a call that used 500 tokens more than it said leaves a
  // debt of 5 s. Before, 1 000 calls estimated at zero were all admitted at once, each settled
  // at 500, and left 5 000 s of debt.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.tokens = weir::limit{weir::per_second(100), 1}});
  const weir::usage zero{.requests = 1, .tokens = 0};
  const weir::usage used{.requests = 1, .tokens = 500};
  limits.settle(zero, used);
  CHECK_FALSE(limits.try_acquire(zero));
  CHECK(limits.time_until(zero) == 5s);  // the debt, then 500 tokens: what such calls use

  // 1 000 callers, each estimating zero and settling at 500 when admitted, for a minute.
  int admitted = 0;
  for (int i = 0; i < 1000; ++i)
    limits.async_acquire(zero, [&](weir::error_code ec, std::chrono::nanoseconds) {
      if (ec) return;
      ++admitted;
      limits.settle(zero, used);
    });
  advance<clock_type>(io, 60s);
  CHECK(admitted >= 11);
  CHECK(admitted <= 13);  // one per 5 s: 500 tokens at 100 a second
  // A zero estimate with no usage learnt yet still waits for a debt to be paid.
  limits_type unknown(io.get_executor(), {.tokens = weir::limit{weir::per_second(100), 1}});
  CHECK(unknown.try_acquire({.requests = 1, .tokens = 500}));  // above the burst: into debt
  CHECK(unknown.time_until(zero) == 5s - 10ms);
}
