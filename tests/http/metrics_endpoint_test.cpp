// Specifications of weir/http/metrics_endpoint.hpp, over loopback with real sockets. Timeouts are
// the server's own, made short through its options; the bounds on elapsed time are loose.
#include "../support/http.hpp"

namespace {
using tcp = asio::ip::tcp;

asio::awaitable<tcp::socket> connect_to(unsigned short port) {
  tcp::socket socket(co_await asio::this_coro::executor);
  co_await socket.async_connect({asio::ip::make_address("127.0.0.1"), port}, asio::use_awaitable);
  co_return socket;
}

// Everything the server sends until it closes the connection.
asio::awaitable<std::string> read_to_end(tcp::socket& socket) {
  std::string out;
  co_await asio::async_read(socket, asio::dynamic_buffer(out), asio::as_tuple(asio::use_awaitable));
  co_return out;
}

// Sends `request` on a new connection and returns the whole answer.
asio::awaitable<std::string> exchange(unsigned short port, std::string request) {
  auto socket = co_await connect_to(port);
  // A refused connection may be closed before the request is written: the answer is then empty.
  co_await asio::async_write(socket, asio::buffer(request), asio::as_tuple(asio::use_awaitable));
  co_return co_await read_to_end(socket);
}

// A page of one line, for the tests about what is refused.
const std::vector<weir::http::metrics_source> one_line_page = {
    [](std::string& out) { out += "up 1\n"; }};

std::string get(std::string_view target, std::string_view method = "GET") {
  return fmt::format("{} {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", method,
                     target);
}

// Runs `test` against the endpoint; the endpoint is stopped when it ends, after which every
// coroutine must have ended for io.run_for to return early.
template <class Test>
void on_loopback(weir::http::metrics_endpoint& endpoint, asio::io_context& io, Test test) {
  endpoint.start();
  bool finished = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        co_await test();
        finished = true;
        endpoint.stop();
      },
      [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
      });
  io.run_for(30s);
  CHECK(finished);
  CHECK(io.stopped());  // nothing left running: every connection's coroutine ended
  CHECK(endpoint.stats().open_connections == 0);
}
}  // namespace

TEST_CASE("a scrape returns every source's series", "[http][metrics_endpoint]") {
  asio::io_context io;
  weir::metrics chat("chat"), embed("embed");
  chat.observer()(weir::attempt_started{});
  chat.observer()(weir::attempt_started{});
  embed.observer()(weir::attempt_started{});
  weir::http::metrics_endpoint endpoint(
      io.get_executor(), {}, {weir::http::prometheus_source({chat, embed}), [](std::string& out) {
                                out += "# TYPE custom_total counter\ncustom_total 7\n";
                              }});
  on_loopback(endpoint, io, [&]() -> asio::awaitable<void> {
    CHECK(endpoint.port() != 0);
    CHECK(endpoint.url() == fmt::format("http://127.0.0.1:{}/metrics", endpoint.port()));
    const auto page = co_await exchange(endpoint.port(), get("/metrics"));
    CHECK(page.starts_with("HTTP/1.1 200 OK\r\n"));
    CHECK(page.find("Content-Type: text/plain; version=0.0.4\r\n") != std::string::npos);
    CHECK(page.find("\nweir_attempts_total{pipeline=\"chat\"} 2\n") != std::string::npos);
    CHECK(page.find("\nweir_attempts_total{pipeline=\"embed\"} 1\n") != std::string::npos);
    CHECK(page.find("\ncustom_total 7\n") != std::string::npos);
    // One HELP line per family, however many registries.
    const auto help = std::string("# HELP weir_attempts_total ");
    CHECK(page.find(help) != std::string::npos);
    CHECK(page.find(help, page.find(help) + 1) == std::string::npos);
    // A query string is allowed; HEAD sends the header alone, with the page's length.
    const auto queried = co_await exchange(endpoint.port(), get("/metrics?x=1"));
    CHECK(queried.starts_with("HTTP/1.1 200 OK\r\n"));
    const auto head = co_await exchange(endpoint.port(), get("/metrics", "HEAD"));
    CHECK(head.starts_with("HTTP/1.1 200 OK\r\n"));
    CHECK(head.ends_with("\r\n\r\n"));
    const auto body = page.substr(page.find("\r\n\r\n") + 4);
    CHECK(head.find(fmt::format("Content-Length: {}\r\n", body.size())) != std::string::npos);
    // Keep-alive: two requests on one connection.
    auto socket = co_await connect_to(endpoint.port());
    const std::string twice =
        "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nGET /metrics HTTP/1.1\r\nHost: a\r\n"
        "Connection: close\r\n\r\n";
    co_await asio::async_write(socket, asio::buffer(twice), asio::use_awaitable);
    const auto both = co_await read_to_end(socket);
    CHECK(both.find("HTTP/1.1 200 OK", 1) != std::string::npos);
    CHECK(endpoint.stats().scrapes == 5);
  });
}

TEST_CASE("a metrics endpoint refuses what is not a GET of its path", "[http][metrics_endpoint]") {
  asio::io_context io;
  weir::http::metrics_endpoint endpoint(io.get_executor(), {.max_header_bytes = 1024},
                                        one_line_page);
  on_loopback(endpoint, io, [&]() -> asio::awaitable<void> {
    const auto post = co_await exchange(endpoint.port(), get("/metrics", "POST"));
    CHECK(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
    CHECK(post.find("Allow: GET, HEAD\r\n") != std::string::npos);
    CHECK(post.find("up 1") == std::string::npos);
    const auto put = co_await exchange(endpoint.port(), get("/metrics", "PUT"));
    CHECK(put.starts_with("HTTP/1.1 405 "));

    const auto other = co_await exchange(endpoint.port(), get("/metricsx"));
    CHECK(other.starts_with("HTTP/1.1 404 Not Found\r\n"));

    const auto with_body = co_await exchange(
        endpoint.port(), "GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    CHECK(with_body.starts_with("HTTP/1.1 413 "));
    const auto chunked = co_await exchange(endpoint.port(),
                                           "GET /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
                                           "chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    CHECK(chunked.starts_with("HTTP/1.1 413 "));

    const auto oversized = co_await exchange(
        endpoint.port(), fmt::format("GET /metrics HTTP/1.1\r\nHost: a\r\nX-Padding: {}\r\n\r\n",
                                     std::string(4096, 'x')));
    CHECK(oversized.starts_with("HTTP/1.1 431 "));
    CHECK(oversized.find("up 1") == std::string::npos);

    const auto garbage = co_await exchange(endpoint.port(), "HELLO\r\n\r\n");
    CHECK(garbage.starts_with("HTTP/1.1 400 "));
    CHECK(endpoint.stats().bad_requests == 7);
    CHECK(endpoint.stats().scrapes == 0);
  });
}

TEST_CASE("a client that never finishes its request is dropped after a timeout",
          "[http][metrics_endpoint]") {
  asio::io_context io;
  const std::string unfinished = "GET /metrics HTTP/1.1\r\nHost: a\r\n";  // no blank line
  SECTION("the request timeout") {
    weir::http::metrics_endpoint endpoint(
        io.get_executor(), {.request_timeout = 100ms, .connection_timeout = 1h}, one_line_page);
    on_loopback(endpoint, io, [&]() -> asio::awaitable<void> {
      const auto started = std::chrono::steady_clock::now();
      const auto answer = co_await exchange(endpoint.port(), unfinished);
      CHECK(answer.empty());
      CHECK(std::chrono::steady_clock::now() - started < 10s);
    });
    // Counted once the server's coroutine saw its timeout, which may be after the client saw
    // the connection close.
    CHECK(endpoint.stats().timeouts == 1);
  }
  SECTION("the connection timeout, across keep-alive requests") {
    weir::http::metrics_endpoint endpoint(
        io.get_executor(), {.request_timeout = 1h, .connection_timeout = 200ms}, one_line_page);
    on_loopback(endpoint, io, [&]() -> asio::awaitable<void> {
      const auto started = std::chrono::steady_clock::now();
      const auto answer = co_await exchange(
          endpoint.port(), "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n" + unfinished);
      CHECK(answer.starts_with("HTTP/1.1 200 OK\r\n"));
      CHECK(answer.find("HTTP/1.1", 1) == std::string::npos);
      CHECK(std::chrono::steady_clock::now() - started < 10s);
    });
    // Counted once the server's coroutine saw its timeout, which may be after the client saw
    // the connection close.
    CHECK(endpoint.stats().timeouts == 1);
  }
}

TEST_CASE("connections past the cap are closed without an answer", "[http][metrics_endpoint]") {
  asio::io_context io;
  weir::http::metrics_endpoint endpoint(
      io.get_executor(), {.request_timeout = 1h, .max_connections = 2}, one_line_page);
  on_loopback(endpoint, io, [&]() -> asio::awaitable<void> {
    auto first = co_await connect_to(endpoint.port());
    auto second = co_await connect_to(endpoint.port());
    const auto third = co_await exchange(endpoint.port(), get("/metrics"));
    CHECK(third.empty());
    CHECK(endpoint.stats().refused_connections == 1);
    CHECK(endpoint.stats().open_connections == 2);
    // The first one ends (the server closes it after its answer): room for another.
    co_await asio::async_write(first, asio::buffer(get("/metrics")), asio::use_awaitable);
    const auto first_answer = co_await read_to_end(first);
    CHECK(first_answer.starts_with("HTTP/1.1 200 OK\r\n"));
    const auto fourth = co_await exchange(endpoint.port(), get("/metrics"));
    CHECK(fourth.starts_with("HTTP/1.1 200 OK\r\n"));
    CHECK(endpoint.stats().refused_connections == 1);
  });
}

TEST_CASE("stop() closes the acceptor and every open connection", "[http][metrics_endpoint]") {
  asio::io_context io;
  weir::http::metrics_endpoint endpoint(
      io.get_executor(), {.request_timeout = 1h, .connection_timeout = 1h}, one_line_page);
  std::string idle_saw = "not read";
  // on_loopback stops the endpoint when the test ends, while the idle clients still wait.
  on_loopback(endpoint, io, [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 3; ++i) {
      auto socket = std::make_shared<tcp::socket>(co_await connect_to(endpoint.port()));
      asio::co_spawn(
          io,
          [socket, &idle_saw]() -> asio::awaitable<void> {
            idle_saw = co_await read_to_end(*socket);
          },
          asio::detached);
    }
    // A scrape on a fourth connection: by its answer, the three idle ones were accepted.
    const auto page = co_await exchange(endpoint.port(), get("/metrics"));
    CHECK(page.starts_with("HTTP/1.1 200 OK\r\n"));
    CHECK(endpoint.stats().open_connections == 3);
  });
  CHECK(idle_saw.empty());  // closed by stop(), without an answer
  // The acceptor is closed: nothing listens on the port any more.
  asio::io_context after;
  tcp::socket probe(after);
  boost::system::error_code ec;
  probe.connect({asio::ip::make_address("127.0.0.1"), endpoint.port()}, ec);
  CHECK(ec);
}

TEST_CASE("a metrics endpoint's options out of range are refused by name",
          "[http][metrics_endpoint]") {
  asio::io_context io;
  const auto refused = [&](weir::http::metrics_endpoint_options o) {
    try {
      weir::http::metrics_endpoint endpoint(io.get_executor(), std::move(o));
    } catch (const weir::exception& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CHECK_THAT(refused({.request_timeout = 0ms}),
             Catch::Contains("metrics_endpoint: request_timeout is 0s; it must be positive"));
  CHECK_THAT(refused({.connection_timeout = -1ms}), Catch::Contains("connection_timeout"));
  CHECK_THAT(refused({.max_header_bytes = 10}), Catch::Contains("max_header_bytes is 10"));
  CHECK_THAT(refused({.max_connections = 0}), Catch::Contains("max_connections is 0"));
  CHECK_THAT(refused({.path = "metrics"}), Catch::Contains("path is 'metrics'"));
  CHECK(refused({}) == "accepted");
}
