// Specifications of weir/http/curl.hpp: curl's results judged, and its multi-socket API on Asio
// against weir's mock provider on loopback (real sockets, short real time).
#include <weir/composition/pipeline.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/failure/retry.hpp>
#include <weir/http/curl.hpp>
#include <weir/testing/hostile_server.hpp>
#include <weir/testing/mock_provider.hpp>

#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <set>
#include <string>
#include <thread>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;

namespace {
void feed(weir::curl::response& r, std::string line) {
  weir::curl::detail::collect_header(line.data(), 1, line.size(), &r);
}

// The mock on its own thread, for as long as the test runs.
struct serving {
  explicit serving(weir::testing::mock_provider_options o)
      : server(io.get_executor(), std::move(o)) {
    server.start();
    thread = std::thread([this] { io.run(); });
  }
  ~serving() {
    server.stop();
    work.reset();
    thread.join();
  }
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  weir::testing::mock_provider server;
  std::thread thread;
};

const std::string chat_body =
    R"({"model":"llama","messages":[{"role":"user","content":"hi"}],"max_tokens":4})";
}  // namespace

TEST_CASE("curl's headers: only the last response's, any case, judged as any response", "[curl]") {
  weir::curl::response r;
  feed(r, "HTTP/1.1 100 Continue\r\n");
  feed(r, "X-Early: dropped\r\n");
  feed(r, "\r\n");
  feed(r, "HTTP/1.1 429 Too Many Requests\r\n");
  feed(r, "Retry-After:  3\r\n");
  feed(r, "x-ratelimit-remaining-requests: 0\r\n");
  feed(r, "\r\n");
  r.status = 429;
  REQUIRE(r.headers.size() == 2);
  CHECK(r.header("retry-after") == "3");
  CHECK(r.header("X-RATELIMIT-REMAINING-REQUESTS") == "0");
  CHECK(r.header("x-early").empty());
  const auto judged = weir::curl::response_classifier{}.judge(r);
  CHECK(judged.kind == weir::verdict::rate_limited);
  CHECK(judged.hint.retry_after == ns(3s));
  CHECK(judged.hint.requests.remaining == 0);
}

TEST_CASE("a transfer's CURLcode is retryable when the connection failed, fatal when misused",
          "[curl]") {
  weir::curl::response_classifier judge;
  const auto failed = [&](CURLcode code) {
    return judge(weir::outcome<weir::curl::response>::from_exception(std::make_exception_ptr(
                     boost::system::system_error(weir::curl::make_error_code(code)))))
        .kind;
  };
  for (auto code : {CURLE_COULDNT_CONNECT, CURLE_OPERATION_TIMEDOUT, CURLE_RECV_ERROR,
                    CURLE_SEND_ERROR, CURLE_GOT_NOTHING, CURLE_COULDNT_RESOLVE_HOST})
    CHECK(failed(code) == weir::verdict::retryable);
  for (auto code : {CURLE_URL_MALFORMAT, CURLE_UNSUPPORTED_PROTOCOL, CURLE_PEER_FAILED_VERIFICATION,
                    CURLE_BAD_FUNCTION_ARGUMENT})
    CHECK(failed(code) == weir::verdict::fatal);
  // curl's own words, which never carry the URL.
  CHECK(weir::curl::make_error_code(CURLE_COULDNT_CONNECT).message() ==
        "Couldn't connect to server");
  // A cancellation is judged as everywhere else.
  CHECK(
      judge(weir::outcome<weir::curl::response>::from_error(asio::error::operation_aborted)).kind ==
      weir::verdict::fatal);
}

TEST_CASE("curl's multi-socket API on Asio: transfers share a thread, a cancelled one is removed",
          "[curl]") {
  serving s({.name = "vllm",
             .models = {{"llama", 0, 0, 0}},
             .base_latency = std::chrono::microseconds(300'000),
             .per_output_token = std::chrono::microseconds(0),
             .workers = 8});
  const auto url = s.server.base_url() + "/chat/completions";
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  std::vector<std::unique_ptr<weir::curl::easy>> requests;
  int answered = 0;
  for (int i = 0; i < 6; ++i) {
    requests.push_back(std::make_unique<weir::curl::easy>(url));
    requests.back()->add_header("Content-Type: application/json").post(chat_body);
    asio::co_spawn(io, transfers.perform(*requests.back()),
                   [&](std::exception_ptr e, weir::curl::response r) {
                     CHECK_FALSE(e);
                     CHECK(r.status == 200);
                     CHECK(r.body.find("chat.completion") != std::string::npos);
                     ++answered;
                   });
  }
  // A seventh, cancelled while the server works on it.
  weir::curl::easy cancelled(url);
  cancelled.add_header("Content-Type: application/json").post(chat_body);
  asio::cancellation_signal cancel;
  std::optional<weir::error_code> cancelled_with;
  asio::co_spawn(
      io, transfers.perform(cancelled),
      asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, weir::curl::response) {
        try {
          if (e) std::rethrow_exception(e);
          cancelled_with = weir::error_code{};
        } catch (const boost::system::system_error& x) {
          cancelled_with = x.code();
        }
      }));
  asio::steady_timer soon(io, 100ms);
  soon.async_wait([&](weir::error_code) { cancel.emit(asio::cancellation_type::terminal); });
  io.run();  // one thread: the transfers shared it
  CHECK(answered == 6);
  REQUIRE(cancelled_with);
  CHECK(*cancelled_with == asio::error::operation_aborted);
  CHECK(transfers.in_flight() == 0);
  // The server saw the six; the one cancelled may have reached it.
  CHECK(s.server.stats().status(200) >= 6);
}

TEST_CASE("a transfer to a closed port fails with curl's code, judged retryable", "[curl]") {
  // A port that was free a moment ago: nothing listens there now.
  unsigned short port = 0;
  {
    asio::io_context probe;
    asio::ip::tcp::acceptor a(probe, {asio::ip::make_address_v4("127.0.0.1"), 0});
    port = a.local_endpoint().port();
  }
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  weir::curl::easy request("http://127.0.0.1:" + std::to_string(port) + "/v1/chat/completions");
  std::optional<weir::outcome<weir::curl::response>> ended;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto o = co_await weir::capture(transfers.perform(request));
        ended.emplace(std::move(o));
      },
      asio::detached);
  io.run();
  REQUIRE(ended);
  CHECK_FALSE(ended->has_value());
  CHECK(weir::curl::response_classifier{}(*ended).kind == weir::verdict::retryable);
}

// ---- Issue 36: curl against a hostile server
// -----------------------------------------------------

namespace {
// The error a blocking transfer of `request` ends with (empty for a response).
weir::error_code failure_of(weir::curl::easy& request) {
  try {
    weir::curl::perform(request);
  } catch (const boost::system::system_error& e) {
    return e.code();
  }
  return {};
}

std::string ok_with(std::string_view body, std::string_view headers = "") {
  return "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" +
         std::string(headers) + "\r\n" + std::string(body);
}
}  // namespace

TEST_CASE("curl: a header line with CR LF or NUL is refused, naming the header only", "[curl]") {
  weir::curl::easy request;
  for (const std::string& line :
       {std::string("Authorization: Bearer sk-secret\r\nX-Injected: 1"), std::string("X-Id: a\nb"),
        std::string("X-Id: a\0b", 9), std::string("Bad Name: v"), std::string("no colon")}) {
    try {
      request.add_header(line);
      FAIL("taken: a header that could inject");
    } catch (const weir::exception& e) {
      CHECK(e.code() == weir::error::invalid_argument);
      CHECK(std::string(e.what()).find("sk-secret") == std::string::npos);
    }
  }
  CHECK_NOTHROW(request.add_header("X-Id: 42"));
  CHECK_NOTHROW(request.add_header("Expect:"));  // curl's way to drop a header
}

TEST_CASE("curl: headers, a whole body and the transfer time are bounded, fatally", "[curl]") {
  const std::string big_headers = "X-Padding: " + std::string(20'000, 'p') + "\r\n";
  SECTION("headers") {
    weir::testing::hostile_server server({ok_with("x", big_headers)});
    weir::curl::easy request(server.url());
    request.limit({.max_header_bytes = 4096});
    CHECK(failure_of(request) == weir::error::limit_exceeded);
  }
  SECTION("a body kept whole") {
    weir::testing::hostile_server server({ok_with(std::string(4096, 'b')), ok_with("small")});
    weir::curl::easy request(server.url());
    request.limit({.max_body_bytes = 1024});
    CHECK(failure_of(request) == weir::error::limit_exceeded);
    CHECK(weir::curl::perform(request).body == "small");
  }
  SECTION("a transfer that never ends") {
    weir::testing::hostile_server server(
        {"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + std::string(100'000, 'b')},
        {.trickle_bytes = 10, .pause = std::chrono::milliseconds(20)});
    weir::curl::easy request(server.url());
    request.limit({.max_transfer_time = std::chrono::milliseconds(300)});
    const auto started = std::chrono::steady_clock::now();
    const auto code = failure_of(request);
    CHECK(code == weir::error::limit_exceeded);
    CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));  // 200 s in all
    const auto judged = weir::curl::response_classifier{}(
        weir::outcome<weir::curl::response>::from_exception(std::make_exception_ptr(
            weir::exception(weir::error::limit_exceeded, "curl::easy: the transfer passed"))));
    CHECK(judged.kind == weir::verdict::fatal);
  }
}

// ---- Issue 31: curl safe by default -------------------------------------------------------------

namespace {
std::string status_only(std::string_view status_line, std::string_view headers = "") {
  return "HTTP/1.1 " + std::string(status_line) + "\r\nContent-Length: 0\r\n" +
         std::string(headers) + "\r\n";
}

// Runs `io` in short turns until `done` holds or `limit` (real time) passed.
template <class Done>
void run_until(asio::io_context& io, Done done, std::chrono::milliseconds limit = 5s) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!done() && std::chrono::steady_clock::now() < until) {
    io.restart();
    io.run_for(5ms);
  }
}
}  // namespace

TEST_CASE("curl: with no classifier named, a 429 is retried with its hint and a 400 is not",
          "[curl]") {
  weir::testing::hostile_server server({status_only("429 Too Many Requests", "Retry-After: 0\r\n"),
                                        ok_with("fine"), status_only("400 Bad Request"),
                                        ok_with("never asked for")});
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  weir::retry<> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1ms)});
  weir::curl::easy request(server.url());
  std::optional<weir::curl::response> after_429, after_400;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        after_429 = co_await retry([&] { return transfers.perform(request); });
        after_400 = co_await retry([&] { return transfers.perform(request); });
      },
      [](std::exception_ptr e) { CHECK_FALSE(e); });
  io.run();
  REQUIRE(after_429);
  CHECK(after_429->status == 200);
  CHECK(after_429->body == "fine");
  REQUIRE(after_400);
  CHECK(after_400->status == 400);  // a failing value goes back as it is, once
  CHECK(server.requests().size() == 3);
  CHECK(weir::default_classifier{}(weir::outcome<weir::curl::response>::from_value(*after_400))
            .kind == weir::verdict::fatal);
  // The server's hint goes with the verdict, as response_classifier's does.
  weir::curl::response slow_down{429, {{"Retry-After", "7"}}, {}};
  const auto judged =
      weir::default_classifier{}(weir::outcome<weir::curl::response>::from_value(slow_down));
  CHECK(judged.kind == weir::verdict::rate_limited);
  CHECK(judged.hint.retry_after == std::chrono::seconds(7));
}

TEST_CASE("curl: with no classifier named, the breaker counts 5xx answers and opens", "[curl]") {
  weir::testing::hostile_server server(
      {status_only("503 Service Unavailable"), status_only("502 Bad Gateway"), ok_with("late")});
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  weir::circuit_breaker<> breaker({.consecutive_failures = 2, .break_duration = 60s});
  weir::curl::easy request(server.url());
  std::vector<long> statuses;
  std::optional<weir::error_code> third;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 2; ++i)
          statuses.push_back((co_await breaker([&] { return transfers.perform(request); })).status);
        try {
          co_await breaker([&] { return transfers.perform(request); });
          third = weir::error_code{};
        } catch (const boost::system::system_error& e) {
          third = e.code();
        }
      },
      [](std::exception_ptr e) { CHECK_FALSE(e); });
  io.run();
  CHECK(statuses == std::vector<long>{503, 502});
  CHECK(breaker.state() == weir::breaker_state::open);
  REQUIRE(third);
  CHECK(*third == weir::error::circuit_open);
  CHECK(server.requests().size() == 2);
}

TEST_CASE("curl: destroying a multi ends every awaited transfer with operation_aborted, once",
          "[curl]") {
  weir::testing::hostile_server server({});  // reads the requests, never answers
  asio::io_context io(1);
  auto transfers = std::make_unique<weir::curl::multi>(io.get_executor());
  std::vector<std::unique_ptr<weir::curl::easy>> requests;
  std::vector<std::vector<weir::error_code>> ended(5);
  for (std::size_t i = 0; i < 5; ++i) {
    requests.push_back(std::make_unique<weir::curl::easy>(server.url()));
    asio::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          try {
            co_await transfers->perform(*requests[i]);
            ended[i].push_back({});
          } catch (const boost::system::system_error& e) {
            ended[i].push_back(e.code());
          }
        },
        asio::detached);
  }
  run_until(io, [&] { return server.requests().size() == 5; });
  REQUIRE(server.requests().size() == 5);
  CHECK(transfers->in_flight() == 5);
  transfers.reset();
  io.restart();
  io.run();
  for (const auto& e : ended) {
    REQUIRE(e.size() == 1);
    CHECK(e.front() == asio::error::operation_aborted);
  }
}

namespace {
// An event stream that goes on for hours: its headers and first event at once, then one event
// every 50 ms.
weir::testing::hostile_server endless_events() {
  const std::string head =
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
  const std::string event = "data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n";
  std::string reply = head;
  for (int i = 0; i < 200'000; ++i) reply += event;
  return weir::testing::hostile_server(
      {reply},
      {.trickle_bytes = event.size(), .at_once = head.size() + event.size(), .pause = 50ms});
}
}  // namespace

TEST_CASE("curl: a streamed transfer is removed when its stream is closed, broken or destroyed",
          "[curl]") {
  auto server = endless_events();
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  std::optional<weir::stream<weir::http::sse::event>> kept;
  std::size_t running_while_read = 0;
  std::string first;
  std::optional<weir::error_code> broke_with;
  const std::string how = GENERATE("closed", "broken", "destroyed");
  CAPTURE(how);
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto events = co_await weir::curl::open_event_stream(
            transfers, std::make_unique<weir::curl::easy>(server.url()),
            {.idle = how == "broken" ? std::optional<ns>(10ms) : std::nullopt,
             .tally = weir::http::sse::openai_tally});
        first = (co_await events.next()).value().data;
        running_while_read = transfers.in_flight();
        if (how == "broken") {
          try {
            co_await events.next();  // the next event is 50 ms away: past `idle`
          } catch (const boost::system::system_error& e) {
            broke_with = e.code();
          }
        } else if (how == "closed") {
          events.close();
          kept.emplace(std::move(events));  // closed, not destroyed
        }
      },
      [](std::exception_ptr e) { CHECK_FALSE(e); });
  run_until(io, [&] { return server.connections_ended() == 1; });
  CHECK(first.find("tok") != std::string::npos);
  CHECK(running_while_read == 1);
  CHECK(server.connections_ended() == 1);  // the server saw the connection closed
  CHECK(transfers.in_flight() == 0);
  if (how == "broken") CHECK(broke_with == weir::error::stream_broken);
}

TEST_CASE("curl: a streamed transfer answered 429 fails before its first event, judged", "[curl]") {
  weir::testing::hostile_server server(
      {"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 20\r\n\r\n"
       "{\"error\":\"slow\"}    "});
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  std::optional<weir::outcome<weir::stream<weir::http::sse::event>>> opened;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        opened.emplace(co_await weir::capture(weir::curl::open_event_stream(
            transfers, std::make_unique<weir::curl::easy>(server.url()))));
      },
      asio::detached);
  io.run();
  REQUIRE(opened);
  REQUIRE_FALSE(opened->has_value());
  const auto judged = weir::default_classifier{}(*opened);
  CHECK(judged.kind == weir::verdict::rate_limited);
  CHECK(judged.hint.retry_after == std::chrono::seconds(3));
  CHECK(transfers.in_flight() == 0);
}

TEST_CASE("curl: an error event inside a 200 stream fails the call before its first content",
          "[curl]") {
  // Before, the error event was the stream's first chunk: a success, its text handed over as
  // content. Anthropic sends message_start before its overloaded error: held back, then judged.
  weir::testing::hostile_server server(
      {"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 126\r\n\r\n"
       "event: message_start\ndata: {\"type\":\"message_start\"}\n\n"
       "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n"});
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  std::optional<weir::outcome<weir::stream<weir::http::sse::event>>> opened;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        opened.emplace(co_await weir::capture(weir::curl::open_event_stream(
            transfers, std::make_unique<weir::curl::easy>(server.url()))));
      },
      asio::detached);
  io.run();
  REQUIRE(opened);
  REQUIRE_FALSE(opened->has_value());
  CHECK(weir::default_classifier{}(*opened).kind == weir::verdict::retryable);
  CHECK(transfers.in_flight() == 0);
}

// ---- Issue 33: trace context -----------------------------------------------------------------

TEST_CASE("curl sends each attempt's traceparent, replacing the last; the server reads a new span",
          "[curl][trace]") {
  serving s({.name = "vllm",
             .models = {{"llama", 0, 0, 0}},
             .base_latency = std::chrono::microseconds(0),
             .faults = {.server_errors = 1.0}});  // every answer a 500
  asio::io_context io(1);
  weir::curl::multi transfers(io.get_executor());
  weir::retry<> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1ms)});
  auto guarded = weir::pipeline(retry);
  weir::curl::easy request(s.server.base_url() + "/chat/completions");
  request.add_header("Content-Type: application/json").post(chat_body);
  const auto caller =
      weir::trace_context::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
  REQUIRE(caller);
  int answered = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto send = [&](const weir::trace_context& attempt) {
          return transfers.perform(request.trace(attempt));
        };
        weir::call_context traced{.trace = *caller};
        answered += (co_await guarded(traced, send)).status == 500;
        weir::call_context untraced{};
        answered += (co_await guarded(untraced, send)).status == 500;
      },
      [](std::exception_ptr e) { CHECK_FALSE(e); });
  io.run();
  CHECK(answered == 2);
  const auto seen = s.server.stats().traceparents;
  REQUIRE(seen.size() == 6);
  std::set<std::string> spans;
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("attempt " << i + 1 << ": " << seen[i]);
    const auto read = weir::trace_context::parse(seen[i]);
    REQUIRE(read);  // one traceparent, not a list of every attempt's
    CHECK(read->trace_id == caller->trace_id);
    CHECK(read->parent_id != caller->parent_id);
    CHECK_FALSE(read->sampled());
    spans.insert(seen[i].substr(36, 16));
  }
  CHECK(spans.size() == 3);
  for (std::size_t i = 3; i < 6; ++i) CHECK(seen[i].empty());  // no context: no header
}
