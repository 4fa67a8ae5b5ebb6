// A request queue (a bulkhead): at most 2 calls in flight and at most 3 waiting. Six jobs arrive
// together: two start at once, three wait, and the sixth is refused at once with queue_full
// rather than left to wait without end. The chat job came after two batch jobs but is
// interactive, so it takes the first slot that frees.
#include <weir/throttling/request_queue.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;

std::vector<std::string> started, refused;
std::size_t most_in_flight = 0;

asio::awaitable<void> job(weir::request_queue& queue, std::string name, weir::priority p) {
  auto [ec, permit] = co_await queue.async_admit(p, asio::as_tuple(asio::use_awaitable));
  if (ec) {
    fmt::print("{:8} refused: {}\n", name, ec.message());
    refused.push_back(name);
    co_return;
  }
  fmt::print("{:8} starts ({} in flight)\n", name, queue.in_flight());
  started.push_back(name);
  most_in_flight = std::max(most_in_flight, queue.in_flight());
  asio::steady_timer work(co_await asio::this_coro::executor, 50ms);  // the call itself
  co_await work.async_wait(asio::use_awaitable);
}  // `permit` gives the slot back here, however the job ends

int main() {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 2, .max_queued = 3});
  const std::vector<std::pair<std::string, weir::priority>> jobs{
      {"batch-1", weir::priority::batch},      {"batch-2", weir::priority::batch},
      {"batch-3", weir::priority::batch},      {"batch-4", weir::priority::batch},
      {"chat-1", weir::priority::interactive}, {"batch-5", weir::priority::batch}};
  for (const auto& [name, p] : jobs) asio::co_spawn(io, job(queue, name, p), asio::detached);
  io.run();

  const std::vector<std::string> expected{"batch-1", "batch-2", "chat-1", "batch-3", "batch-4"};
  return started == expected && refused == std::vector<std::string>{"batch-5"} &&
                 most_in_flight == 2 && queue.in_flight() == 0
             ? 0
             : 1;
}
