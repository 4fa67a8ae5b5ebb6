// Specifications of weir/adaptive_concurrency.hpp, on virtual time against the model server.
#include "../support/adaptive.hpp"

#include <weir/adaptive_concurrency.hpp>
#include <weir/pipeline.hpp>

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
