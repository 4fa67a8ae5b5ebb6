// Specifications of weir/testing/hostile_server.hpp, read through a plain socket (real loopback
// and a few milliseconds of real time; built with the HTTP client's tests, which use it: see
// tests/CMakeLists.txt).
#include <weir/testing/hostile_server.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

TEST_CASE(
    "a hostile server answers each request with its next reply, trickled when told, keeps the "
    "requests and closes when no reply is left",
    "[hostile_server]") {
  namespace net = boost::asio;
  const std::string first = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
  const std::string second = "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n";
  weir::testing::hostile_server server(
      {first, second},
      {.trickle_bytes = 4, .pause = std::chrono::milliseconds(5), .hold_open = false});
  net::io_context io;
  net::ip::tcp::socket socket(io);
  socket.connect({net::ip::make_address_v4("127.0.0.1"), server.port()});
  const auto exchange = [&](std::string_view request, std::size_t reply_size) {
    net::write(socket, net::buffer(request));
    std::string reply(reply_size, '\0');
    net::read(socket, net::buffer(reply));
    return reply;
  };
  const std::vector<std::string> sent = {"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                                         "GET /b HTTP/1.1\r\n\r\n", "GET /c HTTP/1.1\r\n\r\n"};
  const auto started = std::chrono::steady_clock::now();
  CHECK(exchange(sent[0], first.size()) == first);
  // 40 bytes in pieces of 4, 5 ms apart: the last came at least 45 ms after the first.
  CHECK(std::chrono::steady_clock::now() - started >= std::chrono::milliseconds(45));
  CHECK(exchange(sent[1], second.size()) == second);
  net::write(socket, net::buffer(sent[2]));
  char byte = 0;
  boost::system::error_code ec;
  net::read(socket, net::buffer(&byte, 1), ec);
  CHECK(ec == net::error::eof);
  CHECK(server.requests() == sent);
  CHECK(server.connections() == 1);
}
