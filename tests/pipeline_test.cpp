// Specifications for composition: order semantics, context, completion tokens, events.
#include <weir/testing/manual_clock.hpp>
#include <weir/timeout.hpp>
#include <weir/weir.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <future>
#include <string>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::run_ready;
using context = weir::basic_call_context<clock_type>;

namespace {
// An operation that fails its first `failures` attempts with a connection reset.
struct flaky {
  int failures = 0;
  int calls = 0;
  asio::awaitable<int> attempt() {
    if (++calls <= failures) throw boost::system::system_error(asio::error::connection_reset);
    co_return calls;
  }
  auto operator()() {
    return [this] { return attempt(); };
  }
};

// Runs `a`, letting `time` pass on the virtual clock, and returns its value if it had one.
template <class Awaitable>
std::optional<int> run_to_end(asio::io_context& io, Awaitable a,
                              std::exception_ptr* error = nullptr, ns time = 10min) {
  std::optional<int> value;
  asio::co_spawn(io, std::move(a), [&](std::exception_ptr e, int v) {
    if (e && error) *error = e;
    if (!e) value = v;
  });
  advance<clock_type>(io, time);
  return value;
}
}  // namespace

TEST_CASE("retry outside the limiter takes a permit for every attempt, inside one for all") {
  clock_type::reset();
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

TEST_CASE("retry outside the queue re-admits per attempt and releases the slot during its wait") {
  clock_type::reset();
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

TEST_CASE("retry outside the breaker waits exactly until it half-opens") {
  clock_type::reset();
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

TEST_CASE("the call context carries tokens to the limits and the monitor, and settles them") {
  clock_type::reset();
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

TEST_CASE("a deadline in the context makes a limiter refuse at once instead of waiting past it") {
  clock_type::reset();
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
    "a full queue rejects through the pipeline with queue_full, and releases nothing it lacks") {
  clock_type::reset();
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 0});
  auto held = queue.try_admit();
  std::exception_ptr error;
  flaky op;
  CHECK_FALSE(run_to_end(io, weir::pipeline(queue)(op()), &error));
  CHECK_THROWS_WITH(std::rethrow_exception(error), Catch::Contains("request queue is full"));
  CHECK(queue.in_flight() == 1);
}

TEST_CASE("a decorator in the middle wraps the policies after it, and pipelines nest") {
  clock_type::reset();
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
  auto inner = weir::pipeline(monitor);
  CHECK(run_to_end(io, weir::pipeline(retry, per_attempt, inner)(hangs_once), nullptr, 3s) == 2);
  // The monitor inside the timeout saw both attempts: the first cancelled by the deadline.
  CHECK(monitor.totals().requests == 2);
  CHECK(monitor.totals().errors == 1);
}

TEST_CASE("events come in order with the right fields, and read as one line each") {
  clock_type::reset();
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(2s)});
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 5});
  auto guarded = weir::pipeline(retry, breaker);
  std::vector<std::string> lines;
  std::vector<weir::event> events;
  guarded.observe([&](const weir::event& e) {
    events.push_back(e);
    lines.push_back(fmt::format("{}", e));
  });
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

TEST_CASE("throttling, rejections and breaker changes are events too") {
  clock_type::reset();
  asio::io_context io;
  weir::token_bucket<clock_type> bucket(
      io.get_executor(), {.rate = weir::per_second(1), .burst = 1, .name = "openai rpm"});
  weir::circuit_breaker<clock_type> breaker(
      {.consecutive_failures = 1, .break_duration = 30s, .name = "openai"});
  auto guarded = weir::pipeline(breaker, bucket);
  std::vector<std::string> lines;
  guarded.observe([&](const weir::event& e) { lines.push_back(fmt::format("{}", e)); });
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

TEST_CASE("async_execute works with callbacks, deferred and use_future") {
  clock_type::reset();
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

TEST_CASE("a pipeline shared by four threads keeps every count exact", "[concurrency]") {
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

// ---- metrics and alerts ---------------------------------------------------------------------

#include <weir/alerts.hpp>
#include <weir/metrics.hpp>

#include <map>
#include <sstream>

namespace {
// Parses the exposition format back: "name{labels}" -> value, checking each line's shape.
std::map<std::string, double> parse_prometheus(const std::string& text) {
  std::map<std::string, double> samples;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) continue;
    const auto space = line.rfind(' ');
    REQUIRE(space != std::string::npos);
    REQUIRE(line.find('{') < space);
    REQUIRE(line[space - 1] == '}');
    samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return samples;
}
}  // namespace

TEST_CASE("metrics count a pipeline's events and read back from Prometheus text") {
  clock_type::reset();
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 0});
  auto guarded = weir::pipeline(retry, queue);
  weir::metrics chat("chat \"primary\"");
  guarded.observe(chat.observer());
  flaky op{.failures = 1};
  CHECK(run_to_end(io, guarded(op())) == 2);
  auto held = queue.try_admit();
  std::exception_ptr refused;
  run_to_end(io, weir::pipeline(queue)(op()), &refused);  // no observer: not counted
  (void)guarded(op());                                    // never started: nothing counted
  flaky full;
  run_to_end(io, guarded(full()), &refused, 0s);  // the queue is full: a rejection, not retried

  const auto m = chat.read();
  CHECK(m.attempts == 2);
  CHECK(m.successes == 1);
  CHECK(m.failures == 1);
  CHECK(m.retries == 1);
  CHECK(m.rejections[static_cast<std::size_t>(weir::rejection::queue_full)] == 1);

  weir::metrics other("other");
  std::string page;
  weir::write_prometheus(page, {&chat, &other});
  const auto samples = parse_prometheus(page);
  const std::string chat_label = R"({pipeline="chat \"primary\""})";
  CHECK(samples.at("weir_attempts_total" + chat_label) == 2);
  CHECK(samples.at("weir_retries_total" + chat_label) == 1);
  CHECK(samples.at("weir_attempts_total{pipeline=\"other\"}") == 0);
  CHECK(samples.at(R"(weir_rejections_total{pipeline="chat \"primary\"",reason="queue_full"})") ==
        1);
  // Per policy, by the names in their options (the defaults here).
  CHECK(samples.at(R"(weir_policy_rejections_total{pipeline="chat \"primary\"",)"
                   R"(policy="request_queue",reason="queue_full"})") == 1);
  CHECK(page.find(R"(weir_breaker_state{pipeline="chat)") == std::string::npos);  // none in it
  CHECK(page.find("# TYPE weir_attempts_total counter\n") != std::string::npos);
  // Latency is a histogram: cumulative buckets, a sum and a count (two attempts finished).
  CHECK(page.find("# TYPE weir_attempt_latency_seconds histogram\n") != std::string::npos);
  CHECK(samples.at("weir_attempt_latency_seconds_count" + chat_label) == 2);
  CHECK(samples.at(
            R"(weir_attempt_latency_seconds_bucket{pipeline="chat \"primary\"",le="+Inf"})") == 2);
  CHECK(m.latency_count == 2);

  // A breaker appears as a state set under its name.
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .name = "openai"});
  auto broken = weir::pipeline(breaker);
  weir::metrics llm("llm");
  broken.observe(llm.observer());
  flaky once{.failures = 1};
  run_to_end(io, broken(once()), &refused);
  std::string breaker_page;
  weir::write_prometheus(breaker_page, {&llm});
  const auto breaker_samples = parse_prometheus(breaker_page);
  CHECK(breaker_samples.at(R"(weir_breaker_state{pipeline="llm",breaker="openai",state="open"})") ==
        1);
  CHECK(breaker_samples.at(
            R"(weir_breaker_state{pipeline="llm",breaker="openai",state="closed"})") == 0);
  REQUIRE(llm.read().policies.size() == 1);
  CHECK(llm.read().policies[0].breaker == weir::breaker_state::open);
}

TEST_CASE("the latency histogram puts each attempt in its bucket, cumulatively in the text") {
  weir::metrics m("llm");
  auto watch = m.observer();
  for (ns latency : {ns(3ms), ns(40ms), ns(40ms), ns(700ms), ns(45s), ns(10min)})
    watch(weir::attempt_succeeded{"chat", 1, latency});
  const auto s = m.read();
  CHECK(s.latency_count == 6);
  CHECK(s.latency_buckets[0] == 1);                            // ≤ 5 ms
  CHECK(s.latency_buckets[3] == 2);                            // ≤ 50 ms
  CHECK(s.latency_buckets[7] == 1);                            // ≤ 1 s
  CHECK(s.latency_buckets[12] == 1);                           // ≤ 60 s
  CHECK(s.latency_buckets[weir::latency_bounds.size()] == 1);  // above 120 s
  std::string page;
  weir::write_prometheus(page, {&m});
  const auto samples = parse_prometheus(page);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="0.005"})") == 1);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="0.05"})") == 3);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="120"})") == 5);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="+Inf"})") == 6);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_sum{pipeline="llm"})") ==
        Approx(0.003 + 0.08 + 0.7 + 45 + 600));
}

TEST_CASE("a 429-ratio alert fires once when it starts and once when it clears, without flapping") {
  clock_type::reset();
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  std::vector<std::pair<std::string, bool>> changes;
  weir::alerts<clock_type> alerts(
      [&](const weir::alert& a) { changes.emplace_back(a.name, a.firing); });
  alerts.rate_limited_above("openai 429s", monitor, 0.05, 20);

  auto second = [&](int requests, int limited) {
    for (int i = 0; i < requests; ++i) monitor.record({.rate_limited = i < limited});
    clock_type::advance(1s);
    alerts.evaluate();
  };
  for (int s = 0; s < 10; ++s) second(10, 0);  // healthy
  CHECK(changes.empty());
  for (int s = 0; s < 10; ++s) second(10, 2);  // 20% of these are 429s: the ratio climbs past 5%
  for (int s = 0; s < 30; ++s) second(10, s % 2);  // hovering near 5%: still firing, no flapping
  CHECK(changes == std::vector<std::pair<std::string, bool>>{{"openai 429s", true}});
  for (int s = 0; s < 120; ++s) second(10, 0);  // the bad minute slides out
  CHECK(changes ==
        std::vector<std::pair<std::string, bool>>{{"openai 429s", true}, {"openai 429s", false}});
}

TEST_CASE("a breaker-open alert fires after 30 s open and clears when it closes") {
  clock_type::reset();
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .break_duration = 10s});
  std::vector<std::pair<bool, double>> changes;
  weir::alerts<clock_type> alerts(
      [&](const weir::alert& a) { changes.emplace_back(a.firing, a.value); });
  alerts.breaker_open_longer("openai down", breaker, 30s);
  breaker.isolate();
  for (int s = 0; s <= 30; ++s) {
    alerts.evaluate();
    clock_type::advance(1s);
  }
  CHECK(changes.empty());  // open exactly 30 s: not longer
  alerts.evaluate();
  REQUIRE(changes.size() == 1);
  CHECK(changes[0].first);
  CHECK(alerts.firing() == std::vector<std::string>{"openai down"});
  breaker.reset();
  alerts.evaluate();
  alerts.evaluate();
  REQUIRE(changes.size() == 2);
  CHECK_FALSE(changes[1].first);
  CHECK_THROWS_AS(alerts.rate_limited_above("bad", weir::usage_monitor<clock_type>(), 1.5),
                  weir::exception);
}
