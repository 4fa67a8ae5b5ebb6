// Code that already makes blocking libcurl calls keeps them: each runs on a thread pool, and the
// coroutine that awaits it goes through a weir pipeline — a retry that obeys the server's
// Retry-After and judges curl's results, and a limiter that paces the calls under the limit.
// The server is weir's mock OpenAI provider on 127.0.0.1, allowing 120 requests a minute with a
// burst of 4; 24 calls go out 8 at a time.
//
//     example_10_curl_blocking
#include <weir/http/curl.hpp>
#include <weir/testing/mock_provider.hpp>
#include <weir/weir.hpp>

#include <fmt/core.h>
#include <boost/asio.hpp>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

// What the team had: a blocking POST with libcurl.
weir::curl::response post_chat(const std::string& url, const std::string& body) {
  weir::curl::easy request(url);
  request.add_header("Content-Type: application/json").post(body);
  request.set(CURLOPT_TIMEOUT_MS, 10'000L);
  return weir::curl::perform(request);  // blocks this thread until the answer
}

// The same call, run on the pool so that it blocks one of the pool's threads, never the
// io_context's.
asio::awaitable<weir::curl::response> on_pool(std::string url, std::string body) {
  co_return post_chat(url, body);
}

}  // namespace

int main() {
  curl_global_init(CURL_GLOBAL_DEFAULT);  // once, before any thread makes a handle
  // The provider, on its own thread.
  asio::io_context server_io;
  weir::testing::mock_provider server(server_io.get_executor(),
                                      {.name = "openai",
                                       .models = {{"gpt-mini", 120, 1'000'000, 0}},
                                       .burst_seconds = 2,
                                       .base_latency = std::chrono::microseconds(5'000)});
  server.start();
  auto server_work = asio::make_work_guard(server_io);
  std::thread server_thread([&] { server_io.run(); });

  asio::io_context io;
  asio::thread_pool pool(4);
  weir::retry<std::chrono::steady_clock, weir::curl::response_classifier> retry(
      {.max_attempts = 5, .backoff = weir::backoff::exponential(100ms, 2.0, 2s)});
  weir::token_bucket<> pace(io.get_executor(), {.rate = weir::per_minute(120), .burst = 4});
  auto guarded = weir::pipeline(retry, pace);

  const auto url = server.base_url() + "/chat/completions";
  const std::string body =
      R"({"model":"gpt-mini","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16})";
  std::atomic<int> answered{0}, failed{0}, next{0};
  const int calls = 24;
  const auto started = std::chrono::steady_clock::now();
  for (int worker = 0; worker < 8; ++worker)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          while (next++ < calls) {
            try {
              auto reply = co_await guarded(
                  [&] { return asio::co_spawn(pool, on_pool(url, body), asio::use_awaitable); });
              ++(reply.status == 200 ? answered : failed);
            } catch (const std::exception& e) {
              fmt::print("failed: {}\n", e.what());
              ++failed;
            }
          }
        },
        asio::detached);
  io.run();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  pool.join();
  server.stop();
  server_work.reset();
  server_thread.join();

  const auto seen = server.stats();
  fmt::print(
      "{} of {} blocking curl calls answered in {:.1f} s, on 4 pool threads; the server answered "
      "{} with 429\n",
      answered.load(), calls, seconds, seen.status(429));
  return answered == calls && failed == 0 ? 0 : 1;
}
