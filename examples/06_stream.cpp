// A streamed call through a pipeline. The call returns at its first chunk, so the retry acts
// until the first token and no further; the stages stay entered until the stream ends. The
// "server" is a local generator: its first attempt is reset before any token (the retry opens it
// again: the caller saw nothing), the second writes six words 20 ms apart and then the usage it
// counted. The queue's slot is held while the caller reads; at the end the usage monitor settles
// to the 12 + 6 tokens the server reported, not to the 12 + 500 the caller estimated.
#include <weir/composition/pipeline.hpp>
#include <weir/composition/stream.hpp>
#include <weir/failure/retry.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <array>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;

// One chunk of the answer: a word, or the final usage.
struct chunk {
  std::string text;
  std::optional<weir::token_usage> usage{};
};

// How the chunks count: the usage when reported, else one token per word.
void tally(const chunk& c, weir::stream_tally& t) {
  if (!c.usage) {
    ++t.counted_output_tokens;
    return;
  }
  t.reported_input_tokens = c.usage->input_tokens;
  t.reported_output_tokens = c.usage->output_tokens;
}

constexpr std::array<const char*, 6> words{"Once", "upon", "a", "time,", "a", "queue..."};

// The server's next chunk (nullopt at the end); `attempt` 1 is reset before its first.
asio::awaitable<std::optional<chunk>> next_chunk(int attempt, std::shared_ptr<std::size_t> sent) {
  asio::steady_timer gap(co_await asio::this_coro::executor, *sent == 0 ? 50ms : 20ms);
  co_await gap.async_wait(asio::use_awaitable);
  if (attempt == 1) throw boost::system::system_error(asio::error::connection_reset);
  const std::size_t n = (*sent)++;
  if (n < words.size()) co_return chunk{words[n]};
  if (n == words.size())
    co_return chunk{"", weir::token_usage{.input_tokens = 12, .output_tokens = 6}};
  co_return std::nullopt;
}

int main() {
  asio::io_context io;
  weir::usage_monitor<> monitor;
  weir::retry<> retry({.max_attempts = 3, .backoff = weir::backoff::constant(10ms)});
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
  auto guarded = weir::pipeline(monitor, retry, queue);  // the monitor counts the call, once

  int attempts = 0;
  auto open = [&] {
    fmt::print("attempt {} opens the stream\n", ++attempts);
    return weir::open_stream<chunk>(
        [attempt = attempts, sent = std::make_shared<std::size_t>(0)] {
          return next_chunk(attempt, sent);
        },
        {.first_token = 1s, .idle = 1s, .tally = tally});
  };
  std::string text;
  bool slot_held_throughout = true;
  std::uint64_t settled_at_return = 1;
  auto call = [&]() -> asio::awaitable<void> {
    weir::call_context ctx{.input_tokens = 12, .output_tokens = 500, .operation = "story"};
    auto story = co_await guarded(ctx, open);  // at the first chunk
    settled_at_return = monitor.totals().tokens;
    fmt::print(
        "returned at the first chunk, {} ms after the stream opened; queue slots held: {}\n",
        std::chrono::duration_cast<std::chrono::milliseconds>(story.report().time_to_first_token)
            .count(),
        queue.in_flight());
    while (auto c = co_await story.next()) {
      slot_held_throughout = slot_held_throughout && queue.in_flight() == 1;
      if (!c->usage) text += (text.empty() ? "" : " ") + c->text;
    }
    fmt::print("read: {}\n", text);
  };
  asio::co_spawn(io, call(), [](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
  });
  io.run();

  const auto settled = monitor.totals();
  fmt::print("settled at the end: {} call, {} tokens; queue slots held: {}\n", settled.requests,
             settled.tokens, queue.in_flight());
  return attempts == 2 && slot_held_throughout && text == "Once upon a time, a queue..." &&
                 settled_at_return == 0 && settled.requests == 1 && settled.tokens == 18 &&
                 queue.in_flight() == 0
             ? 0
             : 1;
}
