// A retry that obeys the server. The "server" here answers 429 twice, saying Retry-After:
// 300 ms, then 200 OK. The classifier turns each reply into a verdict with the server's hint; the
// retry waits exactly what the server asked (not its own backoff, which is shorter) and hands the
// 200 back. A reply the server never stops refusing would come back as the last 429, for the
// caller to read.
#include <weir/failure/retry.hpp>

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <optional>

namespace asio = boost::asio;
using namespace std::chrono_literals;

struct reply {
  int status = 200;
  std::optional<std::chrono::milliseconds> retry_after{};
};

// What a reply means: a 429 is rate-limited with the server's hint, a 5xx retryable.
struct reply_classifier {
  weir::classification operator()(const weir::outcome<reply>& o) const {
    if (!o.has_value()) return weir::default_classifier{}(o);
    const auto& r = o.value();
    if (r.status == 429) return {weir::verdict::rate_limited, {.retry_after = r.retry_after}};
    if (r.status >= 500) return {weir::verdict::retryable, {}};
    return {r.status < 400 ? weir::verdict::success : weir::verdict::fatal, {}};
  }
};

int main() {
  asio::io_context io;
  weir::retry<std::chrono::steady_clock, reply_classifier> retry(
      {.max_attempts = 4,
       .backoff = weir::backoff::exponential(50ms, 2.0, 1s).with(weir::jitter::full),
       .on_retry = [](const weir::retry_attempt& a) {
         fmt::print("attempt {} refused; waiting {}\n", a.attempt,
                    std::chrono::duration_cast<std::chrono::milliseconds>(a.delay));
       }});
  int calls = 0;
  auto server = [&]() -> asio::awaitable<reply> {
    if (++calls <= 2) co_return reply{429, 300ms};
    co_return reply{200};
  };
  const auto start = std::chrono::steady_clock::now();
  asio::co_spawn(io, retry(server), [&](std::exception_ptr e, reply r) {
    if (e) std::rethrow_exception(e);
    fmt::print("{} after {} attempts, {}\n", r.status, calls,
               std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - start));
  });
  io.run();
  return calls == 3 ? 0 : 1;
}
