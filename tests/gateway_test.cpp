// weir-gateway's server, in-process, in front of the mock providers on loopback: both dialects,
// whole and streamed, bad input, client keys and tenants, and a graceful drain. Real sockets and
// (short) real time.
#include "gateway/config.hpp"

#include <weir/testing/mock_provider.hpp>

#include <catch2/catch.hpp>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/json/src.hpp>  // Boost.JSON, compiled once for this executable

#include <fmt/ranges.h>

#include <future>
#include <mutex>
#include <thread>

namespace {

namespace gw_asio = boost::asio;
namespace gw_http = boost::beast::http;
using namespace std::chrono_literals;

// What a client got: the status, the headers as sent, the body (chunks joined), and when the
// body's first bytes and its end came, from the request's start.
struct reply {
  unsigned status = 0;
  std::string head;
  std::string body;
  std::chrono::milliseconds first_bytes{0};
  std::chrono::milliseconds ended{0};
};

// A client with its own io_context: every exchange is bounded by a timeout, so a gateway that
// hangs fails the test instead of blocking it.
reply exchange(unsigned short port, gw_http::verb method, std::string target, std::string body = {},
               std::vector<std::pair<std::string, std::string>> headers = {}) {
  gw_asio::io_context io;
  reply out;
  auto run = [&]() -> gw_asio::awaitable<void> {
    boost::beast::tcp_stream stream(io);
    stream.expires_after(10s);
    co_await stream.async_connect(
        gw_asio::ip::tcp::endpoint(gw_asio::ip::make_address_v4("127.0.0.1"), port),
        gw_asio::use_awaitable);
    gw_http::request<gw_http::string_body> req(method, target, 11);
    req.set(gw_http::field::host, "127.0.0.1");
    req.set(gw_http::field::content_type, "application/json");
    for (const auto& [name, value] : headers) req.set(name, value);
    req.body() = std::move(body);
    req.prepare_payload();
    const auto start = std::chrono::steady_clock::now();
    co_await gw_http::async_write(stream, req, gw_asio::use_awaitable);
    boost::beast::flat_buffer buffer;
    gw_http::response_parser<gw_http::string_body> parser;
    parser.body_limit(64 * 1024 * 1024);
    co_await gw_http::async_read_header(stream, buffer, parser, gw_asio::use_awaitable);
    const auto since = [&] {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::steady_clock::now() - start);
    };
    while (!parser.is_done()) {
      co_await gw_http::async_read_some(stream, buffer, parser, gw_asio::use_awaitable);
      if (out.first_bytes.count() == 0 && !parser.get().body().empty()) out.first_bytes = since();
    }
    out.ended = since();
    out.status = parser.get().result_int();
    for (const auto& f : parser.get().base())
      out.head += std::string(f.name_string()) + ": " + std::string(f.value()) + "\n";
    out.body = parser.get().body();
  };
  gw_asio::co_spawn(io, run(), [](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
  });
  io.run();
  return out;
}

reply post(unsigned short port, std::string target, std::string body,
           std::vector<std::pair<std::string, std::string>> headers = {}) {
  return exchange(port, gw_http::verb::post, std::move(target), std::move(body),
                  std::move(headers));
}

std::string chat(std::string_view model, bool stream, std::string_view extra = "") {
  return fmt::format(
      R"({{"model":"{}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":16{}{}}})",
      model, stream ? R"(,"stream":true)" : "", extra);
}

// The mock provider on a thread of its own, and a gateway in front of it on another.
class rig {
 public:
  explicit rig(std::function<void(gateway::config&)> adjust = {},
               weir::testing::mock_provider_options mock = default_mock()) {
    mock_.emplace(mock_io_.get_executor(), std::move(mock));
    mock_->start();
    mock_thread_ = std::thread([this] { mock_io_.run(); });
    gateway::config c;
    c.catalog.add(weir::routing::provider_spec{.name = "mock"});
    c.catalog.add(weir::routing::model_spec{.provider = "mock",
                                            .id = "gpt-mini",
                                            .input_price = 1,
                                            .output_price = 2,
                                            .capability = 5});
    c.catalog.add(weir::routing::model_spec{.provider = "mock",
                                            .id = "claude-haiku",
                                            .input_price = 1,
                                            .output_price = 2,
                                            .capability = 7});
    c.upstreams.push_back({.provider = "mock",
                           .base_url = mock_->base_url(),
                           .api_key = "sk-provider-secret",
                           .speaks_openai = true,
                           .speaks_anthropic = true});
    c.aliases.push_back({.name = "smart", .min_capability = 7});
    c.log_requests = false;
    c.max_wait = 2s;
    if (adjust) adjust(c);
    gateway_.emplace(gw_io_.get_executor(), std::move(c));
    port_ = gateway_->start();
    gw_thread_ = std::thread([this] { gw_io_.run(); });
  }
  ~rig() {
    gateway_.reset();
    gw_work_.reset();
    gw_io_.stop();
    gw_thread_.join();
    mock_->stop();
    mock_work_.reset();
    mock_io_.stop();  // a stalled answer's timer would hold it
    mock_thread_.join();
  }

  static weir::testing::mock_provider_options default_mock() {
    return {.name = "mock",
            .models = {{.id = "gpt-mini", .requests_per_minute = 6000},
                       {.id = "claude-haiku", .requests_per_minute = 6000}},
            .base_latency = std::chrono::microseconds(1'000),
            .per_output_token = std::chrono::microseconds(0)};
  }

  unsigned short port() const { return port_; }
  gateway::server& gateway() { return *gateway_; }
  weir::testing::mock_stats served() const { return mock_->stats(); }
  gw_asio::io_context& gateway_io() { return gw_io_; }

 private:
  gw_asio::io_context mock_io_{1};
  gw_asio::executor_work_guard<gw_asio::io_context::executor_type> mock_work_{
      mock_io_.get_executor()};
  std::optional<weir::testing::mock_provider> mock_;
  std::thread mock_thread_;
  gw_asio::io_context gw_io_{1};
  std::optional<gw_asio::executor_work_guard<gw_asio::io_context::executor_type>> gw_work_{
      gw_io_.get_executor()};
  std::optional<gateway::server> gateway_;
  unsigned short port_ = 0;
  std::thread gw_thread_;
};

bool openai_error_shape(const std::string& body) {
  return body.starts_with(R"({"error":{"message":)") &&
         body.find(R"("type":)") != std::string::npos &&
         body.find(R"("code":)") != std::string::npos;
}
bool anthropic_error_shape(const std::string& body) {
  return body.starts_with(R"({"type":"error","error":{"type":)") &&
         body.find(R"("message":)") != std::string::npos;
}

}  // namespace

TEST_CASE("the gateway answers both dialects whole through the router, with the provider's usage") {
  rig r;
  const auto openai = post(r.port(), "/v1/chat/completions", chat("gpt-mini", false));
  CHECK(openai.status == 200);
  CHECK(openai.body.find(R"("object":"chat.completion")") != std::string::npos);
  CHECK(openai.body.find(R"("prompt_tokens")") != std::string::npos);
  const auto anthropic = post(r.port(), "/v1/messages", chat("claude-haiku", false));
  CHECK(anthropic.status == 200);
  CHECK(anthropic.body.find(R"("type":"message")") != std::string::npos);
  // An alias: the router picks a model capable enough.
  const auto smart = post(r.port(), "/v1/messages", chat("smart", false));
  CHECK(smart.status == 200);
  CHECK(smart.body.find(R"("model":"claude-haiku")") != std::string::npos);
  CHECK(r.served().status(200) == 3);
  CHECK(r.gateway().counts().by_status[200] == 3);
  // The provider's key went to the provider only.
  for (const auto* got : {&openai, &anthropic, &smart}) {
    CHECK(got->head.find("sk-provider-secret") == std::string::npos);
    CHECK(got->body.find("sk-provider-secret") == std::string::npos);
  }
}

TEST_CASE("the gateway passes streams through as they come, in each dialect's form") {
  auto slow = rig::default_mock();
  slow.per_output_token = std::chrono::microseconds(5'000);  // 8 tokens a batch: 40 ms apart
  rig r({}, slow);
  const auto openai = post(r.port(), "/v1/chat/completions", chat("gpt-mini", true));
  CHECK(openai.status == 200);
  CHECK(openai.head.find("text/event-stream") != std::string::npos);
  CHECK(openai.body.find(R"("object":"chat.completion.chunk")") != std::string::npos);
  CHECK(openai.body.ends_with("data: [DONE]\n\n"));
  // The gateway asked for the usage chunk (to settle the limits); the client did not, so it
  // does not see it.
  CHECK(openai.body.find(R"("choices":[])") == std::string::npos);
  // The first chunk came before the rest: it was passed on, not buffered to the end.
  CHECK(openai.first_bytes < openai.ended);

  const auto with_usage =
      post(r.port(), "/v1/chat/completions",
           chat("gpt-mini", true, R"(,"stream_options":{"include_usage":true})"));
  CHECK(with_usage.body.find(R"("choices":[])") != std::string::npos);

  const auto anthropic = post(r.port(), "/v1/messages", chat("claude-haiku", true));
  CHECK(anthropic.status == 200);
  CHECK(anthropic.body.find("event: message_start\n") != std::string::npos);
  CHECK(anthropic.body.find("event: content_block_delta\n") != std::string::npos);
  CHECK(anthropic.body.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
  CHECK(r.served().streams == 3);
  CHECK(r.gateway().counts().streams == 3);
}

TEST_CASE("the gateway answers bad input at once, in the dialect's error shape") {
  rig r([](gateway::config& c) { c.max_body_bytes = 4096; });
  const auto malformed = post(r.port(), "/v1/chat/completions", R"({"model": "gpt-mini",)");
  CHECK(malformed.status == 400);
  CHECK(openai_error_shape(malformed.body));
  const auto malformed_anthropic = post(r.port(), "/v1/messages", "not json");
  CHECK(malformed_anthropic.status == 400);
  CHECK(anthropic_error_shape(malformed_anthropic.body));
  CHECK(post(r.port(), "/v1/messages", R"({"messages":[]})").status == 400);  // no model
  const auto unknown = post(r.port(), "/v1/chat/completions", chat("gpt-9000", false));
  CHECK(unknown.status == 404);
  CHECK(openai_error_shape(unknown.body));
  CHECK(unknown.body.find("model_not_found") != std::string::npos);
  const auto unknown_streamed = post(r.port(), "/v1/messages", chat("gpt-9000", true));
  CHECK(unknown_streamed.status == 404);
  CHECK(anthropic_error_shape(unknown_streamed.body));
  // A name is echoed short and without control characters (it could forge a log line).
  const auto odd =
      post(r.port(), "/v1/chat/completions", chat("a\\nb" + std::string(100, 'x'), false));
  CHECK(odd.status == 404);
  CHECK(odd.body.find("a?b") != std::string::npos);
  CHECK(odd.body.find(std::string(70, 'x')) == std::string::npos);
  const auto big = post(r.port(), "/v1/chat/completions", chat(std::string(5000, 'x'), false));
  CHECK(big.status == 413);
  CHECK(exchange(r.port(), gw_http::verb::get, "/v1/chat/completions").status == 405);
  CHECK(exchange(r.port(), gw_http::verb::get, "/v2/anything").status == 404);
  CHECK(r.served().requests == 0);  // none of it reached the provider
}

TEST_CASE("the gateway serves its models, its health and its metrics") {
  rig r;
  const auto models = exchange(r.port(), gw_http::verb::get, "/v1/models");
  CHECK(models.status == 200);
  CHECK(models.body.find(R"("id":"gpt-mini")") != std::string::npos);
  CHECK(models.body.find(R"("id":"smart")") != std::string::npos);
  CHECK(exchange(r.port(), gw_http::verb::get, "/health").body == R"({"status":"ready"})");
  post(r.port(), "/v1/chat/completions", chat("gpt-mini", false));
  const auto metrics = exchange(r.port(), gw_http::verb::get, "/metrics");
  CHECK(metrics.body.find(R"(weir_gateway_requests_total{status="200"} 1)") != std::string::npos);
}

TEST_CASE("the gateway answers HEAD with the header alone, so a kept-alive connection goes on") {
  rig r;
  // HEAD then GET on one connection: a body after HEAD's header would be read as the start of
  // the next response.
  gw_asio::io_context io;
  gw_asio::ip::tcp::socket socket(io);
  socket.connect({gw_asio::ip::make_address_v4("127.0.0.1"), r.port()});
  const std::string asked =
      "HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
      "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  gw_asio::write(socket, gw_asio::buffer(asked));
  std::string said;
  boost::system::error_code ec;
  gw_asio::read(socket, gw_asio::dynamic_buffer(said), ec);
  CHECK(ec == gw_asio::error::eof);
  const auto second = said.find("HTTP/1.1 200", 1);
  REQUIRE(said.starts_with("HTTP/1.1 200"));
  REQUIRE(second != std::string::npos);
  const std::string_view head_answer = std::string_view(said).substr(0, second);
  CHECK(head_answer.find("Content-Length: 18") != std::string_view::npos);
  CHECK(head_answer.ends_with("\r\n\r\n"));  // the header, and nothing after it
  CHECK(said.ends_with(R"({"status":"ready"})"));
}

TEST_CASE("the gateway forwards only allow-listed client headers") {
  // The mock keeps the x-weir-request header of each request it served.
  const auto sent_through = [](bool allowed) {
    rig r([&](gateway::config& c) {
      if (allowed) c.forwarded_headers.push_back("x-weir-request");
    });
    post(r.port(), "/v1/chat/completions", chat("gpt-mini", false), {{"x-weir-request", "r-1"}});
    return r.served().succeeded_requests.count("r-1");
  };
  CHECK(sent_through(false) == 0);
  CHECK(sent_through(true) == 1);
}

TEST_CASE("the gateway maps client keys to tenants, with their own limits and budgets") {
  rig r([](gateway::config& c) {
    c.tenants.push_back({.name = "steady",
                         .key_sha256 = gateway::sha256_hex("key-steady"),
                         .requests_per_minute = 6000});
    // One request per minute, at most one at once: the second is refused within max_wait.
    c.tenants.push_back({.name = "limited",
                         .key_sha256 = gateway::sha256_hex("key-limited"),
                         .requests_per_minute = 1});
    // A budget below one request's cost (16 output tokens at $2 per million, and the input).
    c.tenants.push_back({.name = "broke",
                         .key_sha256 = gateway::sha256_hex("key-broke"),
                         .budget_per_day = 0.00001});
    c.max_wait = 300ms;
  });
  const auto as = [](std::string key) {
    return std::vector<std::pair<std::string, std::string>>{{"authorization", "Bearer " + key}};
  };
  const auto none = post(r.port(), "/v1/chat/completions", chat("gpt-mini", false));
  CHECK(none.status == 401);
  CHECK(openai_error_shape(none.body));
  const auto wrong =
      post(r.port(), "/v1/messages", chat("claude-haiku", false), {{"x-api-key", "key-nobody"}});
  CHECK(wrong.status == 401);
  CHECK(anthropic_error_shape(wrong.body));
  CHECK(exchange(r.port(), gw_http::verb::get, "/v1/models", {}, as("key-nobody")).status == 401);

  CHECK(post(r.port(), "/v1/messages", chat("claude-haiku", false), {{"x-api-key", "key-steady"}})
            .status == 200);
  CHECK(post(r.port(), "/v1/chat/completions", chat("gpt-mini", false), as("key-limited")).status ==
        200);
  const auto limited =
      post(r.port(), "/v1/chat/completions", chat("gpt-mini", false), as("key-limited"));
  CHECK(limited.status == 429);
  CHECK(limited.head.find("retry-after: ") != std::string::npos);
  // The other tenant is not held back by it.
  for (int i = 0; i < 3; ++i)
    CHECK(
        post(r.port(), "/v1/chat/completions", chat("gpt-mini", false), as("key-steady")).status ==
        200);
  const auto broke =
      post(r.port(), "/v1/chat/completions", chat("gpt-mini", false), as("key-broke"));
  CHECK(broke.status == 429);
  CHECK(broke.head.find("x-should-retry: false") != std::string::npos);
  CHECK(r.served().status(200) == 5);
  CHECK(r.gateway().counts().unauthorized == 3);
}

TEST_CASE("the gateway drains: requests in flight finish, then it stops") {
  auto slow = rig::default_mock();
  slow.base_latency = std::chrono::microseconds(400'000);
  rig r({}, slow);
  auto in_flight = std::async(std::launch::async, [&] {
    return post(r.port(), "/v1/chat/completions", chat("gpt-mini", false));
  });
  // Until the request is in flight at the gateway.
  for (int i = 0; i < 200 && r.gateway().counts().in_flight == 0; ++i)
    std::this_thread::sleep_for(5ms);
  REQUIRE(r.gateway().counts().in_flight == 1);
  std::promise<void> drained;
  gw_asio::co_spawn(r.gateway_io(), r.gateway().drain(5s),
                    [&](std::exception_ptr) { drained.set_value(); });
  CHECK(in_flight.get().status == 200);
  CHECK(drained.get_future().wait_for(5s) == std::future_status::ready);
  CHECK(r.gateway().counts().open_connections == 0);
  // No longer accepting.
  CHECK_THROWS(exchange(r.port(), gw_http::verb::get, "/health"));
}

TEST_CASE("the gateway cuts in-flight requests off at the end of the drain's grace") {
  auto stalled = rig::default_mock();
  stalled.base_latency = std::chrono::microseconds(5'000'000);
  rig r([](gateway::config& c) { c.max_wait = 10s; }, stalled);
  auto in_flight = std::async(std::launch::async, [&] {
    return post(r.port(), "/v1/chat/completions", chat("gpt-mini", false));
  });
  for (int i = 0; i < 200 && r.gateway().counts().in_flight == 0; ++i)
    std::this_thread::sleep_for(5ms);
  const auto start = std::chrono::steady_clock::now();
  std::promise<void> drained;
  gw_asio::co_spawn(r.gateway_io(), r.gateway().drain(200ms),
                    [&](std::exception_ptr) { drained.set_value(); });
  CHECK(drained.get_future().wait_for(5s) == std::future_status::ready);
  // The stalled request was cancelled, not waited for.
  CHECK(std::chrono::steady_clock::now() - start < 1500ms);
  CHECK_THROWS(in_flight.get());  // its connection was closed without an answer
}

#ifdef WEIR_GATEWAY_BIN
// The weir-gateway program itself, driven by the official Node SDKs (tests/gateway/sdk_client.cjs)
// against the mock provider; then SIGTERM, which must end it with exit status 0. The SDKs are
// npm packages that scripts/test installs (into build/npm); WEIR_REQUIRE_SDK_TEST=1, which it
// sets, makes their absence a failure rather than a skipped test.
#include "support/process.hpp"

#include <array>
#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace {
using test_process::line_with;
using test_process::spawn;
using test_process::wait_exit;

// A mock provider serving on a thread of its own until the end of the scope.
struct mock_on_thread {
  explicit mock_on_thread(weir::testing::mock_provider_options options)
      : mock(io.get_executor(), std::move(options)) {
    mock.start();
    thread = std::thread([this] { io.run(); });
  }
  ~mock_on_thread() {
    mock.stop();
    thread.join();
  }
  gw_asio::io_context io{1};
  weir::testing::mock_provider mock;
  std::thread thread;
};
}  // namespace

TEST_CASE("the official OpenAI and Anthropic SDKs drive weir-gateway, and SIGTERM ends it with 0",
          "[sdk]") {
  namespace fs = std::filesystem;
  const char* from_env = std::getenv("WEIR_NODE_MODULES");
  const fs::path modules = from_env && *from_env ? fs::path(from_env) : fs::path(WEIR_NODE_MODULES);
  const bool required = std::getenv("WEIR_REQUIRE_SDK_TEST") != nullptr;
  if (!fs::exists(modules / "openai") || !fs::exists(modules / "@anthropic-ai" / "sdk")) {
    if (required) FAIL("the SDKs are not installed in " << modules);
    WARN("skipped: the SDKs are not installed in " << modules << " (scripts/test installs them)");
    return;
  }
  mock_on_thread running(rig::default_mock());
  auto& mock = running.mock;

  const auto scratch = fs::temp_directory_path() / fmt::format("weir-gateway-sdk-{}", ::getpid());
  fs::create_directories(scratch);
  const auto catalog = scratch / "gateway.json";
  std::ofstream(catalog) << fmt::format(R"({{
  "providers": [{{"name": "mock"}}],
  "models": [
    {{"provider": "mock", "id": "gpt-mini", "capability": 5, "input_price": 1, "output_price": 2}},
    {{"provider": "mock", "id": "claude-haiku", "capability": 7, "input_price": 1, "output_price": 2}}
  ],
  "upstreams": [{{"provider": "mock", "base_url": "{}", "dialects": ["openai", "anthropic"]}}],
  "tenants": [
    {{"name": "a", "key_env": "WEIR_TEST_KEY_A", "requests_per_minute": 600}},
    {{"name": "b", "key_env": "WEIR_TEST_KEY_B", "requests_per_minute": 1}},
    {{"name": "c", "key_env": "WEIR_TEST_KEY_C", "budget_usd_per_day": 0.00001}}
  ]
}}
)",
                                        mock.base_url());
  ::setenv("WEIR_TEST_KEY_A", "sk-tenant-a", 1);
  ::setenv("WEIR_TEST_KEY_B", "sk-tenant-b", 1);
  ::setenv("WEIR_TEST_KEY_C", "sk-tenant-c", 1);
  auto [pid, out] = spawn({WEIR_GATEWAY_BIN, "--listen", "127.0.0.1:0", "--catalog",
                           catalog.string(), "--quiet", "--max-wait", "1"});
  const auto base = line_with(out, "base URL ", 10s);
  REQUIRE(base.ends_with("/v1"));

  ::setenv("GATEWAY_URL", base.substr(0, base.size() - 3).c_str(), 1);
  ::setenv("KEY_A", "sk-tenant-a", 1);
  ::setenv("KEY_B", "sk-tenant-b", 1);
  ::setenv("KEY_C", "sk-tenant-c", 1);
  ::setenv("NODE_PATH", modules.string().c_str(), 1);
  const auto command = fmt::format("timeout 60 node '{}' >'{}' 2>&1", WEIR_SDK_CLIENT,
                                   (scratch / "sdk.log").string());
  const int node = std::system(command.c_str());
  std::ifstream log(scratch / "sdk.log");
  const std::string said((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  INFO("the SDK client said: " << said);
  CHECK(WIFEXITED(node));
  CHECK(WEXITSTATUS(node) == 0);
  // A: 2 OpenAI and 2 Anthropic calls, then one more; B: one. The rest never reached it.
  CHECK(mock.stats().status(200) == 6);

  REQUIRE(::kill(pid, SIGTERM) == 0);
  CHECK(wait_exit(pid, 15s) == 0);
  ::close(out);
  fs::remove_all(scratch);
}

// Two weir-gateway programs on one Redis (the redis-server of tests/redis's fixture, on
// $WEIR_REDIS_PORT: this test runs there, hidden from the plain runs), in front of one mock
// provider whose own bucket is the referee: 20 requests a second, at most 5 at once, a 429 for
// any request past that. Clients ask both gateways for twice the limit and more.
TEST_CASE("two weir-gateways sharing Redis keep to one provider's request limit together",
          "[.][fleet]") {
  const char* redis_port = std::getenv("WEIR_REDIS_PORT");
  REQUIRE(redis_port);
  constexpr double per_second = 20;
  constexpr double burst = 5;
  constexpr int seconds = 3;
  mock_on_thread running({.name = "mock",
                          .models = {{.id = "gpt-mini", .requests_per_minute = per_second * 60}},
                          .burst_seconds = burst / per_second,
                          .base_latency = std::chrono::microseconds(1'000),
                          .per_output_token = std::chrono::microseconds(0)});
  auto& mock = running.mock;

  struct member {
    pid_t pid = 0;
    int out = -1;
    unsigned short port = 0;
    std::atomic<int> answered{0}, refused{0}, failed{0};
    std::atomic<unsigned> failed_status{0};  // the last failure's (0: no answer)
    std::mutex first_refusal_mutex;
    std::string first_refusal;  // what the gateway said when it first turned one away
  };
  std::array<member, 2> gateways;
  struct stop_gateways {
    std::array<member, 2>& gateways;
    ~stop_gateways() {  // those a failed REQUIRE left running
      for (auto& g : gateways)
        if (g.pid > 0) wait_exit(g.pid, 0ms);
    }
  } reap{gateways};
  const auto rpm = fmt::format("{}", per_second * 60);
  const auto redis = fmt::format("127.0.0.1:{}", redis_port);
  const auto fleet = fmt::format("gateway-fleet-test-{}", ::getpid());
  for (auto& g : gateways) {
    std::vector<std::string> argv{WEIR_GATEWAY_BIN, "--listen", "127.0.0.1:0", "--upstream",
                                  mock.base_url(),  "--model",  "gpt-mini",    "--rpm"};
    argv.insert(argv.end(),
                {rpm, "--redis", redis, "--fleet", fleet, "--max-wait", "1", "--quiet"});
    std::tie(g.pid, g.out) = spawn(argv);
    const auto base = line_with(g.out, "base URL http://127.0.0.1:", 10s);
    REQUIRE(base.ends_with("/v1"));
    g.port = static_cast<unsigned short>(std::stoi(base));
  }

  // Twelve clients per gateway, each sending its next request when the last is answered: more
  // than the limit serves before their deadline.
  const auto began = std::chrono::steady_clock::now();
  const auto stop_sending = began + std::chrono::seconds(seconds);
  std::vector<std::thread> clients;
  for (auto& g : gateways)
    for (int i = 0; i < 12; ++i)
      clients.emplace_back([&g, stop_sending] {
        while (std::chrono::steady_clock::now() < stop_sending) {
          try {
            const auto r = post(g.port, "/v1/chat/completions", chat("gpt-mini", false));
            // Turned away: no turn before the deadline (429), or none when it passed (504).
            const bool turned_away = r.status == 429 || r.status == 504;
            (r.status == 200 ? g.answered : turned_away ? g.refused : g.failed)++;
            if (turned_away) {
              std::lock_guard lock(g.first_refusal_mutex);
              if (g.first_refusal.empty()) g.first_refusal = r.body;
            }
            if (r.status != 200 && !turned_away) g.failed_status = r.status;
          } catch (const std::exception&) {
            ++g.failed;  // no answer at all
          }
        }
      });
  // What reached the server in each second, counted on its side.
  std::vector<std::uint64_t> reached;
  std::uint64_t before = 0;
  for (int second = 1; second <= seconds; ++second) {
    std::this_thread::sleep_until(began + std::chrono::seconds(second));
    const auto now = mock.stats().requests;
    reached.push_back(now - before);
    before = now;
  }
  for (auto& c : clients) c.join();
  const auto served = mock.stats();
  INFO("reached the server per second "
       << fmt::format("{}", fmt::join(reached, ", ")) << "; gateways " << gateways[0].answered
       << " and " << gateways[1].answered << " answered, " << gateways[0].refused << " and "
       << gateways[1].refused << " refused, " << gateways[0].failed + gateways[1].failed
       << " failed (last status " << gateways[0].failed_status << ", " << gateways[1].failed_status
       << "); the server refused " << served.status(429)
       << "; first refusals: " << gateways[0].first_refusal << " / " << gateways[1].first_refusal);
  const int answered = gateways[0].answered + gateways[1].answered;
  CHECK(gateways[0].failed + gateways[1].failed == 0);
  // More was asked than the limit lets through (some were turned away at their deadline) ...
  CHECK(gateways[0].refused + gateways[1].refused > 0);
  // ... and the server never had to refuse: together the gateways kept to its limit.
  CHECK(served.status(429) == 0);
  for (const auto n : reached) CHECK(n <= per_second + burst);
  // Near the limit, and both gateways got their work through.
  CHECK(answered >= 0.8 * per_second * seconds);
  for (const auto& g : gateways) CHECK(g.answered >= answered / 4);

  for (auto& g : gateways) {
    REQUIRE(::kill(g.pid, SIGTERM) == 0);
    CHECK(wait_exit(std::exchange(g.pid, 0), 15s) == 0);
    ::close(g.out);
  }
}
#endif
