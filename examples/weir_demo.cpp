// weir-demo (first cut): the same burst of requests sent to a provider that allows 20 requests/s
// with a burst of 5, once the naive way (fire, and back off exponentially on every 429) and once
// through weir (a request_queue and rate_limits in front of the call). The provider is simulated
// in-process with its own token bucket; each answer takes 50 ms.
//
//     weir-demo [--requests N] [--concurrency N]
#include <weir/weir.hpp>

#include <fmt/core.h>
#include <boost/asio.hpp>

#include <charconv>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <string_view>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

struct settings {
  int requests = 60;
  int concurrency = 8;
};

struct tally {
  int completed = 0;
  int rejected_429 = 0;
  steady::duration elapsed{};
};

// The provider: refuses with 429 whatever its own limiter refuses.
class provider {
 public:
  explicit provider(asio::any_io_executor ex)
      : server_limit_(ex, {.rate = weir::per_second(20), .burst = 5}) {}

  asio::awaitable<int> call() {
    const int status = server_limit_.try_acquire() ? 200 : 429;
    asio::steady_timer latency(co_await asio::this_coro::executor, 50ms);
    co_await latency.async_wait(asio::use_awaitable);
    co_return status;
  }

 private:
  weir::token_bucket<> server_limit_;
};

// The naive client from countless blog posts: fire, and on a 429 sleep 100 ms × 2^attempt.
asio::awaitable<void> naive_worker(provider& p, int& next, const settings& s, tally& t) {
  asio::steady_timer backoff(co_await asio::this_coro::executor);
  while (next < s.requests) {
    ++next;
    for (int attempt = 0;; ++attempt) {
      if (co_await p.call() == 200) break;
      ++t.rejected_429;
      backoff.expires_after(100ms * (1 << std::min(attempt, 6)));
      co_await backoff.async_wait(asio::use_awaitable);
    }
    ++t.completed;
  }
}

// The weir client: admitted by the queue, paced by the limits, so the provider never says no.
asio::awaitable<void> weir_worker(provider& p, weir::request_queue& queue,
                                  weir::rate_limits<>& limits, int& next, const settings& s,
                                  tally& t) {
  while (next < s.requests) {
    ++next;
    auto permit = co_await queue.async_admit(asio::use_awaitable);
    co_await limits.async_acquire({.requests = 1}, asio::use_awaitable);
    if (co_await p.call() != 200) ++t.rejected_429;
    ++t.completed;
  }
}

tally run(bool with_weir, const settings& s) {
  asio::io_context io;
  provider p(io.get_executor());
  weir::request_queue queue(io.get_executor(),
                            {.max_concurrent = static_cast<std::size_t>(s.concurrency),
                             .max_queued = static_cast<std::size_t>(s.requests)});
  // A little under the provider's limit: a strict limiter punishes overshoot, not undershoot.
  weir::rate_limits<> limits(io.get_executor(), {.requests = weir::limit{weir::per_second(19), 5}});
  tally t;
  int next = 0;
  const auto start = steady::now();
  for (int w = 0; w < s.concurrency; ++w) {
    if (with_weir)
      asio::co_spawn(io, weir_worker(p, queue, limits, next, s, t), asio::detached);
    else
      asio::co_spawn(io, naive_worker(p, next, s, t), asio::detached);
  }
  asio::steady_timer progress(io);
  std::function<void()> tick = [&] {
    progress.expires_after(500ms);
    progress.async_wait([&](weir::error_code ec) {
      if (ec || t.completed == s.requests) return;
      fmt::print("  {:5} {:>4}/{} done, {:>3} × 429\n", with_weir ? "weir" : "naive", t.completed,
                 s.requests, t.rejected_429);
      tick();
    });
  };
  tick();
  io.run();  // ends when every worker is done and the progress timer has stopped
  t.elapsed = steady::now() - start;
  return t;
}

int parse_positive(std::string_view flag, const char* value) {
  int n = 0;
  std::string_view text = value ? value : "";
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (ec != std::errc() || end != text.data() + text.size() || n <= 0) {
    fmt::print(stderr, "weir-demo: {} needs a positive whole number, got '{}'\n", flag, text);
    std::exit(2);
  }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      fmt::print("usage: weir-demo [--requests N] [--concurrency N]\n");
      return 0;
    }
    if (arg == "--requests")
      s.requests = parse_positive(arg, i + 1 < argc ? argv[++i] : nullptr);
    else if (arg == "--concurrency")
      s.concurrency = parse_positive(arg, i + 1 < argc ? argv[++i] : nullptr);
    else {
      fmt::print(stderr, "weir-demo: unknown flag '{}' (try --help)\n", arg);
      return 2;
    }
  }
  fmt::print("{} requests at concurrency {} against a provider allowing 20/s (burst 5)\n",
             s.requests, s.concurrency);
  const auto naive = run(false, s);
  const auto guarded = run(true, s);
  auto seconds = [](steady::duration d) { return std::chrono::duration<double>(d).count(); };
  fmt::print("\n{:<8} {:>10} {:>8} {:>12}\n", "client", "completed", "429s", "time");
  fmt::print("{:<8} {:>10} {:>8} {:>11.2f}s\n", "naive", naive.completed, naive.rejected_429,
             seconds(naive.elapsed));
  fmt::print("{:<8} {:>10} {:>8} {:>11.2f}s\n", "weir", guarded.completed, guarded.rejected_429,
             seconds(guarded.elapsed));
  return guarded.completed == s.requests && guarded.rejected_429 == 0 ? 0 : 1;
}
