// A real Beast async_write/async_read exchange through one weir::pipeline: the limits pace it,
// the breaker guards it, the retry obeys the server's Retry-After, and the adaptation stage reads
// every response's headers to steer the limits. The server is a small local one (127.0.0.1, an
// ephemeral port) that allows 10 requests/s with a burst of 10 and says so in OpenAI-style headers
// (a bucket of 10, continuously refilled); the client starts out believing 30/s, infers 10/s from
// the headers (limit, remaining and the time until full), and waits for the next unit when the
// server says nothing is left.
//
//     example_09_beast_pipeline [--requests N]
#include <weir/http/adaptation.hpp>
#include <weir/http/beast.hpp>
#include <weir/weir.hpp>

#include <fmt/core.h>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <charconv>
#include <chrono>
#include <string>
#include <string_view>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

namespace {

using response = http::response<http::string_body>;

// ---- the server: a strict provider stand-in --------------------------------------------------

asio::awaitable<void> serve(tcp::socket socket, weir::token_bucket<>& quota, int& refused) {
  beast::tcp_stream stream(std::move(socket));
  beast::flat_buffer buffer;
  for (;;) {
    http::request<http::string_body> req;
    auto [ec, n] =
        co_await http::async_read(stream, buffer, req, asio::as_tuple(asio::use_awaitable));
    if (ec) co_return;  // the client closed the connection
    const bool admitted = quota.try_acquire();
    response res{admitted ? http::status::ok : http::status::too_many_requests, req.version()};
    // As OpenAI does: the limit, what is left, and how long until the bucket is full again.
    const auto left = quota.available();
    res.set("x-ratelimit-limit-requests", "10");
    res.set("x-ratelimit-remaining-requests", std::to_string(left));
    res.set("x-ratelimit-reset-requests", fmt::format("{}ms", (10 - left) * 100));
    if (!admitted) {
      ++refused;
      res.set(http::field::retry_after, "1");
    }
    res.body() =
        admitted ? R"({"choices":[{"message":{"content":"ok"}}]})" : R"({"error":"rate limited"})";
    res.keep_alive(true);
    res.prepare_payload();
    co_await http::async_write(stream, res, asio::use_awaitable);
  }
}

asio::awaitable<void> accept(tcp::acceptor& acceptor, weir::token_bucket<>& quota, int& refused) {
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec) co_return;
    asio::co_spawn(acceptor.get_executor(), serve(std::move(socket), quota, refused),
                   asio::detached);
  }
}

// ---- the client: one keep-alive connection, every exchange through weir ----------------------

// One request and its response, exactly as a program without weir would write it.
asio::awaitable<response> round_trip(beast::tcp_stream& stream,
                                     const http::request<http::string_body>& req) {
  co_await http::async_write(stream, req, asio::use_awaitable);
  beast::flat_buffer buffer;
  response res;
  co_await http::async_read(stream, buffer, res, asio::use_awaitable);
  co_return res;
}

asio::awaitable<void> client(tcp::endpoint server, int requests, tcp::acceptor& acceptor,
                             int& succeeded) {
  auto ex = co_await asio::this_coro::executor;
  beast::tcp_stream stream(ex);
  co_await stream.async_connect(server, asio::use_awaitable);

  weir::http::response_classifier classify;
  weir::rate_limits<> limits(ex, {.requests = weir::limit{weir::per_second(30), 3}});
  weir::http::server_adaptation<> adapt(limits);
  weir::circuit_breaker<std::chrono::steady_clock, weir::http::response_classifier> breaker(
      {.consecutive_failures = 5, .break_duration = 5s});
  weir::retry<std::chrono::steady_clock, weir::http::response_classifier> retry(
      {.max_attempts = 4,
       .backoff = weir::backoff::exponential(100ms, 2.0, 2s).with(weir::jitter::full),
       .on_retry = [](const weir::retry_attempt& a) {
         fmt::print("  retry after attempt {} in {} ms\n", a.attempt,
                    std::chrono::duration_cast<std::chrono::milliseconds>(a.delay).count());
       }});

  http::request<http::string_body> req{http::verb::post, "/v1/chat/completions", 11};
  req.set(http::field::host, "127.0.0.1");
  req.set(http::field::content_type, "application/json");
  req.body() = R"({"model":"demo","messages":[{"role":"user","content":"hello"}]})";
  req.prepare_payload();

  // Outermost first: every attempt passes the breaker, waits for the limits, and its answer
  // (a 429 or a 200 alike) teaches the adaptation what the server allows.
  auto guarded = weir::pipeline(retry, breaker, limits, adapt.stage(classify));

  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < requests; ++i) {
    auto res = co_await guarded([&] { return round_trip(stream, req); });
    succeeded += res.result() == http::status::ok;
    fmt::print("request {:>2}: {} after {:.2f} s, pacing at {:.1f}/s\n", i + 1, res.result_int(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
               adapt.request_rate()->per_second);
  }
  fmt::print("{} of {} succeeded\n", succeeded, requests);
  acceptor.close();
  stream.socket().shutdown(tcp::socket::shutdown_both);
}

}  // namespace

int main(int argc, char** argv) {
  int requests = 25;
  if (argc == 3 && std::string_view(argv[1]) == "--requests") {
    std::string_view n = argv[2];
    auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), requests);
    if (ec != std::errc() || end != n.data() + n.size() || requests <= 0) {
      fmt::print(stderr, "09_beast_pipeline: --requests needs a positive whole number\n");
      return 2;
    }
  } else if (argc != 1) {
    fmt::print(stderr, "usage: example_09_beast_pipeline [--requests N]\n");
    return 2;
  }

  asio::io_context io;
  tcp::acceptor acceptor(io, {asio::ip::make_address("127.0.0.1"), 0});
  weir::token_bucket<> quota(io.get_executor(), {.rate = weir::per_second(10), .burst = 10});
  int refused = 0;
  asio::co_spawn(io, accept(acceptor, quota, refused), asio::detached);
  bool failed = false;
  int succeeded = 0;
  asio::co_spawn(io, client(acceptor.local_endpoint(), requests, acceptor, succeeded),
                 [&](std::exception_ptr e) {
                   if (!e) return;
                   failed = true;
                   try {
                     std::rethrow_exception(e);
                   } catch (const std::exception& x) {
                     fmt::print(stderr, "09_beast_pipeline: {}\n", x.what());
                   }
                 });
  io.run();
  fmt::print("the server refused {} request(s) with 429\n", refused);
  // The example is also a test: every request must end in a 200, and the pacing must have
  // learned the server's limit rather than be refused as often as it asked.
  if (succeeded != requests) {
    fmt::print(stderr, "09_beast_pipeline: {} of {} requests failed\n", requests - succeeded,
               requests);
    failed = true;
  }
  if (refused >= requests) {
    fmt::print(stderr, "09_beast_pipeline: refused {} times for {} requests\n", refused, requests);
    failed = true;
  }
  return failed ? 1 : 0;
}
