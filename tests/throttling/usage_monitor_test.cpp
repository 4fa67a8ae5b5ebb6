// Specifications of weir/throttling/usage_monitor.hpp, on virtual time.
#include "../support/throttling.hpp"

// ---- usage_monitor --------------------------------------------------------------------------

using monitor_type = weir::usage_monitor<clock_type>;

TEST_CASE("usage_monitor matches a brute-force reference over a randomized event stream",
          "[usage_monitor]") {
  monitor_type monitor({.window = 10s, .buckets = 20});
  const auto bucket = 500ms;
  struct event {
    clock_type::time_point at;
    weir::usage_record e;
  };
  std::vector<event> all;
  std::mt19937_64 rng(42);
  for (int i = 0; i < 20'000; ++i) {
    clock_type::advance(std::chrono::microseconds(rng() % 20'000));
    weir::usage_record e{.requests = 1 + rng() % 3,
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

TEST_CASE("usage_monitor forgets what left the window, however long it was idle",
          "[usage_monitor]") {
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

TEST_CASE("utilization compares the window with the configured limits", "[usage_monitor]") {
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

TEST_CASE("pacing_delay is zero below the threshold, grows smoothly, and holds a full window",
          "[usage_monitor]") {
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

TEST_CASE("usage_monitor rejects a misconfiguration", "[usage_monitor]") {
  CHECK_THROWS_AS(monitor_type({.window = 0s}), weir::exception);
  CHECK_THROWS_AS(monitor_type({.window = 60s, .buckets = 0}), weir::exception);
  CHECK_THROWS_AS(monitor_type({.requests_limit = weir::per_minute(0)}), weir::exception);
  CHECK_THROWS_AS(monitor_type({.slow_down_above = 1.5}), weir::exception);
}

TEST_CASE("usage_monitor counts exactly under four recording threads",
          "[usage_monitor][concurrency]") {
  monitor_type monitor({.window = 60s, .buckets = 6});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 20'000; ++i) monitor.record({.tokens = 3, .error = i % 2 == 0});
    });
  for (auto& t : threads) t.join();
  CHECK(monitor.totals() == weir::usage_totals{80'000, 240'000, 40'000, 0});
}
