// Specifications of weir/redis/rate_limiter.hpp, against a real redis-server.
#include <weir/composition/pipeline.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/redis/keyed_rate_limiter.hpp>
#include <weir/redis/rate_limiter.hpp>

#include "../support/redis.hpp"

#include <atomic>
#include <cstdio>
#include <memory>
#include <numeric>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

TEST_CASE("the shared limiter admits a burst, then refuses, and a settle gives back") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = WEIR_REDIS_PORT});
    weir::redis::rate_limiter<> shared(ex, redis,
                                       {.name = unique_name("basic"),
                                        .requests = weir::limit{weir::per_minute(1), 3},
                                        .tokens = weir::limit{weir::per_minute(1), 1000}});
    // Each result is taken out of the co_await before it is checked: g++ 12 may evaluate a
    // co_await inside Catch's assertion macros more than once.
    int admitted = 0;
    for (int i = 0; i < 5; ++i) {
      const bool ok =
          co_await shared.async_try_acquire({.requests = 1, .tokens = 100}, asio::use_awaitable);
      admitted += ok;
    }
    CHECK(admitted == 3);
    CHECK(shared.mode() == weir::redis::limiter_mode::shared);
    // Tokens alone: 700 left, so 800 is refused and nothing is charged for it.
    const bool too_many =
        co_await shared.async_try_acquire({.requests = 0, .tokens = 800}, asio::use_awaitable);
    CHECK_FALSE(too_many);
    const bool the_rest =
        co_await shared.async_try_acquire({.requests = 0, .tokens = 700}, asio::use_awaitable);
    CHECK(the_rest);
    co_await shared.async_settle({.requests = 1, .tokens = 100}, {.requests = 0, .tokens = 0},
                                 asio::use_awaitable);
    const bool refunded =
        co_await shared.async_try_acquire({.requests = 1, .tokens = 100}, asio::use_awaitable);
    CHECK(refunded);
    const bool after =
        co_await shared.async_try_acquire({.requests = 1, .tokens = 0}, asio::use_awaitable);
    CHECK_FALSE(after);
    bool oversized = false;
    try {
      co_await shared.async_try_acquire({.requests = 4}, asio::use_awaitable);
    } catch (const boost::system::system_error& e) {
      oversized = e.code() == weir::error::invalid_argument;
    }
    CHECK(oversized);
  });
}

TEST_CASE(
    "asio::use_awaitable.as_default_on rebinds a shared limiter and a keyed one, state shared") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = WEIR_REDIS_PORT});
    weir::redis::rate_limiter<> shared(
        ex, redis,
        {.name = unique_name("rebound"), .requests = weir::limit{weir::per_minute(1), 1}});
    weir::redis::keyed_rate_limiter<> keyed(
        ex, redis,
        {.each = {.name = unique_name("rebound-keys"),
                  .requests = weir::limit{weir::per_minute(1), 1}}});
    auto awaiting = asio::use_awaitable.as_default_on(shared);
    auto awaiting_keyed = asio::use_awaitable.as_default_on(keyed);
    using awaiting_executor = asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>;
    static_assert(
        std::is_same_v<decltype(awaiting),
                       weir::redis::rate_limiter<std::chrono::steady_clock, awaiting_executor>>);
    static_assert(std::is_same_v<
                  decltype(awaiting_keyed),
                  weir::redis::keyed_rate_limiter<std::chrono::steady_clock, awaiting_executor>>);
    // No token named: the rebound copies' operations default to use_awaitable.
    const bool first = co_await awaiting.async_try_acquire({.requests = 1});
    const bool second = co_await shared.async_try_acquire({.requests = 1}, asio::use_awaitable);
    CHECK(first);
    CHECK_FALSE(second);  // one limit: the copy took its only unit
    CHECK(awaiting.name() == shared.name());
    const bool keyed_first = co_await awaiting_keyed.async_try_acquire("acme", {.requests = 1});
    CHECK(keyed_first);
    CHECK(keyed.size() == 1);  // the key's limiter is the original's too
  });
}

TEST_CASE("the shared limiter is a pipeline stage, as the local limits are", "[pipeline]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = WEIR_REDIS_PORT});
    weir::redis::rate_limiter<> shared(ex, redis,
                                       {.name = unique_name("stage"),
                                        .requests = weir::limit{weir::per_minute(1), 2},
                                        .tokens = weir::limit{weir::per_minute(1), 1000}});
    auto guarded = weir::pipeline(weir::circuit_breaker<>(), shared);
    int sent = 0;
    const auto call = [&](weir::call_context& ctx, std::uint64_t used) -> asio::awaitable<int> {
      ++sent;
      ctx.actual_tokens = used;
      co_return 200;
    };

    // 600 tokens estimated, 100 used: the stage settles the difference back to Redis.
    weir::call_context first{.tokens = 600};
    const int status = co_await guarded(first, [&] { return call(first, 100); });
    CHECK(status == 200);

    // 800 fit only once the 500 are back (the settle runs in the background): look until then.
    asio::steady_timer pause(ex);
    bool admitted = false;
    for (int look = 0; look < 200 && !admitted; ++look) {
      const bool now =
          co_await shared.async_try_acquire({.requests = 0, .tokens = 800}, asio::use_awaitable);
      admitted = now;
      if (!admitted) {
        pause.expires_after(10ms);
        co_await pause.async_wait(asio::use_awaitable);
      }
    }
    CHECK(admitted);

    // One request left; then a call whose deadline the wait would pass is refused at once,
    // locally, and never sent.
    weir::call_context second{.tokens = 0};
    co_await guarded(second, [&] { return call(second, 0); });
    weir::call_context third{.tokens = 0, .deadline = std::chrono::steady_clock::now() + 5s};
    bool refused = false;
    try {
      co_await guarded(third, [&] { return call(third, 0); });
    } catch (const weir::exception& e) {
      refused = e.code() == weir::error::rate_limited && e.refused_locally();
    }
    CHECK(refused);
    CHECK(sent == 2);
  });
}

namespace {

// Runs one worker process per entry of `members` (callers, share weight) against a limit of 100
// requests/s for `seconds`, all from the same moment; what each was admitted.
std::vector<long> run_fleet(const std::vector<std::pair<int, int>>& members, int seconds,
                            int lease) {
  const auto name = unique_name("fleet");
  const auto start = std::chrono::duration_cast<std::chrono::milliseconds>(
                         (std::chrono::system_clock::now() + 1s).time_since_epoch())
                         .count();
  std::vector<FILE*> workers;
  for (const auto& [callers, weight] : members)
    workers.push_back(
        ::popen(fmt::format("{} {} {} {} {} {} {} {}", WEIR_REDIS_WORKER, WEIR_REDIS_PORT, name,
                            start, seconds, lease, callers, weight)
                    .c_str(),
                "r"));
  std::vector<long> each;
  for (auto* f : workers) {
    REQUIRE(f);
    long n = -1;
    CHECK(std::fscanf(f, "%ld", &n) == 1);
    CHECK(::pclose(f) == 0);
    each.push_back(n);
  }
  return each;
}

// Jain's fairness index of shares x (relative to weights w): 1 when every x/w is equal, 1/n when
// one member has everything.
double jain(const std::vector<long>& x, const std::vector<double>& w) {
  double sum = 0, squares = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double share = static_cast<double>(x[i]) / w[i];
    sum += share;
    squares += share * share;
  }
  return squares == 0 ? 0 : sum * sum / (static_cast<double>(x.size()) * squares);
}

std::string listed(const std::vector<long>& each) {
  return fmt::format("{}", fmt::join(each, " + "));
}

}  // namespace

TEST_CASE("four saturated processes sharing 100 requests/s for 10 s get 1000 within 2%, evenly",
          "[fleet]") {
  for (const int lease : {1, 8}) {
    const auto each = run_fleet({{1, 1}, {1, 1}, {1, 1}, {1, 1}}, 10, lease);
    const long total = std::accumulate(each.begin(), each.end(), 0L);
    const double fairness = jain(each, {1, 1, 1, 1});
    INFO("lease " << lease << ": " << listed(each) << " = " << total << ", Jain " << fairness);
    CHECK(total >= 980);
    CHECK(total <= 1020);
    CHECK(fairness >= 0.95);
  }
}

TEST_CASE("shares are per process, not per caller, and follow the weights", "[fleet]") {
  // 1, 2, 4 and 8 callers: still a quarter each.
  const auto uneven = run_fleet({{1, 1}, {2, 1}, {4, 1}, {8, 1}}, 6, 1);
  const long total = std::accumulate(uneven.begin(), uneven.end(), 0L);
  INFO("callers 1, 2, 4, 8: " << listed(uneven) << " = " << total);
  CHECK(total >= 588);
  CHECK(total <= 612);
  CHECK(jain(uneven, {1, 1, 1, 1}) >= 0.95);

  // Weights 1 and 3, four callers each: a quarter and three quarters.
  const auto weighted = run_fleet({{4, 1}, {4, 3}}, 6, 1);
  const double light = static_cast<double>(weighted[0]), heavy = static_cast<double>(weighted[1]);
  INFO("weights 1 and 3: " << listed(weighted));
  CHECK(light + heavy >= 588);
  CHECK(light + heavy <= 612);
  CHECK(heavy / (light + heavy) == Approx(0.75).margin(0.05));
}

TEST_CASE("a cancelled acquire gives back the slot it reserved", "[fleet]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = WEIR_REDIS_PORT});
    weir::redis::rate_limiter<> shared(
        ex, redis,
        {.name = unique_name("cancel"), .requests = weir::limit{weir::per_minute(1), 1}});
    co_await shared.async_acquire({.requests = 1}, asio::use_awaitable);  // the burst
    // The next slot is a minute away: this acquire reserves it, and is cancelled while waiting.
    asio::cancellation_signal cancel;
    std::optional<boost::system::error_code> ended;
    shared.async_acquire({.requests = 1}, asio::bind_cancellation_slot(
                                              cancel.slot(), [&](boost::system::error_code ec,
                                                                 auto) { ended = ec; }));
    asio::steady_timer pause(ex);
    pause.expires_after(200ms);
    co_await pause.async_wait(asio::use_awaitable);
    cancel.emit(asio::cancellation_type::terminal);
    while (!ended) {
      pause.expires_after(10ms);
      co_await pause.async_wait(asio::use_awaitable);
    }
    CHECK(*ended == asio::error::operation_aborted);
    // Given back, the next free slot is again about a minute away, not two.
    std::chrono::nanoseconds predicted{0};
    // The give-back runs in the background: look until it lands (loosely bounded in time).
    const auto give_up = std::chrono::steady_clock::now() + 15s;
    while (std::chrono::steady_clock::now() < give_up) {
      auto [ec, waited] =
          co_await shared.async_acquire({.requests = 1}, 1ms, asio::as_tuple(asio::use_awaitable));
      CHECK(ec == weir::error::rate_limited);
      predicted = waited;
      if (predicted <= 61s) break;
      pause.expires_after(10ms);
      co_await pause.async_wait(asio::use_awaitable);
    }
    CHECK(predicted > 50s);
    CHECK(predicted <= 61s);
    redis.close();
  });
}

namespace {
// How many EVALSHA calls the server has run (its own count, from INFO commandstats).
long evalsha_calls(int port) {
  std::unique_ptr<FILE, int (*)(FILE*)> out(
      ::popen(fmt::format("redis-cli -p {} info commandstats", port).c_str(), "r"), ::pclose);
  char line[512];
  while (out && std::fgets(line, sizeof line, out.get())) {
    long calls = 0;
    if (std::sscanf(line, "cmdstat_evalsha:calls=%ld", &calls) == 1) return calls;
  }
  return 0;
}
}  // namespace

TEST_CASE("concurrent acquires share script runs, and every admission stays exact", "[fleet]") {
  const long before = evalsha_calls(WEIR_REDIS_PORT);
  int admitted = 0, answered = 0;
  run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = WEIR_REDIS_PORT});
    weir::redis::rate_limiter<> shared(
        ex, redis, {.name = unique_name("batch"), .requests = weir::limit{weir::per_hour(1), 100}});
    constexpr int callers = 256;
    for (int c = 0; c < callers; ++c)
      asio::co_spawn(
          ex,
          [&]() -> asio::awaitable<void> {
            const bool ok = co_await shared.async_try_acquire({.requests = 1}, asio::use_awaitable);
            admitted += ok;
            ++answered;
          },
          asio::detached);
    asio::steady_timer pause(ex);
    while (answered < callers) {
      pause.expires_after(1ms);
      co_await pause.async_wait(asio::use_awaitable);
    }
    redis.close();
  });
  const long scripts = evalsha_calls(WEIR_REDIS_PORT) - before;
  INFO(answered << " answered with " << scripts << " script runs");
  CHECK(answered == 256);
  CHECK(admitted == 100);  // the burst, exactly: batching decides each request as alone
  CHECK(scripts >= 1);
  CHECK(scripts <= 64);  // 256 requests rode in a few batches, not one run each
}

TEST_CASE("a shared limiter used from four threads stays exact", "[fleet][concurrency]") {
  asio::io_context io(4);
  weir::redis::client redis(io.get_executor(), {.port = WEIR_REDIS_PORT});
  weir::redis::rate_limiter<> shared(
      io.get_executor(), redis,
      {.name = unique_name("threads"), .requests = weir::limit{weir::per_hour(1), 100}});
  std::atomic<int> admitted{0}, answered{0};
  constexpr int callers = 256;
  for (int c = 0; c < callers; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          const bool ok = co_await shared.async_try_acquire({.requests = 1}, asio::use_awaitable);
          admitted += ok;
          if (++answered == callers) redis.close();
        },
        asio::detached);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(answered == callers);
  CHECK(admitted == 100);
}

TEST_CASE("a shared limit of zero or weir::unlimited is invalid_argument naming its field",
          "[issue35]") {
  asio::io_context io;
  weir::redis::client redis(io.get_executor(), {.port = WEIR_REDIS_PORT});
  for (const auto r : {weir::per_second(0), weir::unlimited})
    CHECK_THROWS_WITH(weir::redis::rate_limiter<>(
                          io.get_executor(), redis,
                          {.name = unique_name("unlimited"), .requests = weir::limit{r, 1}}),
                      Catch::Contains("redis rate_limiter: requests.rate is"));
}
