// One member of a fleet sharing a Redis-backed limit: from a common start time, acquires one
// request at a time for the given seconds and prints how many it was admitted.
//
//     weir_redis_worker PORT NAME START_EPOCH_MS SECONDS MAX_LEASE
#include <weir/redis/rate_limiter.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <cstdlib>
#include <thread>

namespace asio = boost::asio;

int main(int argc, char** argv) {
  if (argc != 6) return 2;
  const int port = std::atoi(argv[1]);
  const std::string name = argv[2];
  const auto start =
      std::chrono::system_clock::time_point(std::chrono::milliseconds(std::atoll(argv[3])));
  const auto seconds = std::chrono::seconds(std::atoi(argv[4]));
  const auto lease = static_cast<std::uint32_t>(std::atoi(argv[5]));

  asio::io_context io(1);
  weir::redis::client redis(io.get_executor(), {.port = port});
  weir::redis::rate_limiter<> shared(
      io.get_executor(), redis,
      {.name = name, .requests = weir::limit{weir::per_second(100), 5}, .max_lease = lease});
  std::this_thread::sleep_until(start);
  const auto end = std::chrono::steady_clock::now() + seconds;
  long admitted = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (;;) {
          co_await shared.async_acquire({.requests = 1}, asio::use_awaitable);
          if (std::chrono::steady_clock::now() >= end) break;
          ++admitted;
        }
        redis.close();  // an open connection keeps io.run() going, as any socket would
      },
      asio::detached);
  io.run();
  fmt::print("{}\n", admitted);
}
