// A consumer of the installed package: it only needs find_package(weir) and weir::weir.
#include <weir/weir.hpp>

#include <fmt/core.h>
#include <boost/asio/io_context.hpp>

int main() {
  boost::asio::io_context io;
  weir::token_bucket<> bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 3});
  int admitted = 0;
  while (bucket.try_acquire()) ++admitted;
  weir::error_code ec = weir::error::rate_limited;
  fmt::print("consumer: a burst of {} admitted, then {}\n", admitted, ec.message());
  return admitted == 3 ? 0 : 1;
}
