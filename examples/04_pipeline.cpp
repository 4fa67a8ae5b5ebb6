// Policies composed around one call, outermost first: a retry around a breaker, request and
// token limits, a usage monitor and a bulkhead. Every event goes to one observer, printed one
// line each; metrics count them and print in the Prometheus text format.
#include <weir/observability/metrics.hpp>
#include <weir/weir.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <stdexcept>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int main() {
  asio::io_context io;
  auto ex = io.get_executor();
  weir::retry<> retry({.max_attempts = 3, .backoff = weir::backoff::constant(100ms)});
  weir::circuit_breaker<> breaker({.consecutive_failures = 5, .break_duration = 10s});
  weir::rate_limits<> limits(ex, {.requests = weir::limit::per_minute(600, 2),
                                  .tokens = weir::limit::per_minute(60'000, 5'000)});
  weir::usage_monitor<> monitor;
  weir::request_queue queue(ex, {.max_concurrent = 4, .max_queued = 16});
  weir::metrics chat("chat");
  const weir::pipeline_options options{
      .watch =
          weir::fan_out(chat.observer(), [](const weir::event& e) { fmt::print("  {}\n", e); })};
  auto guarded = weir::pipeline(options, retry, breaker, limits, monitor, queue);

  int calls = 0;
  for (int i = 0; i < 3; ++i) {
    auto call = [&]() -> asio::awaitable<std::string> {
      if (++calls == 2) throw std::runtime_error("connection reset");  // one transient failure
      co_return "an answer";
    };
    auto ctx = std::make_shared<weir::call_context>(
        weir::call_context{.tokens = 1200, .operation = "chat"});
    asio::co_spawn(io, guarded(*ctx, call), [ctx](std::exception_ptr e, std::string answer) {
      if (e) std::rethrow_exception(e);
      fmt::print("{}\n", answer);
    });
  }
  io.run();

  std::string page;
  weir::write_prometheus(page, {&chat});
  fmt::print("\n{}", page);
  fmt::print("\nrequests in the last minute: {}\n", monitor.totals().requests);
  return monitor.totals().requests == 4 ? 0 : 1;
}
