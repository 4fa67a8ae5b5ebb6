// libcurl's multi-socket API driven by Asio (weir::curl::multi): 64 *streamed* chat requests in
// flight at once on the one thread that runs the io_context. curl::open_event_stream turns each
// transfer's body into a weir::stream of server-sent events: the pipeline around it — a retry
// and a bounded queue — acts until the first event, the queue's slot is held until the stream
// ends, and however it ends (read to the end, closed, broken) the transfer is removed, not left
// to run on. One caller in eight closes its stream after its first token, of an answer of 2,000
// to 8,000 tokens (10 to 40 s to write) it no longer wants. The server is weir's mock in its
// self-hosted form: 16 workers, 200 ms to the first token, tokens 5 ms apart, no rate limit.
//
//     example_11_curl_multi
#include <weir/http/curl.hpp>
#include <weir/testing/mock_provider.hpp>
#include <weir/weir.hpp>

#include <fmt/core.h>
#include <boost/asio.hpp>

#include <algorithm>
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
                                       .per_output_token = std::chrono::microseconds(5'000),
                                       .workers = 16});
  server.start();
  auto server_work = asio::make_work_guard(server_io);
  std::thread server_thread([&] { server_io.run(); });

  asio::io_context io(1);  // the client's one thread
  weir::curl::multi transfers(io.get_executor());
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 64, .max_queued = 1'000});
  weir::retry<> retry({.max_attempts = 3, .backoff = weir::backoff::constant(100ms)});
  auto guarded = weir::pipeline(retry, queue);

  const auto url = server.base_url() + "/chat/completions";
  const int calls = 64;
  const auto closes_early = [](int i) { return i % 8 == 0; };
  const unsigned long_answer = 8'000;
  int streamed = 0, closed = 0, failed = 0;
  std::uint64_t events = 0, tokens = 0;
  std::vector<double> first_tokens;
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i)
    asio::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          const unsigned max_tokens = closes_early(i) ? long_answer : 8;
          const auto body = fmt::format(
              R"({{"model":"llama","messages":[{{"role":"user","content":"request {}"}}],)"
              R"("max_tokens":{},"stream":true,"stream_options":{{"include_usage":true}}}})",
              i, max_tokens);
          weir::call_context ctx{
              .input_tokens = 3, .output_tokens = max_tokens, .operation = "chat"};
          try {
            const auto asked = std::chrono::steady_clock::now();
            // Each attempt starts a new transfer on its own easy handle.
            auto reply = co_await guarded(ctx, [&] {
              auto request = std::make_unique<weir::curl::easy>(url);
              request->add_header("Content-Type: application/json").post(body);
              return weir::curl::open_event_stream(
                  transfers, std::move(request),
                  {.first_token = 5s, .idle = 2s, .tally = weir::http::sse::openai_tally});
            });
            first_tokens.push_back(
                std::chrono::duration<double>(std::chrono::steady_clock::now() - asked).count());
            if (closes_early(i)) {  // the user stopped it: its transfer is removed at once
              reply.close();
              ++closed;
              co_return;
            }
            for (;;) {
              auto event = co_await reply.next();
              if (!event) break;
              ++events;
            }
            const auto tally = reply.report().tally;
            tokens += tally.reported_output_tokens.value_or(tally.counted_output_tokens);
            ++streamed;
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

  std::sort(first_tokens.begin(), first_tokens.end());
  const auto median = first_tokens.empty() ? 0.0 : first_tokens[first_tokens.size() / 2];
  const auto seen = server.stats();
  fmt::print(
      "{} of {} streamed curl transfers read to the end in {:.2f} s on one thread: {} events, {} "
      "tokens; first token after {:.0f} ms (median); at most {} waited for the server's 16 "
      "workers; {} closed after their first token, their transfers removed\n",
      streamed, calls, seconds, events, tokens, median * 1000, seen.longest_queue, closed);
  // The time is reported, not judged, but for this: a transfer left running after its stream
  // was closed would have held the run for at least 10 s.
  const bool removed = seconds < 8;
  return streamed + closed == calls && failed == 0 && removed ? 0 : 1;
}
