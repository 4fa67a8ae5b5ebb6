// Specifications of weir/throttling/adaptive_concurrency.hpp, on virtual time against the model
// server.
#include "../support/admission.hpp"

#include <weir/composition/pipeline.hpp>
#include <weir/throttling/adaptive_concurrency.hpp>

#include <fmt/format.h>

#include <cstdlib>

namespace {
struct run_figures {
  double share_of_capacity = 0;
  std::chrono::nanoseconds p99{0};
  std::size_t final_limit = 0;
};

std::chrono::nanoseconds p99_of(std::vector<std::chrono::nanoseconds> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? std::chrono::nanoseconds(0) : v[v.size() * 99 / 100];
}

// 64 callers in a closed loop for `seconds` through an adaptive limit, against `workers`
// workers with exponential service times of 100 ms; latency is the server's (the call's
// time from admission to answer).
run_figures run(std::size_t workers, int seconds, std::uint64_t seed,
                std::vector<std::size_t>* limits = nullptr) {
  weir::testing::manual_clock::reset();
  asio::io_context io;
  server_type server(
      io.get_executor(),
      {.workers = workers, .service = weir::testing::exponential_service(100ms), .seed = seed});
  weir::adaptive_concurrency<clock_type> adaptive(io.get_executor(), {.initial_limit = 1});
  auto guarded = weir::pipeline(adaptive);
  std::vector<std::chrono::nanoseconds> latencies;
  const auto until = clock_type::now() + std::chrono::seconds(seconds);
  const auto measure_from = clock_type::now() + std::chrono::seconds(seconds / 2);
  std::uint64_t measured = 0;
  for (int c = 0; c < 64; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          while (clock_type::now() < until) {
            weir::basic_call_context<clock_type> ctx;
            co_await guarded(ctx, [&]() -> asio::awaitable<unsigned> {
              const auto sent = clock_type::now();
              const unsigned status = co_await server.serve();
              if (sent >= measure_from) {
                latencies.push_back(clock_type::now() - sent);
                ++measured;
              }
              co_return status;
            });
          }
        },
        asio::detached);
  for (int s = 0; s < seconds + 5; ++s) {
    advance<clock_type>(io, 1s);
    if (limits) limits->push_back(adaptive.limit());
    if (std::getenv("WEIR_TRACE"))
      fmt::print("{} s: limit {} baseline {:.1f} ms\n", s, adaptive.limit(),
                 adaptive.baseline().count() / 1e6);
  }
  const double capacity =
      server_type::capacity(workers, 100ms) * static_cast<double>(seconds - seconds / 2);
  return {static_cast<double>(measured) / capacity, p99_of(latencies), adaptive.limit()};
}
}  // namespace

TEST_CASE("an adaptive limit finds a model server's capacity without queueing at it",
          "[adaptive_concurrency]") {
  for (std::size_t workers : {4u, 16u})
    for (std::uint64_t seed : {7u, 8u, 9u}) {
      std::vector<std::size_t> limits;
      const auto f = run(workers, 120, seed, &limits);
      // Unloaded, exponential service times of 100 ms have a p99 of 460 ms.
      INFO("workers " << workers << " seed " << seed << ": " << f.share_of_capacity * 100
                      << "% of capacity, p99 " << f.p99.count() / 1e6 << " ms, limit "
                      << f.final_limit);
      CHECK(f.share_of_capacity >= 0.9);
      CHECK(f.p99 <= 2 * 460ms);
    }
}

namespace {
using adaptive_type = weir::adaptive_concurrency<clock_type>;

// Feeds whole windows of calls that took `latency` with the limit's worth in flight.
void windows(adaptive_type& a, int n, std::chrono::nanoseconds latency, double busy = 1.0) {
  for (int w = 0; w < n; ++w) {
    const auto in_flight = static_cast<std::size_t>(static_cast<double>(a.limit()) * busy);
    const auto size = std::max<std::size_t>(16, 2 * a.limit());
    for (std::size_t i = 0; i < size; ++i) a.record(latency, in_flight);
  }
}
}  // namespace

TEST_CASE("the limit grows while latency stays at the no-load latency, up to max_limit",
          "[adaptive_concurrency]") {
  asio::io_context io;
  adaptive_type a(io.get_executor(), {.initial_limit = 4, .max_limit = 12, .probe_every = 1'000});
  windows(a, 1, 100ms);  // the first window sets the no-load latency
  const auto before = a.limit();
  windows(a, 10, 100ms);
  CHECK(a.limit() > before);
  windows(a, 200, 100ms);
  CHECK(a.limit() == 12);
}

TEST_CASE("slow start doubles the limit each window until a queue shows, then the gradient steers",
          "[adaptive_concurrency]") {
  asio::io_context io;
  adaptive_type a(io.get_executor(), {.initial_limit = 2, .probe_every = 1'000});
  windows(a, 1, 100ms);  // sets the no-load latency, and no queue: 4
  CHECK(a.limit() == 4);
  windows(a, 3, 120ms);  // a fifth slower is noise, not a queue yet
  CHECK(a.limit() == 32);
  windows(a, 1, 100ms, 0.25);  // no growth without the load to show it
  CHECK(a.limit() == 32);
  windows(a, 1, 200ms);  // half the speed: 32 × 0.8 + (32 × 0.5 + 2) × 0.2 = 29.2
  CHECK(a.limit() == 29);
  windows(a, 1, 100ms);  // slow start is over: growth by smoothing × headroom, 29.6
  CHECK(a.limit() == 29);
  adaptive_type dropped(io.get_executor(), {.initial_limit = 8});
  dropped.record_drop();  // a drop ends slow start too
  windows(dropped, 1, 100ms);
  CHECK(dropped.limit() == 7);
}

TEST_CASE("the limit comes down when latency rises, to min_limit at most, and recovers",
          "[adaptive_concurrency]") {
  asio::io_context io;
  adaptive_type a(io.get_executor(),
                  {.initial_limit = 40, .min_limit = 6, .probe_every = 1'000, .slow_start = false});
  windows(a, 1, 100ms);
  windows(a, 5, 300ms);  // three times slower: queueing
  const auto after_rise = a.limit();
  CHECK(after_rise < 40);
  windows(a, 100, 300ms);  // the ratio alone would settle at 4 (headroom over half)
  CHECK(a.limit() == 6);
  windows(a, 100, 100ms);  // back to the no-load latency
  CHECK(a.limit() > 10);
}

TEST_CASE("no growth without the load to show it; a drop backs off at once",
          "[adaptive_concurrency]") {
  asio::io_context io;
  adaptive_type a(io.get_executor(),
                  {.initial_limit = 20, .probe_every = 1'000, .slow_start = false});
  windows(a, 1, 100ms);
  windows(a, 50, 100ms, 0.25);  // a quarter of the limit in flight: nothing learned
  CHECK(a.limit() == 20);
  const auto moved = a.record_drop();
  REQUIRE(moved);
  CHECK(moved->from == 20);
  CHECK(moved->to == 18);
  CHECK(a.limit() == 18);
}

TEST_CASE("a probe at half the limit measures the no-load latency afresh",
          "[adaptive_concurrency]") {
  asio::io_context io;
  adaptive_type a(io.get_executor(), {.initial_limit = 10, .probe_every = 2, .slow_start = false});
  windows(a, 1, 100ms);
  CHECK(a.baseline() == 100ms);
  windows(a, 1, 100ms);  // the second window starts a probe
  CHECK(a.limit() == 5);
  // The server became slower for good: the probe's 32 calls take 200 ms.
  for (int i = 0; i < 32; ++i) a.record(200ms, 4, a.admitted());
  CHECK(a.baseline() == 150ms);  // half way to the probe's mean
  CHECK(a.limit() >= 10);
}

TEST_CASE("an adaptive limit's options are checked", "[adaptive_concurrency]") {
  asio::io_context io;
  auto invalid = [&](weir::adaptive_concurrency_options o) {
    try {
      adaptive_type a(io.get_executor(), std::move(o));
    } catch (const weir::exception& e) {
      return e.code() == weir::error::invalid_argument;
    }
    return false;
  };
  CHECK(invalid({.min_limit = 0}));
  CHECK(invalid({.initial_limit = 300}));
  CHECK(invalid({.min_limit = 8, .max_limit = 4}));
  CHECK(invalid({.smoothing = 0}));
}

TEST_CASE("in a pipeline the limit's changes are events and a Prometheus gauge",
          "[adaptive_concurrency]") {
  asio::io_context io;
  server_type server(io.get_executor(),
                     {.workers = 4, .service = weir::testing::fixed_service(100ms)});
  weir::adaptive_concurrency<clock_type> adaptive(io.get_executor(),
                                                  {.initial_limit = 1, .name = "vllm"});
  weir::metrics seen("self-hosted");
  std::vector<std::string> lines;
  auto guarded = weir::pipeline(
      weir::pipeline_options{
          .watch = weir::fan_out(seen.observer(),
                                 [&](const weir::event& e) {
                                   if (std::holds_alternative<weir::concurrency_changed>(e))
                                     lines.push_back(fmt::format("{}", e));
                                 })},
      adaptive);
  for (int c = 0; c < 16; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          for (int i = 0; i < 50; ++i) {
            weir::basic_call_context<clock_type> ctx{.operation = "chat"};
            co_await guarded(ctx, [&] { return server.serve(); });
          }
        },
        asio::detached);
  advance<clock_type>(io, 120s);
  REQUIRE_FALSE(lines.empty());
  CHECK(lines.front() == "chat: concurrency limit 1 -> 2 (no-load 100.0 ms) by vllm");
  std::string page;
  weir::write_prometheus(page, {&seen});
  CHECK_THAT(page, Catch::Matchers::Contains(fmt::format(
                       "weir_concurrency_limit{{pipeline=\"self-hosted\",policy=\"vllm\"}} {}",
                       adaptive.limit())));
}

TEST_CASE("under the router, a self-hosted model's calls go through the adaptive limit",
          "[adaptive_concurrency][routing]") {
  using response = weir::testing::fake_response;
  struct ask {};
  asio::io_context io;
  server_type server(io.get_executor(),
                     {.workers = 4, .service = weir::testing::exponential_service(100ms)});
  weir::adaptive_concurrency<clock_type> adaptive(io.get_executor(), {.initial_limit = 1});
  auto guarded = weir::pipeline(adaptive);
  weir::routing::catalog models;
  models.add(weir::routing::model_spec{.provider = "local", .id = "llama", .capability = 5});
  weir::routing::basic_router_options<response, clock_type, weir::testing::fake_classifier> o;
  o.adaptation.reset();
  weir::routing::router<ask, response, clock_type, weir::testing::fake_classifier> r(
      io.get_executor(), models, o);
  r.connect("local",
            [&](const weir::routing::model_spec&, const ask&) -> asio::awaitable<response> {
              weir::basic_call_context<clock_type> ctx{.operation = "generate"};
              const unsigned status = co_await guarded(ctx, [&] { return server.serve(); });
              co_return response{.status = status};
            });
  int answered = 0;
  for (int c = 0; c < 32; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          while (clock_type::now() < weir::testing::manual_clock::start_time + 60s) {
            auto op = r.route(ask{}, {.input_tokens = 100});
            co_await std::move(op);
            ++answered;
          }
        },
        asio::detached);
  advance<clock_type>(io, 65s);
  const auto s = server.stats();
  // 4 workers of 100 ms for 60 s: 2400 at capacity; the limit found them and queued little.
  CHECK(s.served >= 2'000);
  CHECK(answered == static_cast<int>(s.served));
  CHECK(adaptive.limit() >= 2);  // half the limit during a probe
  CHECK(adaptive.limit() <= 10);
  CHECK(s.longest_queue <= 8);  // the 32 routes waited here, not at the server
}

namespace {
// A call that yields to the executor a few times, counting how many run at once.
asio::awaitable<int> yielding_call(std::atomic<int>& running, std::atomic<int>& most) {
  const int now = ++running;
  for (int seen = most.load(); now > seen && !most.compare_exchange_weak(seen, now);) {
  }
  for (int i = 0; i < 3; ++i)
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  --running;
  co_return 1;
}
}  // namespace

TEST_CASE("an adaptive limit shared by four threads admits each call once, within its bounds",
          "[adaptive_concurrency][concurrency]") {
  asio::io_context io(4);
  weir::adaptive_concurrency<> adaptive(
      io.get_executor(),
      {.initial_limit = 2, .max_limit = 6, .max_queued = 10'000, .min_window = 4});
  std::atomic<int> changes{0};
  auto guarded = weir::pipeline(
      weir::pipeline_options{.watch =
                                 [&](const weir::event& e) {
                                   if (std::holds_alternative<weir::concurrency_changed>(e))
                                     ++changes;
                                 }},
      adaptive);
  std::atomic<int> running{0}, most{0}, answered{0}, failed{0};
  for (int c = 0; c < 64; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          for (int i = 0; i < 50; ++i) {
            weir::call_context ctx{.operation = "chat"};
            try {
              co_await guarded(ctx, [&] { return yielding_call(running, most); });
              ++answered;
            } catch (const std::exception&) {
              ++failed;
            }
          }
        },
        asio::detached);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(answered.load() == 64 * 50);
  CHECK(failed.load() == 0);
  CHECK(most.load() <= 6);  // never past max_limit
  CHECK(adaptive.in_flight() == 0);
  CHECK(adaptive.queued() == 0);
  CHECK(adaptive.limit() >= 1);
  CHECK(adaptive.limit() <= 6);
}
