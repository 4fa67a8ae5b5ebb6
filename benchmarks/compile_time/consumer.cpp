// A typical consumer translation unit: one pipeline (retry, circuit breaker, request and token
// limits) around libcurl transfers on Asio, including only the headers such a program needs.
// benchmarks/compile_time.sh times its compilation (docs/performance.md, "Compile time"); the
// release build compiles it once, so that it keeps compiling.
#include <weir/composition/pipeline.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/failure/retry.hpp>
#include <weir/http/curl.hpp>
#include <weir/throttling/rate_limits.hpp>

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;

// A provider's client: its transfers and the policies every call goes through. Defined out of
// the class, so that the compiler emits its code as it would for a program that calls it.
class chat_client {
 public:
  explicit chat_client(asio::any_io_executor ex);

  // A chat completion: each attempt is a new transfer on the multi.
  asio::awaitable<weir::curl::response> ask(std::string url, std::string body);

 private:
  weir::curl::multi transfers_;
  weir::retry<> retry_;
  weir::circuit_breaker<> breaker_;
  weir::rate_limits<> limits_;
};

chat_client::chat_client(asio::any_io_executor ex)
    : transfers_(ex),
      retry_({.max_attempts = 4, .backoff = weir::backoff::exponential(200ms)}),
      breaker_({.consecutive_failures = 5, .break_duration = 30s}),
      limits_(ex, {.requests = weir::limit::per_minute(500, 10),
                   .tokens = weir::limit::per_minute(30'000, 4'000)}) {}

asio::awaitable<weir::curl::response> chat_client::ask(std::string url, std::string body) {
  weir::call_context ctx{.tokens = 1'200, .operation = "chat"};
  co_return co_await weir::pipeline(retry_, breaker_, limits_)(ctx, [&] {
    weir::curl::easy request(url);
    request.add_header("Content-Type: application/json").post(body);
    return transfers_.perform(request);
  });
}
