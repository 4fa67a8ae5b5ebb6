// Specifications of weir/http/client.hpp: the Beast client and the chat client, over loopback
// against a hostile server and the mock provider (real sockets and short real time; built with
// demo_test.cpp: see tests/CMakeLists.txt).
#include "demo/workload.hpp"
#include "../support/common.hpp"

#include <weir/composition/pipeline.hpp>
#include <weir/failure/retry.hpp>
#include <weir/http/client.hpp>
#include <weir/testing/hostile_server.hpp>
#include <weir/testing/mock_provider.hpp>

#include <fmt/format.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

TEST_CASE("the chat client writes each dialect's request, escaped, and parses endpoints") {
  const weir::http::chat_request r{.model = "m", .prompt = "a \"quote\"\n\\ \x01", .max_tokens = 7};
  CHECK(weir::http::chat_body(weir::http::dialect::openai, r) ==
        R"({"model":"m","messages":[{"role":"user","content":"a \"quote\"\n\\ \u0001"}],)"
        R"("max_tokens":7})");
  CHECK(weir::http::chat_body(weir::http::dialect::anthropic, r) ==
        R"({"model":"m","max_tokens":7,"messages":[{"role":"user","content":)"
        R"("a \"quote\"\n\\ \u0001"}]})");
  CHECK(weir::http::auth_headers(weir::http::dialect::anthropic, "k").front().first == "x-api-key");
  CHECK(weir::http::auth_headers(weir::http::dialect::openai, "").empty());

  const auto e = weir::http::endpoint::parse("https://api.example.com/v1/");
  CHECK((e.tls && e.host == "api.example.com" && e.port == "443" && e.path == "/v1"));
  const auto local = weir::http::endpoint::parse("http://127.0.0.1:8080");
  CHECK((!local.tls && local.port == "8080" && local.path.empty()));
  CHECK_THROWS_AS(weir::http::endpoint::parse("ftp://x"), std::invalid_argument);
  CHECK_THROWS_AS(weir::http::endpoint::parse("http://:80/v1"), std::invalid_argument);
  CHECK_THROWS_AS(weir::http::endpoint::parse("http://host:/v1"), std::invalid_argument);
}

// ---- Issue 36: the Beast client against a hostile server on loopback ---------------------------

namespace {
namespace asio = boost::asio;
using hostile = weir::testing::hostile_server;

using weir_test::run_coroutine;

weir::error_code code_of_failure(const std::function<void()>& f) {
  try {
    f();
  } catch (const boost::system::system_error& e) {
    return e.code();
  }
  return {};
}

std::string ok(std::string_view body, std::string_view headers = "") {
  return fmt::format("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{}", body.size(), headers,
                     body);
}
}  // namespace

TEST_CASE("the Beast client skips 1xx responses and reads the final one", "[http][issue36]") {
  for (std::string_view interim :
       {"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n"}) {
    hostile server({std::string(interim) + ok("first"), ok("second")});
    run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
      weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
      const auto a = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
      const auto b = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
      CHECK(a.result_int() == 200);
      CHECK(a.body() == "first");
      CHECK(b.body() == "second");  // not the first caller's answer
    });
  }
}

TEST_CASE("a connection with bytes past the response is not reused", "[http][issue36]") {
  hostile server({ok("first") + ok("stale"), ok("fresh")});
  run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
    // (co_await outside CHECK: g++ 12 evaluates it twice there.)
    const auto a = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
    const auto b = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
    CHECK(a.body() == "first");
    CHECK(b.body() == "fresh");
  });
  CHECK(server.connections() == 2);
}

TEST_CASE("a header value with CR LF is refused before anything is sent, naming the header only",
          "[http][issue36]") {
  hostile server({ok("x")});
  const std::string key = "sk-secret\r\nX-Injected: 1";
  try {
    weir::http::chat_client c(asio::system_executor(), weir::http::dialect::openai,
                              weir::http::endpoint::parse(server.url()), key);
    FAIL("a key with CR LF was taken");
  } catch (const weir::exception& e) {
    CHECK(e.code() == weir::error::invalid_argument);
    const std::string what = e.what();
    CHECK(what.find("authorization") != std::string::npos);
    CHECK(what.find("sk-secret") == std::string::npos);
    CHECK(what.find("Injected") == std::string::npos);
  }
  for (const std::string& value :
       {std::string("a\r\nb"), std::string("a\0b", 3), std::string("a\nb")}) {
    const auto code = code_of_failure([&] {
      run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
        weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
        weir::http::header_list headers{{"x-request-id", value}};
        co_await c.post("/", "{}", headers, std::chrono::seconds(5));
      });
    });
    CHECK(code == weir::error::invalid_argument);
  }
  CHECK(server.requests().empty());
}

TEST_CASE("the Host header keeps a non-default port", "[http][issue36]") {
  hostile server({ok("x")});
  run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
    co_await c.post("/", "{}", {}, std::chrono::seconds(5));
  });
  REQUIRE(server.requests().size() == 1);
  CHECK(server.requests()[0].find(fmt::format("Host: 127.0.0.1:{}\r\n", server.port())) !=
        std::string::npos);
}

TEST_CASE("the Beast client's limits: headers over 8 KB are read, past the limits are fatal",
          "[http][issue36]") {
  const std::string big_headers = fmt::format("X-Padding: {}\r\n", std::string(20'000, 'p'));
  auto post_with = [&](weir::http::response_limits limits, std::string reply) {
    hostile server({std::move(reply)});
    std::optional<unsigned> status;
    const auto code = code_of_failure([&] {
      run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
        weir::http::client c(ex, weir::http::endpoint::parse(server.url()), nullptr, limits);
        status = (co_await c.post("/", "{}", {}, std::chrono::seconds(5))).result_int();
      });
    });
    return std::pair(status, code);
  };
  CHECK(post_with({}, ok("x", big_headers)).first == 200u);
  CHECK(post_with({.max_header_bytes = 4096}, ok("x", big_headers)).second ==
        weir::error::limit_exceeded);
  // 1xx responses count toward it: an endless run of them ends.
  std::string interims;
  for (int i = 0; i < 200; ++i) interims += "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
  CHECK(post_with({.max_header_bytes = 4096}, interims + ok("x")).second ==
        weir::error::limit_exceeded);
  CHECK(post_with({.max_body_bytes = 1024}, ok(std::string(2048, 'b'))).second ==
        weir::error::limit_exceeded);
  const auto limited = weir::outcome<int>::from_exception(std::make_exception_ptr(
      weir::exception(weir::error::limit_exceeded, "http::client: the response's body passed")));
  CHECK(weir::default_classifier{}(limited).kind == weir::verdict::fatal);
}

TEST_CASE("an endless event-stream line ends in limit_exceeded, its memory bounded",
          "[http][issue36]") {
  const std::string head =
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
  const std::string endless_line =
      fmt::format("100000\r\ndata: {}\r\n", std::string(0x100000 - 6, 'x'));
  hostile server({head + endless_line});
  const auto code = code_of_failure([&] {
    run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
      weir::http::chat_client c(ex, weir::http::dialect::openai,
                                weir::http::endpoint::parse(server.url()), "k", nullptr,
                                {.max_sse_line_bytes = 64 * 1024});
      const weir::http::chat_request ask{.model = "m", .prompt = "p"};
      auto events = co_await c.open_events(ask, std::chrono::seconds(5));
      while (co_await events->next()) {
      }
    });
  });
  CHECK(code == weir::error::limit_exceeded);
}

TEST_CASE(
    "a stream past max_transfer_time ends, and an error body that trickles ends by its "
    "timeout",
    "[http][issue36]") {
  SECTION("a stream that never ends") {
    std::string events =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 3000; ++i) events += "f\r\ndata: {\"n\":1}\n\n\r\n";
    hostile server({events}, {.trickle_bytes = 64, .pause = std::chrono::milliseconds(20)});
    const auto started = std::chrono::steady_clock::now();
    const auto code = code_of_failure([&] {
      run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
        weir::http::chat_client c(ex, weir::http::dialect::openai,
                                  weir::http::endpoint::parse(server.url()), "k", nullptr,
                                  {.max_transfer_time = std::chrono::milliseconds(300)});
        const weir::http::chat_request ask{.model = "m", .prompt = "p"};
        auto source = co_await c.open_events(ask, std::chrono::seconds(5));
        while (co_await source->next()) {
        }
      });
    });
    CHECK(code == weir::error::limit_exceeded);
    CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));  // 20 s in all
  }
  SECTION("a 429 whose body comes a byte at a time") {
    const std::string reply = fmt::format(
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 200\r\n\r\n{}",
        std::string(200, 'e'));
    hostile server({reply}, {.trickle_bytes = 1,
                             .at_once = reply.size() - 200,
                             .pause = std::chrono::milliseconds(20)});
    const auto started = std::chrono::steady_clock::now();
    std::optional<unsigned> status;
    std::optional<std::chrono::nanoseconds> retry_after;
    run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
      weir::http::chat_client c(ex, weir::http::dialect::openai,
                                weir::http::endpoint::parse(server.url()), "k");
      const weir::http::chat_request ask{.model = "m", .prompt = "p"};
      try {
        co_await c.open_events(ask, std::chrono::milliseconds(500));
      } catch (const weir::http::status_error& e) {
        status = e.status();
        retry_after = e.judged().hint.retry_after;
      }
    });
    CHECK(status == 429u);  // judged by what came, the Retry-After kept
    CHECK(retry_after == std::chrono::seconds(7));
    // The body is cut at the timeout, 0.5 s (it would take 4 s).
    CHECK(std::chrono::steady_clock::now() - started < std::chrono::milliseconds(2500));
  }
}

// ---- Issue 31: errors inside a 200 stream, and times counted from the request ------------------

using namespace std::chrono_literals;

namespace {
// A 200 event stream whose body is `events`.
std::string event_stream(std::string_view events) {
  return fmt::format(
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{}",
      events.size(), events);
}
const std::string openai_role =
    "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
const std::string openai_hi = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
const std::string openai_done = "data: [DONE]\n\n";

// What a streamed chat call through a retry came to: the events read, or the failure.
struct streamed_call {
  std::vector<weir::http::sse::event> events;
  std::exception_ptr failure;
  bool opened = false;
  weir::stream_report report{};
};

streamed_call stream_through_retry(const hostile& server, weir::http::dialect speaks,
                                   weir::stream_options<weir::http::sse::event> options = {}) {
  streamed_call out;
  run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::http::chat_client c(ex, speaks, weir::http::endpoint::parse(server.url()), "k");
    weir::retry<> retry({.max_attempts = 3, .backoff = weir::backoff::constant(10ms)});
    auto guarded = weir::pipeline(retry);
    const weir::http::chat_request ask{.model = "m", .prompt = "p"};
    weir::call_context ctx{.tokens = 10};
    try {
      auto s = co_await guarded(ctx, [&] { return c.stream(ask, options, 5s); });
      out.opened = true;
      for (;;) {
        auto e = co_await s.next();
        if (!e) break;
        out.events.push_back(std::move(*e));
      }
      out.report = s.report();
    } catch (...) {
      out.failure = std::current_exception();
    }
  });
  return out;
}

weir::verdict verdict_of(const std::exception_ptr& e) {
  return weir::default_classifier{}(weir::outcome<int>::from_exception(e)).kind;
}
}  // namespace

TEST_CASE("the Beast stream: an error event before content is retried as its type says",
          "[http][issue31]") {
  SECTION("OpenAI's rate limit, after the role chunk") {
    hostile server(
        {event_stream(openai_role +
                      "data: {\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\","
                      "\"param\":null,\"code\":\"rate_limit_exceeded\"}}\n\n"),
         event_stream(openai_role + openai_hi + openai_done)});
    const auto got = stream_through_retry(server, weir::http::dialect::openai);
    CHECK_FALSE(got.failure);
    CHECK(server.requests().size() == 2);
    REQUIRE(got.events.size() == 2);
    CHECK(got.events[1].data.find("Hi") != std::string::npos);
    CHECK(got.report.end == weir::stream_end::completed);
  }
  SECTION("Anthropic's overloaded error, after message_start") {
    const std::string start =
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":"
        "{\"input_tokens\":5}}}\n\n";
    hostile server(
        {event_stream(start + "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":"
                              "\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"),
         event_stream(start + "event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
                              "\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n"
                              "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")});
    const auto got = stream_through_retry(server, weir::http::dialect::anthropic);
    CHECK_FALSE(got.failure);
    CHECK(server.requests().size() == 2);
    REQUIRE(got.events.size() == 2);
    CHECK(got.events[1].type == "content_block_delta");
  }
}

TEST_CASE("the Beast stream: an error event after content breaks the stream with its verdict",
          "[http][issue31]") {
  hostile server({event_stream(openai_role + openai_hi +
                               "data: {\"error\":{\"type\":\"tokens\",\"code\":"
                               "\"rate_limit_exceeded\"}}\n\n" +
                               openai_hi + openai_done)});
  const auto got = stream_through_retry(server, weir::http::dialect::openai);
  CHECK(got.opened);
  CHECK(got.events.size() == 2);  // the role and the text; not the error, nor what followed it
  REQUIRE(got.failure);
  CHECK(weir::detail::weir_code(got.failure) == weir::error_code(weir::error::stream_broken));
  CHECK(verdict_of(got.failure) == weir::verdict::rate_limited);
  CHECK(server.requests().size() == 1);  // delivered, so not retried
}

TEST_CASE(
    "the Beast stream counts its times from the request: a server that sends its headers with "
    "the first token after 400 ms",
    "[http][issue31]") {
  const auto late = [] {
    return std::make_unique<hostile>(
        std::vector<std::string>{event_stream(openai_role + openai_hi + openai_done)},
        weir::testing::hostile_server_options{.answer_after = 400ms});
  };
  SECTION("the time to first token includes the wait for the headers") {
    const auto server = late();
    const auto got = stream_through_retry(*server, weir::http::dialect::openai);
    REQUIRE(got.opened);
    CHECK(got.report.time_to_first_token >= 300ms);
    CHECK(got.report.time_to_first_token < 5s);
  }
  SECTION("a total of 300 ms passes before the first token: a retryable timeout") {
    const auto server = late();
    const auto started = std::chrono::steady_clock::now();
    const auto got = stream_through_retry(*server, weir::http::dialect::openai, {.total = 300ms});
    CHECK_FALSE(got.opened);
    REQUIRE(got.failure);
    // Every attempt timed out (the server answers only the first, after 400 ms).
    CHECK(verdict_of(got.failure) == weir::verdict::retryable);
    CHECK(std::chrono::steady_clock::now() - started < 5s);
  }
}

// ---- Issue 33: trace context -----------------------------------------------------------------

TEST_CASE("the Beast client sends each attempt's traceparent; the server reads a new span each",
          "[http][trace]") {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(io.get_executor(),
                                      {.name = "m",
                                       .models = {{"small", 0, 0, 0}},
                                       .base_latency = std::chrono::microseconds(0),
                                       .faults = {.server_errors = 1.0}});  // every answer a 500
  server.start();
  weir::http::chat_client client(io.get_executor(), weir::http::dialect::openai,
                                 weir::http::endpoint::parse(server.base_url()));
  using retry_type = weir::retry<std::chrono::steady_clock, weir::http::response_classifier>;
  auto guarded = weir::pipeline(retry_type(
      {.max_attempts = 3, .backoff = weir::backoff::constant(std::chrono::milliseconds(1))}));
  const auto caller = weir::trace_context::parse(
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "congo=t61rcWkgMzE");
  REQUIRE(caller);
  std::vector<weir::trace_context> given;
  int answered = 0;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        const weir::http::chat_request ask{.model = "small", .prompt = "hi", .max_tokens = 4};
        weir::call_context traced{.operation = "chat", .trace = *caller};
        auto send = [&](const weir::trace_context& attempt) {
          given.push_back(attempt);
          return client.complete(ask, std::chrono::seconds(5), weir::http::trace_headers(attempt));
        };
        answered += (co_await guarded(traced, send)).result_int() == 500;
        weir::call_context untraced{.operation = "chat"};
        answered += (co_await guarded(untraced, send)).result_int() == 500;
        server.stop();
      },
      demo::asio::detached);
  io.run();
  CHECK(answered == 2);  // each call's last 500, after three attempts
  const auto seen = server.stats().traceparents;
  REQUIRE(seen.size() == 6);
  REQUIRE(given.size() == 6);
  std::set<std::string> spans;
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("attempt " << i + 1 << ": " << seen[i]);
    CHECK(seen[i] == given[i].traceparent());  // what the operation was given is what went
    const auto read = weir::trace_context::parse(seen[i]);
    REQUIRE(read);
    CHECK(read->trace_id == caller->trace_id);
    CHECK(read->parent_id != caller->parent_id);
    CHECK(read->sampled());
    spans.insert(seen[i].substr(36, 16));
  }
  CHECK(spans.size() == 3);
  for (std::size_t i = 3; i < 6; ++i) CHECK(seen[i].empty());  // no context: no header
  const auto headers = weir::http::trace_headers(*caller);
  REQUIRE(headers.size() == 2);
  CHECK(headers[1] == std::pair<std::string, std::string>("tracestate", "congo=t61rcWkgMzE"));
  CHECK(weir::http::trace_headers({}).empty());
}
