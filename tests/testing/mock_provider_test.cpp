// Specifications of weir/testing/mock_provider.hpp: the mock provider over loopback, as the chat
// client sees it (real sockets and short real time; built with demo_test.cpp, whose aliases of
// the demo's workload it uses: see tests/CMakeLists.txt).
#include "demo/workload.hpp"

#include <weir/http/client.hpp>
#include <weir/testing/mock_provider.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

TEST_CASE("a self-hosted mock queues for its workers, without limit headers, 503 when full") {
  demo::asio::io_context io(1);
  // One worker and room for one to wait: of four requests sent together, those that find both
  // taken are answered 503.
  weir::testing::mock_provider server(io.get_executor(),
                                      {.name = "local",
                                       .models = {{"llama", 0, 0, 0}},
                                       .base_latency = std::chrono::milliseconds(400),
                                       .per_output_token = std::chrono::microseconds(0),
                                       .workers = 1,
                                       .max_queue = 1});
  server.start();
  const auto where = weir::http::endpoint::parse(server.base_url());
  std::vector<std::unique_ptr<weir::http::chat_client>> clients;
  std::vector<std::pair<unsigned, demo::steady::duration>> answers;
  const auto start = demo::steady::now();
  for (int i = 0; i < 4; ++i) {
    clients.push_back(std::make_unique<weir::http::chat_client>(
        io.get_executor(), weir::http::dialect::openai, where));
    demo::asio::co_spawn(
        io,
        [&, c = clients.back().get()]() -> demo::asio::awaitable<void> {
          const weir::http::chat_request ask{.model = "llama", .prompt = "hi", .max_tokens = 4};
          auto res = co_await c->complete(ask, std::chrono::seconds(30));
          answers.emplace_back(res.result_int(), demo::steady::now() - start);
          if (res.result_int() == 200) {
            CHECK(res["x-ratelimit-limit-requests"].empty());
          }
          if (answers.size() == 4) server.stop();
        },
        demo::asio::detached);
  }
  io.run();
  REQUIRE(answers.size() == 4);
  const auto stats = server.stats();
  CHECK(stats.status(200) + stats.status(503) == 4);
  CHECK(stats.status(200) >= 2);  // the first served and the one that waited
  CHECK(stats.longest_queue == 1);
  CHECK(stats.serving == 0);
  CHECK(stats.waiting == 0);
  // The one that waited took two services: the server queued it rather than serving it at once.
  demo::steady::duration slowest{};
  for (const auto& [status, took] : answers)
    if (status == 200) slowest = std::max(slowest, took);
  CHECK(slowest >= std::chrono::milliseconds(800));
}

TEST_CASE("the mock provider speaks both dialects with their rate-limit headers") {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(
      io.get_executor(), {.name = "m",
                          .models = {{"small", 60, 10'000, 100}},
                          .burst_seconds = 2,  // two requests at once, then one per second
                          .base_latency = std::chrono::microseconds(0)});
  server.start();
  const auto where = weir::http::endpoint::parse(server.base_url());
  weir::http::chat_client openai(io.get_executor(), weir::http::dialect::openai, where);
  weir::http::chat_client anthropic(io.get_executor(), weir::http::dialect::anthropic, where);
  std::vector<demo::response> answers;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        const weir::http::chat_request small{
            .model = "small", .prompt = std::string(40, 'x'), .max_tokens = 10};
        for (auto* client : {&openai, &anthropic, &openai})
          answers.push_back(co_await client->complete(small, std::chrono::seconds(5)));
        const weir::http::chat_request large{
            .model = "small", .prompt = std::string(400, 'x'), .max_tokens = 10};
        answers.push_back(co_await openai.complete(large, std::chrono::seconds(5)));
        server.stop();
      },
      demo::asio::detached);
  io.run();
  REQUIRE(answers.size() == 4);
  CHECK(answers[0].result_int() == 200);
  CHECK(answers[0]["x-ratelimit-limit-requests"] == "60");
  CHECK(answers[0]["x-ratelimit-remaining-requests"] == "59");  // of the minute's 60
  CHECK(demo::usage_of(answers[0])->input_tokens == 10);
  CHECK(answers[1].result_int() == 200);
  CHECK(answers[1]["anthropic-ratelimit-requests-remaining"] == "58");
  CHECK(demo::usage_of(answers[1])->input_tokens == 10);
  CHECK(answers[2].result_int() == 429);
  CHECK(answers[2][boost::beast::http::field::retry_after] == "1");
  const auto judged = weir::http::response_classifier{}.judge(answers[2]);
  CHECK(judged.kind == weir::verdict::rate_limited);
  REQUIRE(judged.hint.retry_after);
  CHECK(*judged.hint.retry_after > std::chrono::milliseconds(900));
  CHECK(*judged.hint.retry_after <= std::chrono::seconds(1));
  CHECK(answers[3].result_int() == 400);  // 100 + 10 tokens do not fit a 100-token window
  CHECK(weir::http::context_length_exceeded(answers[3]));
  const auto stats = server.stats();
  CHECK(stats.requests == 4);
  CHECK(stats.status(200) == 2);
  CHECK(stats.status(429) == 1);
  CHECK(stats.status(400) == 1);
}

TEST_CASE("the mock provider caches prompt prefixes and reports the cache reads in both dialects",
          "[cache]") {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(io.get_executor(),
                                      {.name = "m",
                                       .models = {{"small", 600, 600'000, 0}},
                                       .base_latency = std::chrono::microseconds(0),
                                       .prompt_cache_ttl = std::chrono::minutes(5)});
  server.start();
  const auto where = weir::http::endpoint::parse(server.base_url());
  weir::http::chat_client openai(io.get_executor(), weir::http::dialect::openai, where);
  weir::http::chat_client anthropic(io.get_executor(), weir::http::dialect::anthropic, where);
  // A conversation: its second prompt resends the first (two whole 512-character blocks of it)
  // and adds to it; the third resends the second.
  std::string letters;
  for (int i = 0; i < 1100; ++i) letters += static_cast<char>('a' + i % 26);
  const std::string first = letters;
  const std::string second = first + std::string(1000, 'y');
  std::vector<demo::response> answers;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        for (auto [client, prompt] : {std::pair{&openai, &first}, std::pair{&openai, &second},
                                      std::pair{&anthropic, &second}}) {
          const weir::http::chat_request ask{.model = "small", .prompt = *prompt, .max_tokens = 4};
          answers.push_back(co_await client->complete(ask, std::chrono::seconds(5)));
        }
        server.stop();
      },
      demo::asio::detached);
  io.run();
  REQUIRE(answers.size() == 3);
  std::vector<weir::token_usage> used;
  for (const auto& a : answers) {
    REQUIRE(demo::usage_of(a));
    used.push_back(*demo::usage_of(a));
  }
  CHECK(used[0].input_tokens == 275);
  CHECK(used[0].cache_read_tokens == 0);
  CHECK(used[1].input_tokens == 525);
  CHECK(used[1].cache_read_tokens == 256);  // the first prompt's two whole blocks
  CHECK(used[2].input_tokens == 525);       // Anthropic's three counts, added up
  CHECK(used[2].cache_read_tokens == 512);  // the second prompt's four whole blocks
  CHECK(used[2].cache_write_tokens == 0);
  CHECK(answers[2].body().find(R"("cache_read_input_tokens":512)") != std::string::npos);
  const auto stats = server.stats();
  CHECK(stats.cache_read_tokens == 768);
  CHECK(stats.cache_write_tokens == 512);  // two blocks, then two more
}

namespace {
// How one streamed request through the chat client ended.
struct streamed {
  std::size_t events = 0;
  weir::stream_report report{};
  weir::classification judged{};  // the stream, as the default classifier judged it when it came
  std::exception_ptr failure{};   // before the first event (open) or after it (next)
  bool opened = false;
};

streamed stream_once(weir::testing::mock_provider_options options, weir::http::dialect speaks,
                     weir::stream_options<weir::http::sse::event> timeouts = {}) {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(io.get_executor(), std::move(options));
  server.start();
  weir::http::chat_client client(io.get_executor(), speaks,
                                 weir::http::endpoint::parse(server.base_url()));
  streamed out;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        const weir::http::chat_request ask{
            .model = "small", .prompt = std::string(40, 'x'), .max_tokens = 12};
        try {
          auto s = co_await client.stream(ask, timeouts, std::chrono::seconds(10));
          out.opened = true;
          auto opened =
              weir::outcome<weir::stream<weir::http::sse::event>>::from_value(std::move(s));
          out.judged = weir::default_classifier{}(opened);
          s = std::move(opened).get();
          for (;;) {
            auto e = co_await s.next();
            if (!e) break;
            ++out.events;
          }
          out.report = s.report();
        } catch (...) {
          out.failure = std::current_exception();
        }
        server.stop();
      },
      demo::asio::detached);
  io.run();
  return out;
}

weir::testing::mock_provider_options streaming_mock(weir::testing::fault_profile faults = {}) {
  weir::testing::mock_provider_options o{.name = "m",
                                         .models = {{"small", 600, 100'000, 0}},
                                         .base_latency = std::chrono::microseconds(1'000),
                                         .per_output_token = std::chrono::microseconds(100)};
  o.faults = std::move(faults);
  return o;
}

weir::error_code code_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return x.code();
  } catch (...) {
  }
  return {};
}
}  // namespace

TEST_CASE("the mock provider streams both dialects, and the client reads their usage") {
  using weir::http::dialect;
  for (const auto d : {dialect::openai, dialect::anthropic}) {
    const auto got = stream_once(streaming_mock(), d);
    INFO((d == dialect::openai ? "openai" : "anthropic"));
    REQUIRE(got.opened);
    CHECK_FALSE(got.failure);
    CHECK(got.report.end == weir::stream_end::completed);
    // The final usage chunk is the server's count; the chunks with text, one token each.
    REQUIRE(got.report.tally.reported_output_tokens);
    CHECK(*got.report.tally.reported_output_tokens == got.report.tally.counted_output_tokens);
    CHECK(got.report.tally.reported_input_tokens == 10u);
    CHECK(got.report.tally.source() == weir::usage_source::reported);
    CHECK(got.events == got.report.tally.chunks);
    // The 200's rate-limit headers reach the classifier, and through it the pacing.
    CHECK(got.judged.kind == weir::verdict::success);
    CHECK(got.judged.hint.requests.limit == 600);
    CHECK(got.judged.hint.requests.remaining == 599);
  }
}

TEST_CASE("the mock provider's stream faults: a slow first token, a stall and a reset half way") {
  using namespace std::chrono_literals;
  using weir::http::dialect;
  SECTION("a slow first token is a timeout before the stream opens: retryable") {
    const auto got = stream_once(streaming_mock({.slow_first_tokens = 1, .first_token_delay = 2s}),
                                 dialect::openai, {.first_token = 200ms});
    CHECK_FALSE(got.opened);
    CHECK(code_of(got.failure) == weir::error_code(weir::error::timeout));
    CHECK(weir::default_classifier::classify(got.failure).kind == weir::verdict::retryable);
  }
  SECTION("a stall half way breaks the stream at the idle timeout") {
    const auto got = stream_once(streaming_mock({.stall = 2'000ms, .stream_stalls = 1}),
                                 dialect::anthropic, {.idle = 200ms});
    REQUIRE(got.opened);
    CHECK(code_of(got.failure) == weir::error_code(weir::error::stream_broken));
    CHECK(got.events > 0);
  }
  SECTION("a reset half way breaks the stream; the tokens it sent are counted") {
    const auto got = stream_once(streaming_mock({.stream_resets = 1}), dialect::openai);
    REQUIRE(got.opened);
    CHECK(code_of(got.failure) == weir::error_code(weir::error::stream_broken));
    CHECK(got.events > 0);
  }
  SECTION("a 429 before the stream is a status_error judged by its Retry-After") {
    auto options =
        streaming_mock({.random_429 = 1, .random_429_min = 2'000ms, .random_429_max = 2'000ms});
    const auto got = stream_once(options, dialect::anthropic);
    CHECK_FALSE(got.opened);
    const auto judged = weir::default_classifier::classify(got.failure);
    CHECK(judged.kind == weir::verdict::rate_limited);
    REQUIRE(judged.hint.retry_after);
    CHECK(*judged.hint.retry_after == std::chrono::seconds(2));
  }
}
