// Go's golang.org/x/time/rate test suite (rate_test.go), case by case, on weir's token_bucket with
// explicit virtual times: a referee nobody here wrote. Each TEST_CASE names its Go test. Where
// weir differs by design the case says so in its name and checks weir's answer next to Go's:
//   - a cost above the burst goes into debt (above_burst::debt, the default); the cases that
//     expect Go's refusal run with above_burst::refuse, where the refusal is invalid_argument;
//   - a cancelled waiter gives back every unit and later waiters move up (Go gives back only
//     what no later reservation has counted on, and never moves one);
//   - a change of rate re-times the waiters already queued (Go's reservations keep their time);
//   - time never runs backwards: async_acquire reserves at the clock's now, and an earlier
//     explicit `now` sees the bucket as it was then, less refilled (Go clamps to its last update);
//   - available() counts whole units held, never below zero (Go's TokensAt is fractional and
//     negative in debt);
//   - a rate must be positive, at least one unit per 10^8 s, and the burst at least 1, even with
//     weir::unlimited (Go takes 0, tiny rates and NewLimiter(Inf, 0));
//   - cancellation is per operation (Asio's): there is no context that was cancelled before.
#include "../support/throttling.hpp"

#include <list>

namespace {

// Go's tests count time in steps of d from t0.
constexpr std::chrono::nanoseconds d = 100ms;
clock_type::time_point t(int k) { return clock_type::start_time + k * d; }
int steps_since_t0(clock_type::time_point at) {
  return static_cast<int>((at - clock_type::start_time + d / 2) / d);
}

// Go's AllowN step: at t_k, TokensAt says `tokens` and AllowN(n) answers `ok`. An `ok` of
// `refused` is Go refusing n as above the burst, which weir's refuse mode throws for instead.
struct allow {
  int k;
  double tokens;
  std::uint64_t n;
  bool ok;
};
constexpr bool refused = false;

weir::token_bucket_options go_limiter(double rate, std::uint64_t burst,
                                      weir::above_burst above = weir::above_burst::refuse) {
  return {.rate = weir::per_second(rate), .burst = burst, .above_burst = above};
}

// Go's run(): available() for TokensAt (whole units, 0 in debt), try_acquire at t_k for AllowN.
void run(bucket_type& bucket, const std::vector<allow>& allows) {
  for (std::size_t i = 0; i < allows.size(); ++i) {
    const auto& a = allows[i];
    INFO("step " << i << ": t" << a.k << ", n = " << a.n);
    CHECK(bucket.available(t(a.k)) == static_cast<std::uint64_t>(std::max(a.tokens, 0.0)));
    if (a.n > bucket.burst()) {
      CHECK_FALSE(a.ok);
      CHECK_THROWS_AS(bucket.try_acquire(a.n, t(a.k)), weir::exception);
    } else {
      CHECK(bucket.try_acquire(a.n, t(a.k)) == a.ok);
    }
  }
}

// Go's limiter with reservations: a reservation is a waiter queued by async_acquire at the
// clock's now; the test moves the clock to each step's time.
struct referee {
  explicit referee(weir::token_bucket_options o) : bucket(io.get_executor(), std::move(o)) {}

  struct reservation {
    int act = -1;  // when weir said, on reserving, the units would be there (steps of d)
    acquisition done;
    asio::cancellation_signal cancel;
    clock_type::time_point started;
    // When it was served, in steps of d; -1 if it was not (refused or cancelled).
    int served() const {
      return done.result && !*done.result ? steps_since_t0(started + done.waited) : -1;
    }
  };

  void at(int k) { advance<clock_type>(io, t(k) - clock_type::now()); }

  // Go's reserveN(t_k, n, maxReserve).
  reservation& reserve(int k, std::uint64_t n,
                       std::chrono::nanoseconds max_wait = std::chrono::nanoseconds::max()) {
    at(k);
    const auto act = steps_since_t0(clock_type::now() + bucket.time_until(n));  // may throw
    auto& r = reservations.emplace_back();
    r.started = clock_type::now();
    r.act = act;
    bucket.async_acquire(n, max_wait,
                         asio::bind_cancellation_slot(r.cancel.slot(), r.done.handler()));
    run_ready(io);
    return r;
  }

  // Go's CancelAt(t_k).
  void cancel(reservation& r, int k) {
    at(k);
    r.cancel.emit(asio::cancellation_type::terminal);
    run_ready(io);
  }

  void finish() { advance<clock_type>(io, 100 * d); }

  // Outlives the context, whose shutdown clears the slots of the waits still queued.
  std::list<reservation> reservations;
  asio::io_context io;
  bucket_type bucket;
};

}  // namespace

TEST_CASE("x/time/rate TestLimit: a finite rate is not the unlimited one",
          "[token_bucket][x_time_rate]") {
  CHECK_FALSE(weir::per_second(10) == weir::unlimited);
}

TEST_CASE(
    "x/time/rate TestEvery: a rate given as one unit per interval reads back as its "
    "inverse; differs: a zero or negative interval is no limit in Go, weir::unlimited is "
    "named",
    "[token_bucket][x_time_rate]") {
  asio::io_context io;
  const std::pair<std::chrono::nanoseconds, double> cases[] = {
      {1ns, 1e9}, {1us, 1e6}, {1ms, 1e3},    {10ms, 100}, {100ms, 10},
      {1s, 1},    {2s, 0.5},  {2500ms, 0.4}, {4s, 0.25},  {10s, 0.1},
  };
  for (const auto& [interval, expected] : cases) {
    const weir::rate every{1e9 / static_cast<double>(interval.count())};
    bucket_type bucket(io.get_executor(), {.rate = every, .burst = 1});
    CHECK(bucket.rate().per_second == Approx(expected).epsilon(1e-9));
  }
  // Go's Every(math.MaxInt64 ns), one unit in 292 years, is slower than weir allows.
  CHECK_THROWS_AS(bucket_type(io.get_executor(), {.rate = weir::per_second(1e9 / 9.2e18)}),
                  weir::exception);
}

TEST_CASE("x/time/rate TestLimiterBurst1 (n above the burst refused as invalid_argument)",
          "[token_bucket][x_time_rate]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), go_limiter(10, 1));
  run(bucket, {{0, 1, 1, true},
               {0, 0, 1, false},
               {0, 0, 1, false},
               {1, 1, 1, true},
               {1, 0, 1, false},
               {1, 0, 1, false},
               {2, 1, 2, refused},
               {2, 1, 1, true},
               {2, 0, 1, false}});
}

TEST_CASE(
    "x/time/rate TestLimiterBurst1, differs: with above_burst::debt (the default) a cost "
    "of 2 is taken from the full bucket of 1 and the next unit waits it off",
    "[token_bucket][x_time_rate]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), go_limiter(10, 1, weir::above_burst::debt));
  REQUIRE(bucket.try_acquire(1, t(0)));
  REQUIRE(bucket.try_acquire(1, t(1)));
  CHECK(bucket.try_acquire(2, t(2)));        // Go: false
  CHECK_FALSE(bucket.try_acquire(1, t(2)));  // Go: true
  CHECK_FALSE(bucket.try_acquire(1, t(3)));
  CHECK(bucket.try_acquire(1, t(4)));
}

TEST_CASE("x/time/rate TestLimiterBurst3 (n above the burst refused as invalid_argument)",
          "[token_bucket][x_time_rate]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), go_limiter(10, 3));
  run(bucket, {{0, 3, 2, true},
               {0, 1, 2, false},
               {0, 1, 1, true},
               {0, 0, 1, false},
               {1, 1, 4, refused},
               {2, 2, 1, true},
               {3, 2, 1, true},
               {4, 2, 1, true},
               {4, 1, 1, true},
               {4, 0, 1, false},
               {4, 0, 1, false},
               {9, 3, 3, true},
               {9, 0, 0, true}});
}

TEST_CASE(
    "x/time/rate TestLimiterJumpBackwards, differs: back at t0 after t1 weir sees the "
    "bucket as it was at t0, one unit emptier than Go's (time never runs backwards)",
    "[token_bucket][x_time_rate]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), go_limiter(10, 3));
  run(bucket, {{1, 3, 1, true},
               {0, 1, 1, true},   // Go: 2 tokens
               {0, 0, 1, false},  // Go: 1 token, true
               {0, 0, 1, false},
               {0, 0, 1, false},
               {1, 1, 1, true},
               {1, 0, 1, false},
               {1, 0, 1, false},
               {2, 1, 1, true},
               {2, 0, 1, false},
               {2, 0, 1, false}});
}

TEST_CASE("x/time/rate TestLimiter_noTruncationErrors", "[token_bucket][x_time_rate]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), go_limiter(0.7692307692307693, 1));
  CHECK(bucket.try_acquire());
}

TEST_CASE("x/time/rate TestSimultaneousRequests: 15 threads at once take exactly the burst of 5",
          "[token_bucket][x_time_rate][concurrency]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), go_limiter(1, 5));
  std::atomic<int> admitted{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 15; ++i)
    threads.emplace_back([&] {
      if (bucket.try_acquire()) ++admitted;
    });
  for (auto& th : threads) th.join();
  CHECK(admitted == 5);
}

TEST_CASE("x/time/rate TestLongRunningQPS: one request every 2 ms for 5 s at 100/s, burst 100",
          "[token_bucket][x_time_rate]") {
  asio::io_context io;
  bucket_type bucket(io.get_executor(), go_limiter(100, 100));
  int admitted = 0;
  const auto end = clock_type::now() + 5s;
  while (clock_type::now() < end) {
    if (bucket.try_acquire()) ++admitted;
    clock_type::advance(2ms);
  }
  const double ideal = 100 + 100 * 5.0;
  CHECK(admitted <= static_cast<int>(ideal + 1));
  CHECK(admitted >= static_cast<int>(0.999 * ideal));
  CHECK(admitted == 599);  // exactly: the last request (4.998 s) comes before the 600th unit
}

TEST_CASE("x/time/rate TestSimpleReserve", "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(0, 2).act == 0);
  CHECK(go.reserve(0, 2).act == 2);
  CHECK(go.reserve(3, 2).act == 4);
  go.finish();
  for (const auto& r : go.reservations) CHECK(r.served() == r.act);
}

TEST_CASE(
    "x/time/rate TestMix (n above the burst refused as invalid_argument; TokensAt's -1 is "
    "available() == 0)",
    "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  go.at(0);
  CHECK_THROWS_AS(go.reserve(0, 3), weir::exception);
  CHECK(go.reserve(0, 2).act == 0);
  run(go.bucket, {{1, 1, 2, false}});
  CHECK(go.reserve(1, 2).act == 2);
  run(go.bucket, {{1, -1, 1, false}});
  go.at(3);
  run(go.bucket, {{3, 1, 1, true}});
}

TEST_CASE("x/time/rate TestCancelInvalid: a refused reservation takes and gives back nothing",
          "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(0, 2).act == 0);
  CHECK_THROWS_AS(go.reserve(0, 3), weir::exception);  // nothing to cancel
  CHECK(go.reserve(0, 2).act == 2);
}

TEST_CASE("x/time/rate TestCancelLast", "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(0, 2).act == 0);
  auto& r = go.reserve(0, 2);
  CHECK(r.act == 2);
  go.cancel(r, 1);  // 2 units back
  CHECK(go.reserve(1, 2).act == 2);
  go.finish();
  CHECK(r.served() == -1);
  CHECK(go.reservations.back().served() == 2);
}

TEST_CASE("x/time/rate TestCancelTooLate", "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(0, 2).act == 0);
  auto& r = go.reserve(0, 2);
  CHECK(r.act == 2);
  go.cancel(r, 3);  // served at t2: nothing to give back
  CHECK(r.served() == 2);
  CHECK(go.reserve(3, 2).act == 4);
}

TEST_CASE(
    "x/time/rate TestCancel0Tokens, differs: the cancelled unit comes back and the waiter "
    "behind moves up (t2 to t1), so the next reservation acts at t2, not Go's t3",
    "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(0, 2).act == 0);
  auto& r = go.reserve(0, 1);
  CHECK(r.act == 1);
  auto& behind = go.reserve(0, 1);
  CHECK(behind.act == 2);
  go.cancel(r, 0);                   // Go: 0 tokens back
  CHECK(go.reserve(0, 1).act == 2);  // Go: t3
  go.finish();
  CHECK(behind.served() == 1);
}

TEST_CASE(
    "x/time/rate TestCancel1Token, differs: at t2 the reservation is served, so cancelling "
    "it then gives nothing back (Go's CancelAt at timeToAct still returns 1 token): t5, "
    "not Go's t4",
    "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(0, 2).act == 0);
  auto& r = go.reserve(0, 2);
  CHECK(r.act == 2);
  CHECK(go.reserve(0, 1).act == 3);
  go.cancel(r, 2);
  CHECK(r.served() == 2);
  CHECK(go.reserve(2, 2).act == 5);  // Go: t4
}

TEST_CASE(
    "x/time/rate TestCancelMulti, differs: both cancellations give back every unit and the "
    "waiter between moves up (t4 to t1), so 3 units at t1 act at t4, not Go's t5",
    "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 4));
  CHECK(go.reserve(0, 4).act == 0);
  auto& a = go.reserve(0, 3);
  CHECK(a.act == 3);
  auto& b = go.reserve(0, 1);
  CHECK(b.act == 4);
  auto& c = go.reserve(0, 1);
  CHECK(c.act == 5);
  go.cancel(c, 1);
  go.cancel(a, 1);
  CHECK(go.reserve(1, 3).act == 4);  // Go: t5
  go.finish();
  CHECK(b.served() == 1);
}

TEST_CASE(
    "x/time/rate TestReserveJumpBack, differs: reservations happen at the clock's now; asked "
    "at t0 after t1, weir answers for t0 (t2, Go t1); a refused cost or wait changes nothing",
    "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(1, 2).act == 1);
  CHECK(steps_since_t0(t(0) + go.bucket.time_until(1, t(0))) == 2);  // Go: t1
  CHECK(go.reserve(2, 2).act == 3);  // as Go, with Go's t0 reservation of 1 not taken
  // n above the burst, and a wait beyond maxReserve, leave the bucket as it was.
  CHECK_THROWS_AS(go.reserve(2, 3), weir::exception);
  CHECK(go.bucket.time_until(1) == 2 * d);
  auto& beyond = go.reserve(2, 2, d);
  go.finish();
  REQUIRE(beyond.done.result);
  CHECK(*beyond.done.result == weir::error::rate_limited);
  CHECK(beyond.done.waited == 3 * d);
}

TEST_CASE(
    "x/time/rate TestReserveJumpBackCancel, differs: a cancellation happens at the clock's "
    "now, never at an earlier time; cancelled at t1 the reservation gives back both units",
    "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(1, 2).act == 1);
  auto& r = go.reserve(1, 2);
  CHECK(r.act == 3);
  auto& behind = go.reserve(1, 1);
  CHECK(behind.act == 4);
  go.cancel(r, 1);                   // Go cancels "at t0" and gets 1 token back
  CHECK(go.reserve(1, 2).act == 4);  // as Go, for a different reason: behind moved up to t2
  go.finish();
  CHECK(behind.served() == 2);
}

TEST_CASE(
    "x/time/rate TestReserveSetLimit, differs: the waiter queued before the rate rose to "
    "10/s is re-timed (t4 to t3); the new reservation acts at t4 as in Go",
    "[token_bucket][x_time_rate][issue35]") {
  referee go(go_limiter(5, 2));
  CHECK(go.reserve(0, 2).act == 0);
  auto& queued = go.reserve(0, 2);
  CHECK(queued.act == 4);
  go.at(2);
  go.bucket.set_rate(weir::per_second(10));
  CHECK(go.reserve(2, 1).act == 4);
  go.finish();
  CHECK(queued.served() == 3);  // Go keeps t4
}

TEST_CASE(
    "x/time/rate TestReserveSetBurst, differs only in time: reserved at t3 (not back at t0) "
    "4 units act at t12, as Go's arithmetic at t3 says; the queued waiter keeps t4",
    "[token_bucket][x_time_rate][issue35]") {
  referee go(go_limiter(5, 2));
  CHECK(go.reserve(0, 2).act == 0);
  auto& queued = go.reserve(0, 2);
  CHECK(queued.act == 4);
  go.at(3);
  go.bucket.set_burst(4);
  CHECK(go.reserve(3, 4).act == 12);  // Go, reserving at t0 after SetBurstAt(t3): t9
  go.finish();
  CHECK(queued.served() == 4);
}

TEST_CASE("x/time/rate TestReserveSetLimitCancel", "[token_bucket][x_time_rate][issue35]") {
  referee go(go_limiter(5, 2));
  CHECK(go.reserve(0, 2).act == 0);
  auto& r = go.reserve(0, 2);
  CHECK(r.act == 4);
  go.at(2);
  go.bucket.set_rate(weir::per_second(10));
  go.cancel(r, 2);  // 2 units back
  CHECK(go.reserve(2, 2).act == 3);
}

TEST_CASE("x/time/rate TestReserveMax: a wait beyond max_wait is refused with rate_limited",
          "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 2));
  CHECK(go.reserve(0, 2, d).act == 0);
  CHECK(go.reserve(0, 1, d).act == 1);
  auto& far = go.reserve(0, 1, d);
  REQUIRE(far.done.result);
  CHECK(*far.done.result == weir::error::rate_limited);
  CHECK(far.done.waited == 2 * d);
}

TEST_CASE(
    "x/time/rate TestWaitSimple (exceed-burst is invalid_argument; differs: no context "
    "cancelled beforehand, a wait that need not wait completes)",
    "[token_bucket][x_time_rate]") {
  {
    // "already-cancelled": Asio cancels an operation once it has started; one that finds its
    // units completes at once, and the cancellation that follows finds nothing to cancel.
    referee go(go_limiter(10, 3));
    auto& already = go.reserve(0, 1);
    already.cancel.emit(asio::cancellation_type::terminal);
    run_ready(go.io);
    CHECK(already.served() == 0);  // Go: an error
  }
  referee go(go_limiter(10, 3));
  CHECK_THROWS_AS(go.reserve(0, 4), weir::exception);  // exceed-burst-error
  CHECK(go.reserve(0, 2).act == 0);                    // act-now
  CHECK(go.reserve(0, 3).act == 2);                    // act-later
  go.finish();
  CHECK(go.reservations.back().served() == 2);
}

TEST_CASE("x/time/rate TestWaitCancel: a wait cancelled at t1 gives its 3 units back",
          "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 3));
  CHECK(go.reserve(0, 2).act == 0);
  auto& cancelled = go.reserve(0, 3);
  CHECK(cancelled.act == 2);
  go.cancel(cancelled, 1);
  REQUIRE(cancelled.done.result);
  CHECK(*cancelled.done.result == asio::error::operation_aborted);
  CHECK(go.reserve(1, 2).act == 1);  // act-now-after-cancel
}

TEST_CASE("x/time/rate TestWaitTimeout: a deadline of d refuses a wait of 2d at once",
          "[token_bucket][x_time_rate]") {
  referee go(go_limiter(10, 3));
  CHECK(go.reserve(0, 2, d).act == 0);
  auto& late = go.reserve(0, 3, d);
  REQUIRE(late.done.result);  // at once, at t0
  CHECK(*late.done.result == weir::error::rate_limited);
  CHECK(late.done.waited == 2 * d);
}

TEST_CASE(
    "x/time/rate TestWaitInf: an unlimited bucket admits a cost above its burst at once "
    "(differs: its burst is at least 1, not Go's 0)",
    "[token_bucket][x_time_rate]") {
  asio::io_context io;
  CHECK_THROWS_AS(bucket_type(io.get_executor(), {.rate = weir::unlimited, .burst = 0}),
                  weir::exception);
  referee go({.rate = weir::unlimited, .burst = 1, .above_burst = weir::above_burst::refuse});
  CHECK(go.reserve(0, 3).served() == 0);
}

TEST_CASE(
    "x/time/rate TestZeroLimit, differs: a rate of 0 is invalid_argument (Go: the burst, "
    "then nothing)",
    "[token_bucket][x_time_rate]") {
  asio::io_context io;
  CHECK_THROWS_AS(bucket_type(io.get_executor(), go_limiter(0, 1)), weir::exception);
}

TEST_CASE(
    "x/time/rate TestSetAfterZeroLimit, on the slowest rate weir takes: a drained bucket "
    "raised to 10/s has its next unit 100 ms later",
    "[token_bucket][x_time_rate][issue35]") {
  referee go(go_limiter(1e-8, 1));
  CHECK(go.bucket.try_acquire());
  CHECK_FALSE(go.bucket.try_acquire());
  go.bucket.set_rate(weir::per_second(10));
  CHECK(go.reserve(0, 1).act == 1);  // before issue 35: 10^8 s away
  go.finish();
  CHECK(go.reservations.back().served() == 1);
}

TEST_CASE(
    "x/time/rate TestTinyLimit, differs: 1e-10/s is slower than weir allows "
    "(invalid_argument)",
    "[token_bucket][x_time_rate]") {
  asio::io_context io;
  CHECK_THROWS_AS(bucket_type(io.get_executor(), go_limiter(1e-10, 1)), weir::exception);
}
