// A consumer of the installed package: it only needs find_package(weir) and weir::weir.
#ifdef CONSUMER_CORE_ONLY
#include <weir/core/error.hpp>
#include <weir/throttling/token_bucket.hpp>
#else
#include <weir/weir.hpp>
#endif
#ifdef CONSUMER_HAS_HTTP_CLIENT
#include <weir/http/client.hpp>
#endif
#ifdef CONSUMER_HAS_REDIS
#include <weir/redis/rate_limiter.hpp>
#endif
#ifdef CONSUMER_HAS_CURL
#include <weir/http/curl.hpp>
#endif

#include <fmt/core.h>
#include <boost/asio/io_context.hpp>

int main() {
  boost::asio::io_context io;
  weir::token_bucket<> bucket(io.get_executor(), {.rate = weir::per_second(1), .burst = 3});
  int admitted = 0;
  while (bucket.try_acquire()) ++admitted;
  weir::error_code ec = weir::error::rate_limited;
  fmt::print("consumer: a burst of {} admitted, then {}\n", admitted, ec.message());
  bool optional_parts = true;
#ifdef CONSUMER_HAS_HTTP_CLIENT
  optional_parts &= weir::http::endpoint::parse("https://api.openai.com/v1").port == "443";
  fmt::print("consumer: weir::http_client\n");
#endif
#ifdef CONSUMER_HAS_CURL
  optional_parts &= weir::curl::retryable(CURLE_COULDNT_CONNECT);
  fmt::print("consumer: weir::curl\n");
#endif
#ifdef CONSUMER_HAS_REDIS
  optional_parts &= weir::redis::rate_limiter_options{}.name == "default";
  fmt::print("consumer: weir::redis\n");
#endif
  return admitted == 3 && optional_parts ? 0 : 1;
}
