// The Redis-backed limiter against a real redis-server on loopback (started by the ctest
// fixture; the outage test starts and kills its own). Real time: Redis keeps its own clock.
#include <weir/composition/pipeline.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/redis/fleet.hpp>
#include <weir/redis/keyed_rate_limiter.hpp>
#include <weir/redis/rate_limiter.hpp>
#include <weir/redis/spend_budget.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>

#include "rig.hpp"

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

std::string unique_name(const char* what) {
  return fmt::format("{}-{}", what, std::chrono::steady_clock::now().time_since_epoch().count());
}

// Runs `body` as a coroutine on a fresh io_context until it ends; rethrows what it threw.
template <class Body>
void run(Body body) {
  asio::io_context io(1);
  std::exception_ptr failure;
  asio::co_spawn(io, body(io.get_executor()), [&](std::exception_ptr e) { failure = e; });
  io.run();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

TEST_CASE("the shared limiter admits a burst, then refuses, and a settle gives back") {
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
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
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
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
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
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

namespace {

// How a limiter rode out a fault: one acquire at a time, the fault on from the first second to
// the second.
struct ride {
  int admitted_shared = 0, admitted_local = 0, unavailable = 0, other_errors = 0;
  std::chrono::steady_clock::duration slowest{};
  std::chrono::duration<double> elapsed{};
  std::chrono::duration<double> recovery{};  // from the end of the fault to the return to Redis
  std::chrono::duration<double> outage{};    // from the start of the fault to the return
  std::vector<std::pair<weir::redis::limiter_mode, weir::redis::limiter_mode>> switches;
  weir::redis::limiter_mode at_end = weir::redis::limiter_mode::closed;
};

constexpr auto fault_timeout = 300ms;

ride ride_out(int port, weir::redis::when_unreachable fallback,
              const std::function<void(bool)>& fault,
              std::vector<std::pair<std::string, int>> sentinels = {},
              std::string primary_name = {}) {
  ride r;
  using clock = std::chrono::steady_clock;
  clock::time_point healed_at{}, faulted_at{};
  run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = port,
                                   .reconnect_min = 50ms,
                                   .reconnect_max = 200ms,
                                   .connect_timeout = fault_timeout,
                                   .command_timeout = fault_timeout,
                                   .sentinels = sentinels,
                                   .primary_name = primary_name});
    weir::redis::rate_limiter<> shared(ex, redis,
                                       {.name = unique_name("fault"),
                                        .requests = weir::limit{weir::per_second(200), 10},
                                        .fallback = fallback,
                                        .local_fraction = 0.5,
                                        .probe_every = 100ms,
                                        .on_mode_change = [&](auto from, auto to) {
                                          r.switches.emplace_back(from, to);
                                          if (to == weir::redis::limiter_mode::shared) {
                                            r.recovery = clock::now() - healed_at;
                                            r.outage = clock::now() - faulted_at;
                                          }
                                        }});
    asio::steady_timer pause(ex);
    const auto t0 = std::chrono::steady_clock::now();
    bool on = false, healed = false;
    // Three seconds, and then until the limiter is back on Redis (a loading server takes its
    // time), within reason.
    const auto going = [&] {
      const auto t = std::chrono::steady_clock::now() - t0;
      return t < 3s || (shared.mode() != weir::redis::limiter_mode::shared && t < 20s);
    };
    while (going()) {
      const auto t = std::chrono::steady_clock::now() - t0;
      if (!on && t > 1s) {
        fault(on = true);
        faulted_at = clock::now();
      }
      if (on && !healed && t > 2s) {
        fault(!(healed = true));
        healed_at = clock::now();
      }
      const auto began = std::chrono::steady_clock::now();
      auto [ec, waited] =
          co_await shared.async_acquire({.requests = 1}, asio::as_tuple(asio::use_awaitable));
      r.slowest = std::max(r.slowest, std::chrono::steady_clock::now() - began);
      if (!ec)
        ++(shared.mode() == weir::redis::limiter_mode::shared ? r.admitted_shared
                                                              : r.admitted_local);
      else if (ec == weir::error::unavailable)
        ++r.unavailable;
      else
        ++r.other_errors;
      if (ec) {
        pause.expires_after(20ms);
        co_await pause.async_wait(asio::use_awaitable);
      }
    }
    r.at_end = shared.mode();
    r.elapsed = std::chrono::steady_clock::now() - t0;
    redis.close();
  });
  return r;
}

// What every fault must come to: no acquire waited much past the timeout (not the kernel's
// minutes), every one ended as admitted or unavailable, the fallback took over while Redis was
// away, and the limiter was back on Redis once it returned.
void check_ride(const ride& r, weir::redis::when_unreachable fallback) {
  INFO("shared " << r.admitted_shared << ", local " << r.admitted_local << ", unavailable "
                 << r.unavailable << ", slowest "
                 << std::chrono::duration_cast<std::chrono::milliseconds>(r.slowest).count()
                 << " ms, back on Redis " << r.recovery.count() * 1000
                 << " ms after the fault ended (" << r.outage.count() * 1000
                 << " ms after it began), "
                 << 200 * r.elapsed.count() + 10 - (r.admitted_shared + r.admitted_local)
                 << " admissions under the quota");
  CHECK(r.other_errors == 0);
  // Never more than the quota (200/s and a burst of 10; the local fallback has half of it).
  CHECK(r.admitted_shared + r.admitted_local <= 200 * r.elapsed.count() + 15);
  // Real time: the bound is loose (a busy machine), and still far from a TCP timeout.
  CHECK(r.slowest < fault_timeout + 2s);
  CHECK(r.admitted_shared > 0);
  REQUIRE(r.switches.size() >= 2);
  CHECK(r.switches.front().first == weir::redis::limiter_mode::shared);
  CHECK(r.switches.back().second == weir::redis::limiter_mode::shared);
  CHECK(r.at_end == weir::redis::limiter_mode::shared);
  if (fallback == weir::redis::when_unreachable::use_local) {
    CHECK(r.unavailable == 0);
    CHECK(r.admitted_local > 0);
  } else {
    CHECK(r.unavailable > 0);
  }
}

constexpr std::array fallbacks{weir::redis::when_unreachable::use_local,
                               weir::redis::when_unreachable::fail_closed};

}  // namespace

TEST_CASE("when Redis goes away the limiter falls back, and returns when it is back", "[faults]") {
  rig::redis_server server(WEIR_REDIS_PORT + 1);
  for (const auto fallback : fallbacks) {
    const auto r = ride_out(server.port(), fallback, [&](bool on) {
      if (on)
        server.stop();
      else
        server.start();
    });
    check_ride(r, fallback);
  }
}

TEST_CASE("a paused Redis (SIGSTOP) costs an acquire at most the command timeout", "[faults]") {
  rig::redis_server server(WEIR_REDIS_PORT + 2);
  for (const auto fallback : fallbacks) {
    const auto r = ride_out(server.port(), fallback, [&](bool on) {
      if (on)
        server.pause();
      else
        server.resume();
    });
    check_ride(r, fallback);
  }
}

TEST_CASE("a black-holed or slow connection costs an acquire at most the command timeout",
          "[faults]") {
  rig::redis_server server(WEIR_REDIS_PORT + 3);
  rig::proxy link(server.port());
  for (const auto fallback : fallbacks) {
    const auto r = ride_out(link.port(), fallback, [&](bool on) { link.black_hole(on); });
    check_ride(r, fallback);
  }
  // Slower than the timeout is as good as gone; a little slow is only slow.
  for (const auto fallback : fallbacks) {
    const auto r =
        ride_out(link.port(), fallback, [&](bool on) { link.delay(on ? fault_timeout * 2 : 0ms); });
    check_ride(r, fallback);
  }
  link.delay(20ms);
  const auto slow = ride_out(link.port(), weir::redis::when_unreachable::fail_closed, [](bool) {});
  CHECK(slow.unavailable == 0);
  CHECK(slow.switches.empty());
}

TEST_CASE("a Redis loading its data after a restart (LOADING) is unavailable until loaded",
          "[faults]") {
  const int port = WEIR_REDIS_PORT + 4;
  const std::string persisted =
      fmt::format("--appendonly no --save '' --dbfilename loading-{}.rdb", port);
  {
    // A dataset that takes a while to load (25 000 keys with a delay per key: about 2 s), while
    // the server answers LOADING at once (it looks at its clients every kilobyte loaded).
    std::remove(fmt::format("{}/loading-{}.rdb", WEIR_REDIS_SCRATCH, port).c_str());
    rig::redis_server seed(port, persisted + " --enable-debug-command yes");
    REQUIRE(rig::shell(fmt::format("redis-cli -p {} debug populate 25000 > /dev/null", port)) == 0);
    REQUIRE(rig::shell(fmt::format("redis-cli -p {} save > /dev/null", port)) == 0);
  }
  for (const auto fallback : fallbacks) {
    std::unique_ptr<rig::redis_server> server =
        std::make_unique<rig::redis_server>(port, persisted);
    while (server->ping().starts_with("LOADING")) std::this_thread::sleep_for(50ms);
    bool saw_loading = false;
    const auto r = ride_out(port, fallback, [&](bool on) {
      if (!on) return;  // loading ends by itself
      server.reset();
      server = std::make_unique<rig::redis_server>(
          port, persisted + " --key-load-delay 10 --loading-process-events-interval-bytes 1024");
      saw_loading = server->ping().starts_with("LOADING");
    });
    CHECK(saw_loading);
    check_ride(r, fallback);
  }
}

TEST_CASE("a cancelled acquire gives back the slot it reserved", "[fleet]") {
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
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
  run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
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

namespace {

using weir::testing::fake_classifier;
using weir::testing::fake_response;
struct prompt {
  std::string text;
};
using fleet_router =
    weir::routing::router<prompt, fake_response, std::chrono::steady_clock, fake_classifier>;

// Two providers with one model each; a is cheaper, so it is chosen first.
weir::routing::catalog fleet_catalog() {
  weir::routing::catalog c;
  c.add(weir::routing::provider_spec{.name = "a"});
  c.add(weir::routing::provider_spec{
      .name = "b", .breaker = {.consecutive_failures = 1, .break_duration = 30s}});
  c.add(weir::routing::model_spec{
      .provider = "a", .id = "a-small", .input_price = 1, .output_price = 2, .capability = 5});
  c.add(weir::routing::model_spec{
      .provider = "b", .id = "b-large", .input_price = 3, .output_price = 6, .capability = 8});
  return c;
}

// One member of a fleet: its own connection, its own view of the fleet, its own router, and
// counts of what reached each provider.
struct member {
  member(asio::any_io_executor ex, const std::string& fleet, int port, bool paced = false)
      : redis(ex, {.port = port, .connect_timeout = 300ms, .command_timeout = 300ms}),
        shared(std::make_shared<weir::redis::fleet_state>(
            redis, weir::redis::fleet_options{.name = fleet})),
        router(ex, fleet_catalog(), options(paced)) {
    for (const char* p : {"a", "b"})
      router.connect(p,
                     [this, p](const weir::routing::model_spec&,
                               const prompt&) -> asio::awaitable<fake_response> {
                       ++sent[p];
                       co_return answer[p];
                     });
  }

  fleet_router::options_type options(bool paced) {
    fleet_router::options_type o;
    if (!paced) o.adaptation.reset();
    o.fleet = shared;
    o.watch = [this](const weir::event& e) {
      if (const auto* f = std::get_if<weir::fleet_connection>(&e))
        reachable.push_back(f->reachable);
    };
    return o;
  }

  // Routes one request; the model that answered, or the error's code.
  asio::awaitable<std::string> ask() {
    prompt p{"hi"};
    try {
      auto r = co_await router.route(p, {.wait_for_capacity = false});
      co_return r.route.model;
    } catch (const weir::exception& e) {
      co_return e.code().message();
    }
  }

  weir::redis::client redis;
  std::shared_ptr<weir::redis::fleet_state> shared;
  fleet_router router;
  std::map<std::string, int> sent;
  std::map<std::string, fake_response> answer{{"a", fake_response::ok()},
                                              {"b", fake_response::ok()}};
  std::vector<bool> reachable;
};

}  // namespace

TEST_CASE("two processes: a 429 seen by one keeps the other off that model", "[fleet]") {
  const auto fleet = unique_name("processes");
  const auto member = [&](const std::string& in, const char* role) {
    std::unique_ptr<FILE, int (*)(FILE*)> out(
        ::popen(fmt::format("{} {} {} {}", WEIR_FLEET_MEMBER, WEIR_REDIS_PORT, in, role).c_str(),
                "r"),
        ::pclose);
    char model[64] = {};
    int reached_a = -1;
    REQUIRE(out);
    CHECK(std::fscanf(out.get(), "%63s %d", model, &reached_a) == 2);
    return std::pair{std::string(model), reached_a};
  };
  // The first hears a's server say its quota is spent, and goes to b.
  CHECK(member(fleet, "a-refuses") == std::pair{std::string("b-large"), 1});
  // The second, a process of its own started afterwards, never sends to a: the fleet told it.
  CHECK(member(fleet, "a-answers") == std::pair{std::string("b-large"), 0});
  // A member of another fleet heard nothing: it sends to a, which answers.
  CHECK(member(fleet + "-other", "a-answers") == std::pair{std::string("a-small"), 1});
}

TEST_CASE("a 429 or an open breaker seen by one member keeps the fleet away", "[fleet]") {
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto fleet = unique_name("routers");
    member first(ex, fleet, WEIR_REDIS_PORT), second(ex, fleet, WEIR_REDIS_PORT);

    // The first member hears a's server say its quota is spent for 30 s, and falls back to b.
    auto spent = fake_response::too_many(30s);
    spent.hint.requests.remaining = 0;
    first.answer["a"] = spent;
    CHECK(co_await first.ask() == "b-large");
    CHECK(first.sent["a"] == 1);

    // The second member's next route skips a without sending there: the fleet told it.
    CHECK(co_await second.ask() == "b-large");
    CHECK(second.sent["a"] == 0);
    CHECK(second.router.status()[0].cooling > 25s);

    // b fails once at the first member: its breaker opens, and the second stays away from b too,
    // so with a cooling everywhere nothing is left for it.
    first.answer["b"] = fake_response::server_error();
    const auto failed = co_await first.ask();
    CHECK(failed != "b-large");
    CHECK(first.router.status()[1].breaker == weir::breaker_state::open);
    asio::steady_timer settle(ex);  // the breaker's news is posted: let it reach Redis
    settle.expires_after(50ms);
    co_await settle.async_wait(asio::use_awaitable);
    const int before = second.sent["b"];
    const auto refused = co_await second.ask();
    CHECK(refused == weir::make_error_code(weir::error::no_provider_available).message());
    CHECK(second.sent["b"] == before);
    CHECK(second.reachable.empty());  // no loss of the fleet was reported
    first.redis.close();
    second.redis.close();
  });
}

TEST_CASE("a member that starts late paces at the limit the fleet learned", "[fleet]") {
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto fleet = unique_name("limits");
    member first(ex, fleet, WEIR_REDIS_PORT, true), second(ex, fleet, WEIR_REDIS_PORT, true);
    auto told = fake_response::ok();
    told.hint.requests.limit = 600;
    told.hint.requests.window = 60s;  // 10 requests a second
    first.answer["a"] = told;
    CHECK(co_await first.ask() == "a-small");
    CHECK(first.router.status()[0].requests_limit == Approx(600));
    CHECK_FALSE(second.router.status()[0].requests_limit.has_value());
    CHECK(second.router.status()[0].discovering);
    CHECK(co_await second.ask() == "a-small");  // its server said nothing; the fleet did
    CHECK(second.router.status()[0].requests_limit == Approx(600));
    CHECK_FALSE(second.router.status()[0].discovering);
    first.redis.close();
    second.redis.close();
  });
}

TEST_CASE("without Redis a router routes on its own state, and says so", "[fleet][faults]") {
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
    rig::redis_server server(WEIR_REDIS_PORT + 5);
    member alone(ex, unique_name("lost"), server.port());
    CHECK(co_await alone.ask() == "a-small");
    server.stop();
    CHECK(co_await alone.ask() == "a-small");  // the fleet is gone; routing is not
    server.start();
    asio::steady_timer pause(ex);
    // Until the client's reconnect backoff lets it look again: bounded by time, loosely.
    const auto give_up = std::chrono::steady_clock::now() + 15s;
    while (alone.reachable.size() < 2 && std::chrono::steady_clock::now() < give_up) {
      CHECK(co_await alone.ask() == "a-small");
      pause.expires_after(20ms);
      co_await pause.async_wait(asio::use_awaitable);
    }
    CHECK(alone.reachable == std::vector<bool>{false, true});
    alone.redis.close();
  });
}

TEST_CASE("with Sentinel the limiter follows a failover to the new primary", "[faults][sentinel]") {
  for (const auto fallback : fallbacks) {
    rig::sentinel_group group(WEIR_REDIS_PORT + 10, "weir-primary");
    const int old_primary = group.primary().port();
    // Port 1 is nobody: the client must take the primary's place from the sentinel.
    const auto r = ride_out(
        1, fallback,
        [&](bool on) {
          if (on) group.primary().kill();  // a crash: the sentinel promotes the replica
        },
        {{"127.0.0.1", group.sentinel_port()}}, group.name());
    check_ride(r, fallback);
    CHECK(group.primary_at() == old_primary + 1);
  }
}

TEST_CASE("in a cluster the limiter follows MOVED and ASK, and each limit stays exact",
          "[cluster]") {
  rig::cluster nodes(WEIR_REDIS_PORT + 20);
  std::vector<std::string> names;
  std::set<std::size_t> owners;
  for (int i = 0; i < 9; ++i) {
    names.push_back(unique_name("cluster") + std::to_string(i));
    owners.insert(nodes.owner(fmt::format("weir:{{{}}}:requests", names.back())));
  }
  REQUIRE(owners.size() >= 2);  // the names' slots are spread over the nodes

  std::vector<int> admitted(names.size());
  run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    // One client per limiter: each follows MOVED to the node of its own slot.
    for (std::size_t i = 0; i < names.size(); ++i) {
      weir::redis::client redis(ex, {.port = nodes.node(0).port()});
      // Two dimensions: both keys carry the name as a hash tag, so one script reaches both.
      weir::redis::rate_limiter<> shared(ex, redis,
                                         {.name = names[i],
                                          .requests = weir::limit{weir::per_hour(1), 3},
                                          .tokens = weir::limit{weir::per_hour(1), 1000}});
      for (int k = 0; k < 5; ++k) {
        const bool ok =
            co_await shared.async_try_acquire({.requests = 1, .tokens = 100}, asio::use_awaitable);
        admitted[i] += ok;
      }
      CHECK(shared.mode() == weir::redis::limiter_mode::shared);
      // The fleet's shared state lives on its own slot too.
      weir::redis::fleet_state fleet(redis, {.name = names[i]});
      fleet.publish_cooldown("openai", "gpt-4o", 30s);
      const auto news = co_await fleet.read();
      REQUIRE(news);
      REQUIRE(news->cooldowns.size() == 1);
      CHECK(news->cooldowns[0].model == "gpt-4o");
      CHECK(news->cooldowns[0].left > 25s);
      redis.close();
    }
  });
  for (std::size_t i = 0; i < names.size(); ++i) CHECK(admitted[i] == 3);

  // A slot on its way from one node to another: the old node answers ASK for a key it does not
  // have, and the limiter's script runs on the new one.
  const auto name = unique_name("migrating");
  const auto key = fmt::format("weir:{{{}}}:requests", name);
  const auto source = nodes.owner(key), target = (source + 1) % 3;
  const auto slot = rig::ask(nodes.node(0).port(), "cluster keyslot '" + key + "'");
  const int slot_number = std::atoi(slot.c_str());
  rig::ask(nodes.node(target).port(),
           fmt::format("cluster setslot {} importing {}", slot_number, nodes.id(source)));
  rig::ask(nodes.node(source).port(),
           fmt::format("cluster setslot {} migrating {}", slot_number, nodes.id(target)));
  int migrating_admitted = 0;
  run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = nodes.node(source).port()});
    weir::redis::rate_limiter<> shared(
        ex, redis, {.name = name, .requests = weir::limit{weir::per_hour(1), 3}});
    for (int k = 0; k < 5; ++k) {
      const bool ok = co_await shared.async_try_acquire({.requests = 1}, asio::use_awaitable);
      migrating_admitted += ok;
    }
    redis.close();
  });
  CHECK(migrating_admitted == 3);
  // Counted where it ran: the key is on the node the slot is moving to.
  const auto keys_on = [&](std::size_t n) {
    return std::atoi(
        rig::ask(nodes.node(n).port(), fmt::format("cluster countkeysinslot {}", slot_number))
            .c_str());
  };
  CHECK(keys_on(target) == 1);
  CHECK(keys_on(source) == 0);
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

TEST_CASE("keyed limits shared by two processes: each key its own quota, counted once",
          "[tenants]") {
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto family = unique_name("tenants");
    // Two limiters on two connections: two processes of one fleet.
    weir::redis::client first_connection(ex, {.port = WEIR_REDIS_PORT});
    weir::redis::client second_connection(ex, {.port = WEIR_REDIS_PORT});
    const weir::redis::keyed_rate_limiter_options options{
        .each = {.name = family, .requests = weir::limit{weir::per_minute(1), 3}},
        .limits_of = [](std::string_view key, weir::redis::rate_limiter_options& o) {
          if (key == "pro") o.requests = weir::limit{weir::per_minute(1), 5};
        }};
    weir::redis::keyed_rate_limiter<> one(ex, first_connection, options);
    weir::redis::keyed_rate_limiter<> two(ex, second_connection, options);
    std::map<std::string, int> admitted;
    const std::array<std::string, 3> keys{"acme", "pro", "globex"};
    const std::array<weir::redis::keyed_rate_limiter<>*, 2> members{&one, &two};
    for (const auto& key : keys)
      for (int i = 0; i < 4; ++i)
        for (auto* member : members) {
          const bool ok =
              co_await member->async_try_acquire(key, {.requests = 1}, asio::use_awaitable);
          admitted[key] += ok;
        }
    CHECK(admitted["acme"] == 3);
    CHECK(admitted["globex"] == 3);
    CHECK(admitted["pro"] == 5);
    CHECK(one.size() == 3);
    // The fleet's naming: one hash-tagged key per tenant.
    std::vector<std::string> words{"EXISTS", fmt::format("weir:{{{}:acme}}:requests", family)};
    auto [ec, exists] = co_await first_connection.async_command(
        std::move(words), asio::as_tuple(asio::use_awaitable));
    CHECK_FALSE(ec);
    CHECK(exists.integer == 1);

    // As a stage, keyed by the call's tenant.
    auto guarded = weir::pipeline(one);
    weir::call_context acme{.tenant = "acme"}, fresh{.tenant = "fresh"};
    const int ok = co_await guarded(fresh, []() -> asio::awaitable<int> { co_return 1; });
    CHECK(ok == 1);
    acme.deadline = std::chrono::steady_clock::now() + 100ms;
    bool refused = false;
    try {
      co_await guarded(acme, []() -> asio::awaitable<int> { co_return 1; });
    } catch (const weir::exception& e) {
      refused = e.code() == weir::error::rate_limited && e.refused_locally();
    }
    CHECK(refused);
  });
}

TEST_CASE("a budget shared by two processes: reservations from both count, alerts fire once",
          "[tenants]") {
  run([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto name = unique_name("budget");
    std::atomic<int> alerts{0};
    weir::redis::client c1(ex, {.port = WEIR_REDIS_PORT}), c2(ex, {.port = WEIR_REDIS_PORT});
    const weir::spend_budget_options options{.name = name,
                                             .limit = 1.0,
                                             .per = weir::budget_scope::tenant,
                                             .alert_at = {0.5},
                                             .watch = [&](const weir::event& e) {
                                               alerts +=
                                                   std::holds_alternative<weir::budget_alert>(e);
                                             }};
    weir::redis::spend_budget<> one(ex, c1, options), two(ex, c2, options);
    auto a = co_await one.reserve("acme", 0.4);
    auto b = co_await two.reserve("acme", 0.4);
    std::optional<std::chrono::nanoseconds> retry_after;
    std::string said;
    bool refused = false;
    try {
      co_await one.reserve("acme", 0.3);  // 0.8 held by the two: 0.3 does not fit
    } catch (const weir::exception& e) {
      refused = e.code() == weir::error::over_budget && e.refused_locally();
      retry_after = e.retry_after();
      said = e.what();
    }
    CHECK(refused);
    CHECK_FALSE(retry_after);  // it fits once the calls in flight settle: no time to give
    CHECK_THAT(said, Catch::Matchers::Contains("no room before calls in flight settle"));
    auto other = co_await two.reserve("globex", 0.9);  // another tenant, another budget
    other.release();
    a.settle(0.1);
    b.settle(0.5);
    asio::steady_timer pause(ex, 200ms);  // the settles go out in the background
    co_await pause.async_wait(asio::use_awaitable);
    CHECK(alerts.load() == 1);
    auto c = co_await one.reserve("acme", 0.4);  // 0.6 spent
    c.release();
    bool full = false;
    try {
      co_await two.reserve("acme", 0.41);
    } catch (const weir::exception& e) {
      full = e.code() == weir::error::over_budget && e.retry_after() &&
             *e.retry_after() <= std::chrono::hours(24);  // at midnight UTC
    }
    CHECK(full);

    // A process that dies holding a reservation leaves only its fields in the key's hash (what
    // the script writes for a reservation, with a 300 ms lifetime): they hold the budget until
    // they expire.
    const auto now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    const auto day = weir::detail::calendar_window(weir::budget_window::daily(), now_ns).first;
    std::vector<std::string> crashed{"EVAL",    weir::redis::detail::budget_script,
                                     "1",       fmt::format("weir:{{budget:{}:acme}}", name),
                                     "reserve", fmt::format("c{}", day),
                                     "1",       "0.4",
                                     "12345",   std::to_string(now_ns / 1'000'000),
                                     "300",     "86400000"};
    auto [crash_ec, crash_reply] =
        co_await c1.async_command(std::move(crashed), asio::as_tuple(asio::use_awaitable));
    REQUIRE_FALSE(crash_ec);
    REQUIRE(crash_reply.elements.size() == 4);
    CHECK(crash_reply.elements[0].integer == 1);
    bool held = false;
    try {
      co_await two.reserve("acme", 0.1);
    } catch (const weir::exception&) {
      held = true;
    }
    CHECK(held);
    asio::steady_timer expiry(ex, 400ms);
    co_await expiry.async_wait(asio::use_awaitable);
    auto after = co_await two.reserve("acme", 0.4);
    after.release();
  });
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
