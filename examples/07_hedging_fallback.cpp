// Hedging and a fallback around one call, outermost first. The first question's model stalls
// for 3 s: after 100 ms a hedge is sent beside it, answers 20 ms later, and wins; the stalled
// attempt is cancelled and waited for. The second question's attempts both fail (the hedge
// starts at once when the first fails): the fallback replaces the failure with a canned reply.
// Both policies' events go to the pipeline's observer.
#include <weir/composition/pipeline.hpp>
#include <weir/failure/fallback.hpp>
#include <weir/failure/hedging.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <string>
#include <variant>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int cancelled = 0;

// A model that answers `text` after `took`, or fails then.
asio::awaitable<std::string> model(std::string text, std::chrono::milliseconds took, bool fails) {
  asio::steady_timer thinking(co_await asio::this_coro::executor, took);
  auto [ec] = co_await thinking.async_wait(asio::as_tuple(asio::use_awaitable));
  if (ec) ++cancelled;  // the hedge won: this attempt was cancelled
  if (ec || fails) throw boost::system::system_error(ec ? ec : asio::error::connection_refused);
  co_return text;
}

int main() {
  asio::io_context io;
  weir::hedging<> hedge({.delay = 100ms, .max_hedges = 1});
  weir::fallback canned(
      [](const weir::outcome<std::string>&) { return std::string("Busy; try again in a minute."); },
      {.name = "canned reply"});
  // The pipeline's observer hears both policies; here, only what they did.
  const auto print = [](const weir::event& e) {
    if (std::holds_alternative<weir::hedge_started>(e) ||
        std::holds_alternative<weir::fallback_used>(e))
      fmt::print("  {}\n", e);
  };
  auto guarded = weir::pipeline(weir::pipeline_options{.watch = print}, canned, hedge);

  std::string first, second;
  std::chrono::milliseconds first_took{};
  auto ask = [&]() -> asio::awaitable<void> {
    int attempts = 0;  // the pipeline calls the operation once per attempt: 0, then the hedge
    weir::call_context weather{.operation = "weather"};
    const auto start = std::chrono::steady_clock::now();
    first = co_await guarded(weather, [&] {
      return attempts++ == 0 ? model("stalled answer", 3000ms, false)
                             : model("Sunny and mild.", 20ms, false);
    });
    first_took = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - start);
    fmt::print("weather: \"{}\" after {} ms\n", first, first_took.count());

    weir::call_context news{.operation = "news"};
    second = co_await guarded(news, [] { return model("never", 10ms, true); });
    fmt::print("news: \"{}\"\n", second);
  };
  asio::co_spawn(io, ask(), [](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
  });
  io.run();
  return first == "Sunny and mild." && first_took < 1s && cancelled == 1 &&
                 second == "Busy; try again in a minute." && hedge.hedges_in_flight() == 0
             ? 0
             : 1;
}
