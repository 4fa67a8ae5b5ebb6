// libcurl's multi-socket API driven by Asio (weir::curl::multi): 64 chat requests in flight at
// once on the one thread that runs the io_context, each through a pipeline with a bounded queue
// and a retry. The server is weir's mock in its self-hosted form: 16 workers, 200 ms a request,
// no rate limit, so one at a time would take 12.8 s and 16 at a time 0.8 s.
//
//     example_08_curl_multi
#include <weir/curl.hpp>
#include <weir/testing/mock_provider.hpp>
#include <weir/weir.hpp>

#include <fmt/core.h>
#include <boost/asio.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int main() {
  curl_global_init(CURL_GLOBAL_DEFAULT);  // once, before any thread makes a handle
  asio::io_context server_io;
  weir::testing::mock_provider server(server_io.get_executor(),
                                      {.name = "vllm",
                                       .models = {{"llama", 0, 0, 0}},
                                       .base_latency = std::chrono::microseconds(200'000),
                                       .per_output_token = std::chrono::microseconds(0),
                                       .workers = 16});
  server.start();
  auto server_work = asio::make_work_guard(server_io);
  std::thread server_thread([&] { server_io.run(); });

  asio::io_context io(1);  // the client's one thread
  weir::curl::multi transfers(io.get_executor());
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 64, .max_queued = 1'000});
  weir::retry<std::chrono::steady_clock, weir::curl::response_classifier> retry(
      {.max_attempts = 3, .backoff = weir::backoff::constant(100ms)});
  auto guarded = weir::pipeline(retry, queue);

  const auto url = server.base_url() + "/chat/completions";
  const int calls = 64;
  int answered = 0, failed = 0;
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i)
    asio::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          // One easy handle per request, kept for its retries.
          auto request = std::make_unique<weir::curl::easy>(url);
          request->add_header("Content-Type: application/json")
              .post(fmt::format(R"({{"model":"llama","messages":[{{"role":"user","content":)"
                                R"("request {}"}}],"max_tokens":8}})",
                                i));
          try {
            auto reply = co_await guarded([&] { return transfers.perform(*request); });
            ++(reply.status == 200 ? answered : failed);
          } catch (const std::exception& e) {
            fmt::print("failed: {}\n", e.what());
            ++failed;
          }
        },
        asio::detached);
  io.run();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  server.stop();
  server_work.reset();
  server_thread.join();

  const auto seen = server.stats();
  fmt::print(
      "{} of {} curl transfers answered in {:.2f} s on one thread (one at a time: 12.8 s); at most "
      "{} waited for the server's 16 workers\n",
      answered, calls, seconds, seen.longest_queue);
  // The time is reported, not judged: a busy machine must not fail the example.
  return answered == calls && failed == 0 ? 0 : 1;
}
