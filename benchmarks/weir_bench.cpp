// weir_bench: each policy's hot path against the floor it cannot beat (a run: docs/performance.md).

// The replaced operator new/delete below pair malloc with free on purpose; gcc cannot see that
// through inlining and warns.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#include <weir/composition/pipeline.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/failure/retry.hpp>
#include <weir/routing/router.hpp>
#include <weir/throttling/keyed_limiter.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/request_queue.hpp>
#ifdef WEIR_BENCH_REDIS
#include <weir/redis/rate_limiter.hpp>
#endif
#include <weir/throttling/token_bucket.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <benchmark/benchmark.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <new>
#include <random>
#include <string>
#include <vector>

// Every heap allocation in the process is counted, so a benchmark can report allocations per call.
namespace {
std::atomic<std::uint64_t> allocations{0};
}
void* operator new(std::size_t n) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

using steady = std::chrono::steady_clock;

// One clock read plus one uncontended compare-exchange: what any time-based limiter must pay.
void floor_clock_now_plus_cas(benchmark::State& state) {
  std::atomic<std::int64_t> word{0};
  for (auto _ : state) {
    auto now = steady::now().time_since_epoch().count();
    auto expected = word.load(std::memory_order_relaxed);
    word.compare_exchange_strong(expected, now, std::memory_order_acq_rel);
    benchmark::DoNotOptimize(expected);
  }
}
BENCHMARK(floor_clock_now_plus_cas)->Name("floor/clock_now_plus_cas");

// A bucket so large it always admits: the benchmark measures the admit path, not refusals.
boost::asio::io_context bench_io;
weir::token_bucket<> always_open(bench_io.get_executor(),
                                 {.rate = weir::per_second(1e9), .burst = 1'000'000});

void token_bucket_try_acquire(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(always_open.try_acquire());
}
BENCHMARK(token_bucket_try_acquire)->Name("token_bucket/try_acquire");
BENCHMARK(token_bucket_try_acquire)->Name("token_bucket/try_acquire")->Threads(2);

// The process's resident memory, from /proc (0 where there is none).
std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * 4096;
}

// A million live keys, drawn at random: each call misses the cache, as it would on a server
// with that many tenants (limiter:0 is the floor, drawing and hashing the key alone; keys:1000
// shows the cost when the table is in cache). A slow rate with a vast burst: every call is admitted
// and every key stays live (its bucket is not full again for a minute), so none is dropped.
void keyed_try_acquire(benchmark::State& state) {
  const auto key_count = static_cast<std::size_t>(state.range(0));
  std::vector<std::string> keys;
  keys.reserve(key_count);
  for (std::size_t i = 0; i < key_count; ++i) keys.push_back("tenant-" + std::to_string(i));
  std::vector<std::uint32_t> order(1 << 20);
  std::mt19937 random(42);
  for (auto& i : order) i = static_cast<std::uint32_t>(random() % key_count);

  if (state.range(1) == 0) {  // the floor: drawing and hashing the key, no limiter
    std::size_t next = 0;
    for (auto _ : state) {
      benchmark::DoNotOptimize(weir::detail::key_hash(keys[order[next]]));
      next = (next + 1) & (order.size() - 1);
    }
    return;
  }
  const auto before = resident_bytes();
  weir::keyed_limiter<> limits(bench_io.get_executor(),
                               {.limit = {.rate = weir::per_minute(1), .burst = 1'000'000},
                                .shards = static_cast<std::size_t>(state.range(2))});
  for (const auto& k : keys) limits.try_acquire(k);
  state.counters["table_MB"] = static_cast<double>(limits.memory_bytes()) / 1e6;
  state.counters["resident_MB"] = static_cast<double>(resident_bytes() - before) / 1e6;
  state.counters["bytes_per_key"] =
      static_cast<double>(limits.memory_bytes()) / static_cast<double>(key_count);
  std::size_t next = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(limits.try_acquire(keys[order[next]]));
    next = (next + 1) & (order.size() - 1);
  }
}
BENCHMARK(keyed_try_acquire)
    ->Name("keyed/try_acquire")
    ->ArgNames({"keys", "limiter", "shards"})
    ->Args({1'000'000, 0, 64})
    ->Args({1'000'000, 1, 64})
    ->Args({1'000, 0, 64})
    ->Args({1'000, 1, 64});

// Ten million keys pass through, each idle 1 ms (virtual) after its call: the table's memory
// must stay at what a thousand live keys need.
void keyed_churn(benchmark::State& state) {
  const auto key_count = state.range(0);
  std::size_t largest = 0;
  for (auto _ : state) {
    weir::keyed_limiter<> limits(bench_io.get_executor(),
                                 {.limit = {.rate = weir::per_second(1000), .burst = 1}});
    auto now = steady::now();
    std::string key = "tenant-";
    for (std::int64_t i = 0; i < key_count; ++i) {
      key.resize(7);
      key += std::to_string(i);
      benchmark::DoNotOptimize(limits.try_acquire(key, 1, now));
      now += std::chrono::microseconds(1);
      if ((i & 0xffff) == 0) largest = std::max(largest, limits.memory_bytes());
    }
    state.counters["final_kB"] = static_cast<double>(limits.memory_bytes()) / 1e3;
    state.counters["keys_held"] = static_cast<double>(limits.size());
  }
  state.counters["largest_kB"] = static_cast<double>(largest) / 1e3;
}
BENCHMARK(keyed_churn)
    ->Name("keyed/churn")
    ->ArgName("keys")
    ->Arg(10'000'000)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

void usage_monitor_record(benchmark::State& state) {
  weir::usage_monitor<> monitor({.window = std::chrono::seconds(60), .buckets = 60});
  for (auto _ : state) monitor.record({.tokens = 100});
}
BENCHMARK(usage_monitor_record)->Name("usage_monitor/record");

void request_queue_admit_release(benchmark::State& state) {
  weir::request_queue queue(bench_io.get_executor(), {.max_concurrent = 8, .max_queued = 8});
  for (auto _ : state) {
    auto p = queue.try_admit();
    benchmark::DoNotOptimize(p);
  }
}
BENCHMARK(request_queue_admit_release)->Name("request_queue/admit_release");

// Runs the benchmark loop inside one coroutine, as a caller's agent code would, and reports heap
// allocations per call in steady state (after a warm-up that fills Asio's frame caches).
// Runs `call` in a coroutine on `io` (by default a fresh one), `state`'s iterations after a
// warm-up.
template <class Call>
void in_coroutine(benchmark::State& state, Call call, boost::asio::io_context* on = nullptr) {
  boost::asio::io_context own;
  auto& io = on ? *on : own;
  boost::asio::co_spawn(
      io,
      [&]() -> boost::asio::awaitable<void> {
        for (int warm = 0; warm < 1000; ++warm) co_await call();
        const auto before = allocations.load(std::memory_order_relaxed);
        for (auto _ : state) benchmark::DoNotOptimize(co_await call());
        state.counters["allocs_per_call"] =
            static_cast<double>(allocations.load(std::memory_order_relaxed) - before) /
            static_cast<double>(state.iterations());
      },
      boost::asio::detached);
  io.run();
}

boost::asio::awaitable<int> answer_at_once() { co_return 42; }

// co_await of an awaitable that returns at once: what any coroutine policy must pay.
void floor_awaitable_call(benchmark::State& state) {
  in_coroutine(state, [] { return answer_at_once(); });
}
BENCHMARK(floor_awaitable_call)->Name("floor/awaitable_call");

// The same call inside a coroutine that only passes it on: the least a policy used as a
// decorator (a coroutine around the caller's, as `retry(op)` is) can cost.
template <class Operation>
boost::asio::awaitable<int> pass_on(Operation op) {
  co_return co_await op();
}
void floor_two_frames(benchmark::State& state) {
  in_coroutine(state, [] { return pass_on([] { return answer_at_once(); }); });
}
BENCHMARK(floor_two_frames)->Name("floor/two_frames");

// Awaiting a permit that is free: the coroutine form takes it without suspending.
void token_bucket_acquire_free(benchmark::State& state) {
  in_coroutine(state, [] { return always_open.acquire(); });
}
BENCHMARK(token_bucket_acquire_free)->Name("token_bucket/acquire_free");

// The same through async_acquire(use_awaitable): a round trip through the scheduler.
void token_bucket_async_acquire_free(benchmark::State& state) {
  boost::asio::io_context io;
  weir::token_bucket<> bucket(io.get_executor(),
                              {.rate = weir::per_second(1e9), .burst = 1'000'000});
  in_coroutine(
      state, [&] { return bucket.async_acquire(1, boost::asio::use_awaitable); }, &io);
}
BENCHMARK(token_bucket_async_acquire_free)->Name("token_bucket/async_acquire_free");

void request_queue_admit_free(benchmark::State& state) {
  weir::request_queue queue(bench_io.get_executor(), {.max_concurrent = 8, .max_queued = 8});
  in_coroutine(state, [&] { return queue.admit(); });
}
BENCHMARK(request_queue_admit_free)->Name("request_queue/admit_free");

void rate_limits_acquire_free(benchmark::State& state) {
  weir::rate_limits<> limits(bench_io.get_executor(),
                             {.requests = weir::limit{weir::per_second(1e9), 1'000'000},
                              .tokens = weir::limit{weir::per_second(1e12), 1'000'000'000}});
  in_coroutine(state, [&] { return limits.acquire({.requests = 1, .tokens = 100}); });
}
BENCHMARK(rate_limits_acquire_free)->Name("rate_limits/acquire_free");

void retry_first_success(benchmark::State& state) {
  weir::retry<> retry;
  in_coroutine(state, [&] { return retry([] { return answer_at_once(); }); });
}
BENCHMARK(retry_first_success)->Name("retry/first_success");

// The breaker's own work on a call: admit, call, record, inside the caller's coroutine — how a
// pipeline runs its policies.
void circuit_breaker_closed_call(benchmark::State& state) {
  weir::circuit_breaker<> breaker({.consecutive_failures = 5});
  boost::asio::io_context io;
  boost::asio::co_spawn(
      io,
      [&]() -> boost::asio::awaitable<void> {
        for (auto _ : state) {
          auto ticket = breaker.try_admit();
          benchmark::DoNotOptimize(co_await answer_at_once());
          breaker.record(ticket, false);
        }
      },
      boost::asio::detached);
  io.run();
}
BENCHMARK(circuit_breaker_closed_call)->Name("circuit_breaker/closed_call");

// The same call through the breaker used as a decorator: one more coroutine frame.
void circuit_breaker_closed_call_decorator(benchmark::State& state) {
  weir::circuit_breaker<> breaker({.consecutive_failures = 5});
  in_coroutine(state, [&] { return breaker([] { return answer_at_once(); }); });
}
BENCHMARK(circuit_breaker_closed_call_decorator)->Name("circuit_breaker/closed_call/decorator");

void pipeline_bare_call(benchmark::State& state) {
  in_coroutine(state, [] { return answer_at_once(); });
}
BENCHMARK(pipeline_bare_call)->Name("pipeline/bare_call");

// retry + circuit breaker + token bucket + usage monitor + request queue around a call that
// returns at once.
void pipeline_full_success(benchmark::State& state) {
  boost::asio::io_context policies_io;
  weir::retry<> retry;
  weir::circuit_breaker<> breaker;
  weir::token_bucket<> bucket(policies_io.get_executor(),
                              {.rate = weir::per_second(1e9), .burst = 1'000'000});
  weir::usage_monitor<> monitor;
  weir::request_queue queue(policies_io.get_executor(), {.max_concurrent = 64, .max_queued = 64});
  auto guarded = weir::pipeline(retry, breaker, bucket, monitor, queue);
  in_coroutine(state, [&] { return guarded([] { return answer_at_once(); }); });
}
BENCHMARK(pipeline_full_success)->Name("pipeline/full_success");

// Many coroutines waiting on one bucket: state.range(0) of them, all at once, on a bucket of
// state.range(1) per second with a burst of one. Reports the share of that rate the bucket
// delivered (admissions over the time from the first request to the last admission), whether
// they were admitted in the order they asked, and the wall time from the first co_spawn (1e6
// coroutine frames are made before the io_context runs) to the last admission.
void token_bucket_waiters(benchmark::State& state) {
  const auto waiters = static_cast<std::size_t>(state.range(0));
  const double rate = static_cast<double>(state.range(1));
  double share = 0, wall = 0;
  bool in_order = true;
  for (auto _ : state) {
    boost::asio::io_context io;
    weir::token_bucket<> bucket(io.get_executor(), {.rate = weir::per_second(rate), .burst = 1});
    std::vector<std::uint32_t> order;
    order.reserve(waiters);
    steady::time_point first{}, last{};
    auto wait = [](weir::token_bucket<>& b, std::vector<std::uint32_t>& out, steady::time_point& t0,
                   steady::time_point& t1, std::uint32_t i) -> boost::asio::awaitable<void> {
      if (i == 0) t0 = steady::now();
      co_await b.async_acquire(1, boost::asio::use_awaitable);
      t1 = steady::now();
      out.push_back(i);
    };
    const auto start = steady::now();
    for (std::size_t i = 0; i < waiters; ++i)
      boost::asio::co_spawn(io, wait(bucket, order, first, last, static_cast<std::uint32_t>(i)),
                            boost::asio::detached);
    io.run();
    share = static_cast<double>(waiters - 1) / rate /
            std::chrono::duration<double>(last - first).count();
    wall = std::chrono::duration<double>(last - start).count();
    for (std::size_t i = 0; i < order.size(); ++i) in_order = in_order && order[i] == i;
    in_order = in_order && order.size() == waiters;
  }
  state.counters["share_of_rate"] = share;
  state.counters["in_order"] = in_order ? 1 : 0;
  state.counters["wall_s"] = wall;
}
BENCHMARK(token_bucket_waiters)
    ->Name("token_bucket/waiters")
    ->ArgNames({"", "per_second"})
    ->Args({100'000, 50'000})
    ->Args({1'000'000, 200'000})
    ->Iterations(1)
    ->Unit(benchmark::kSecond);

// Choosing among 20 models from 4 providers, each with request and token limits far from full:
// every filter, every cooldown and breaker check, the strategy on each, and the winner's limiter.
void router_select(benchmark::State& state) {
  boost::asio::io_context io;
  weir::routing::catalog models;
  const int count = static_cast<int>(state.range(0));
  for (int i = 0; i < count; ++i)
    models.add(weir::routing::model_spec{.provider = fmt::format("provider-{}", i % 4),
                                         .id = fmt::format("model-{}", i),
                                         .input_price = 0.1 * (count - i),
                                         .output_price = 0.4 * (count - i),
                                         .capability = static_cast<double>(i % 10),
                                         .context_window = 128'000,
                                         .requests_per_minute = 1e9,
                                         .tokens_per_minute = 1e12});
  weir::routing::router<int, int> router(io.get_executor(), std::move(models));
  const weir::routing::route_constraints wanted{
      .input_tokens = 1'000, .output_tokens = 500, .min_capability = 3};
  const auto before = allocations.load(std::memory_order_relaxed);
  for (auto _ : state) benchmark::DoNotOptimize(router.select(wanted));
  state.counters["allocs_per_call"] =
      static_cast<double>(allocations.load(std::memory_order_relaxed) - before) /
      static_cast<double>(state.iterations());
}
BENCHMARK(router_select)->Name("router/select")->ArgName("models")->Arg(20);

#ifdef WEIR_BENCH_REDIS
// One admission from a Redis-backed limit far from full: a round trip to a local redis-server
// (WEIR_REDIS_PORT, default 6390) per call, or, with leases, one per batch.
void redis_acquire(benchmark::State& state) {
  boost::asio::io_context io;
  const char* port = std::getenv("WEIR_REDIS_PORT");
  weir::redis::client redis(io.get_executor(), {.port = port ? std::atoi(port) : 6390});
  weir::redis::rate_limiter<> shared(
      io.get_executor(), redis,
      {.name = fmt::format("bench-{}", steady::now().time_since_epoch().count()),
       .requests = weir::limit{weir::per_second(1e9), 1'000'000},
       .max_lease = static_cast<std::uint32_t>(state.range(0))});
  bool reachable = true;
  boost::asio::co_spawn(
      io,
      [&]() -> boost::asio::awaitable<void> {
        bool first = false;
        try {
          first = co_await shared.async_try_acquire({.requests = 1}, boost::asio::use_awaitable);
        } catch (const boost::system::system_error&) {  // unreachable, failing closed
        }
        if (!first || shared.mode() != weir::redis::limiter_mode::shared) {
          reachable = false;
        } else {
          for (auto _ : state)
            co_await shared.async_acquire({.requests = 1}, boost::asio::use_awaitable);
        }
        redis.close();
      },
      boost::asio::detached);
  io.run();
  if (!reachable) state.SkipWithError("no redis-server on WEIR_REDIS_PORT");
}
BENCHMARK(redis_acquire)
    ->Name("redis/acquire")
    ->ArgName("max_lease")
    ->Arg(1)
    ->Arg(16)
    ->UseRealTime();

// Many callers in one process acquiring at once from a Redis-backed limit far from full: exact
// admissions (no leases), sharing round trips. The time is per acquire; items_per_second is the
// process's throughput.
void redis_acquire_concurrent(benchmark::State& state) {
  boost::asio::io_context io(1);
  const char* port = std::getenv("WEIR_REDIS_PORT");
  weir::redis::client redis(io.get_executor(), {.port = port ? std::atoi(port) : 6390});
  weir::redis::rate_limiter<> shared(
      io.get_executor(), redis,
      {.name = fmt::format("bench-{}", steady::now().time_since_epoch().count()),
       .requests = weir::limit{weir::per_second(1e9), 1'000'000}});
  const auto callers = static_cast<int>(state.range(0));
  constexpr int per_caller = 64;
  int running = 0;
  bool failed = false;
  const auto caller = [&]() -> boost::asio::awaitable<void> {
    try {
      for (int i = 0; i < per_caller; ++i)
        co_await shared.async_acquire({.requests = 1}, boost::asio::use_awaitable);
    } catch (const boost::system::system_error&) {
      failed = true;
    }
    --running;
  };
  while (!failed && state.KeepRunningBatch(callers * per_caller)) {
    running = callers;
    for (int c = 0; c < callers; ++c) boost::asio::co_spawn(io, caller(), boost::asio::detached);
    while (running > 0) io.run_one();
  }
  if (failed || shared.mode() != weir::redis::limiter_mode::shared)
    state.SkipWithError("no redis-server on WEIR_REDIS_PORT");
  state.SetItemsProcessed(state.iterations());
  redis.close();
  io.run();
}
BENCHMARK(redis_acquire_concurrent)
    ->Name("redis/acquire_concurrent")
    ->ArgName("callers")
    ->Arg(64)
    ->UseRealTime();
#endif

}  // namespace

BENCHMARK_MAIN();
