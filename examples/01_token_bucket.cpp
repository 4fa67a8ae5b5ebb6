// A token bucket: 5 requests a second with room for 2 at once. Eight callers arrive together;
// two go at once, the rest are let through a fifth of a second apart, in arrival order. One more
// caller will not wait longer than 300 ms and is refused at once with the wait it would have had.
#include <weir/throttling/token_bucket.hpp>

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;

std::vector<int> sent;  // the callers, in the order they were let through
bool impatient_refused = false;

asio::awaitable<void> caller(weir::token_bucket<>& bucket, int id,
                             std::chrono::steady_clock::time_point start) {
  co_await bucket.async_acquire(1, asio::use_awaitable);
  const auto at = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - start);
  fmt::print("caller {} sends at {}\n", id, at);
  sent.push_back(id);
}

asio::awaitable<void> impatient(weir::token_bucket<>& bucket) {
  auto [ec, wait] = co_await bucket.async_acquire(1, 300ms, asio::as_tuple(asio::use_awaitable));
  impatient_refused = ec == weir::error::rate_limited;
  fmt::print("the impatient caller: {} (it would have waited {})\n", ec.message(),
             std::chrono::duration_cast<std::chrono::milliseconds>(wait));
}

int main() {
  asio::io_context io;
  weir::token_bucket<> bucket(io.get_executor(), {.rate = weir::per_second(5), .burst = 2});
  const auto start = std::chrono::steady_clock::now();
  for (int id = 1; id <= 8; ++id) asio::co_spawn(io, caller(bucket, id, start), asio::detached);
  asio::co_spawn(io, impatient(bucket), asio::detached);
  io.run();
  // Never blocks: whether a unit is there now.
  fmt::print("try_acquire now: {}\n", bucket.try_acquire());
  return sent == std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8} && impatient_refused ? 0 : 1;
}
