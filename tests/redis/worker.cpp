// One member of a fleet sharing a Redis-backed limit of 100 requests/s: from a common start time,
// CALLERS coroutines acquire one request at a time for the given seconds; it prints how many
// were admitted.
//
//     weir_redis_worker PORT NAME START_EPOCH_MS SECONDS MAX_LEASE [CALLERS [SHARE_WEIGHT]]
#include <weir/redis/rate_limiter.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <cstdlib>
#include <thread>

namespace asio = boost::asio;

int main(int argc, char** argv) {
  if (argc < 6 || argc > 8) return 2;
  const int port = std::atoi(argv[1]);
  const std::string name = argv[2];
  const auto start =
      std::chrono::system_clock::time_point(std::chrono::milliseconds(std::atoll(argv[3])));
  const auto seconds = std::chrono::seconds(std::atoi(argv[4]));
  const auto lease = static_cast<std::uint32_t>(std::atoi(argv[5]));
  const int callers = argc > 6 ? std::atoi(argv[6]) : 1;
  const auto weight = static_cast<std::uint32_t>(argc > 7 ? std::atoi(argv[7]) : 1);

  asio::io_context io(1);
  weir::redis::client redis(io.get_executor(), {.port = port});
  weir::redis::rate_limiter<> shared(io.get_executor(), redis,
                                     {.name = name,
                                      .requests = weir::limit{weir::per_second(100), 5},
                                      .max_lease = lease,
                                      .share_weight = weight});
  std::this_thread::sleep_until(start);
  const auto end = std::chrono::steady_clock::now() + seconds;
  long admitted = 0;
  int running = callers;
  for (int c = 0; c < callers; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          for (;;) {
            co_await shared.async_acquire({.requests = 1}, asio::use_awaitable);
            if (std::chrono::steady_clock::now() >= end) break;
            ++admitted;
          }
          // An open connection keeps io.run() going, as any socket would.
          if (--running == 0) redis.close();
        },
        asio::detached);
  io.run();
  fmt::print("{}\n", admitted);
}
