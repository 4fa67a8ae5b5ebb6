// adaptive: fixed and adaptive concurrency against a model server with c workers, in real time,
// side by side. The server (weir/testing/model_server.hpp) serves c requests at once with
// exponential service times and queues the rest; it does not tell the client c.
//
//     build/release/benchmarks/adaptive [--seconds S]
//
// For each c (4, 16) and each client (fixed 4, fixed 64, adaptive), 64 callers in a closed loop;
// the figures are the server's: served per second against its capacity, p50/p99 latency at the
// server (its queue and service), and client timeouts (a call over 5 s is abandoned).
#include <weir/composition/pipeline.hpp>
#include <weir/failure/timeout.hpp>
#include <weir/testing/model_server.hpp>
#include <weir/throttling/adaptive_concurrency.hpp>
#include <weir/throttling/request_queue.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;
using server_type = weir::testing::model_server<steady>;

constexpr auto mean_service = 50ms;

struct figures {
  double share = 0;
  double p50_ms = 0, p99_ms = 0;
  std::uint64_t timeouts = 0;
  std::size_t limit = 0;
};

double quantile_ms(std::vector<steady::duration>& v, double q) {
  if (v.empty()) return 0;
  const auto at = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(at), v.end());
  return std::chrono::duration<double, std::milli>(v[at]).count();
}

// 64 callers for `seconds` through `guarded`; the first third is warm-up.
template <class Guarded>
figures drive(asio::io_context& io, server_type& server, Guarded& guarded, double seconds,
              std::size_t workers) {
  const auto start = steady::now();
  const auto measure_from = start + std::chrono::duration_cast<steady::duration>(
                                        std::chrono::duration<double>(seconds / 3));
  const auto until =
      start + std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(seconds));
  std::vector<steady::duration> latencies;
  std::uint64_t timeouts = 0;
  for (int c = 0; c < 64; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          while (steady::now() < until) {
            weir::call_context ctx{.operation = "generate"};
            try {
              co_await guarded(ctx, [&]() -> asio::awaitable<unsigned> {
                const auto sent = steady::now();
                const unsigned status = co_await server.serve();
                if (sent >= measure_from && status == 200)
                  latencies.push_back(steady::now() - sent);
                co_return status;
              });
            } catch (const weir::exception& e) {
              if (e.code() == weir::error::timeout) ++timeouts;
            }
          }
        },
        asio::detached);
  io.run();
  io.restart();
  figures f;
  const double measured_seconds = seconds * 2 / 3;
  f.share = static_cast<double>(latencies.size()) /
            (server_type::capacity(workers, mean_service) * measured_seconds);
  f.p50_ms = quantile_ms(latencies, 0.5);
  f.p99_ms = quantile_ms(latencies, 0.99);
  f.timeouts = timeouts;
  return f;
}

figures fixed(std::size_t workers, std::size_t concurrency, double seconds) {
  asio::io_context io(1);
  server_type server(io.get_executor(),
                     {.workers = workers,
                      .service = weir::testing::exponential_service(mean_service),
                      .seed = workers});
  weir::request_queue queue(io.get_executor(), {.max_concurrent = concurrency, .max_queued = 1000});
  auto guarded = weir::pipeline(queue, weir::timeout<steady>(5s));
  auto f = drive(io, server, guarded, seconds, workers);
  f.limit = concurrency;
  return f;
}

figures adaptive(std::size_t workers, double seconds) {
  asio::io_context io(1);
  server_type server(io.get_executor(),
                     {.workers = workers,
                      .service = weir::testing::exponential_service(mean_service),
                      .seed = workers});
  weir::adaptive_concurrency<steady> limit(io.get_executor(), {.initial_limit = 1});
  auto guarded = weir::pipeline(limit, weir::timeout<steady>(5s));
  auto f = drive(io, server, guarded, seconds, workers);
  f.limit = limit.limit();
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 30;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string_view(argv[i]) == "--seconds") seconds = std::atof(argv[i + 1]);
  // Exponential service times of 50 ms: the unloaded p99 is 50 ms × ln(100) = 230 ms.
  fmt::print("| c | client | served, % of capacity | p50 | p99 | timeouts | limit at the end |\n");
  fmt::print("|---:|---|---:|---:|---:|---:|---:|\n");
  for (std::size_t workers : {4u, 16u}) {
    const auto row = [&](std::string_view client, const figures& f) {
      fmt::print("| {} | {} | {:.1f}% | {:.0f} ms | {:.0f} ms | {} | {} |\n", workers, client,
                 f.share * 100, f.p50_ms, f.p99_ms, f.timeouts, f.limit);
    };
    row("fixed 4", fixed(workers, 4, seconds));
    row("fixed 64", fixed(workers, 64, seconds));
    row("adaptive", adaptive(workers, seconds));
  }
}
