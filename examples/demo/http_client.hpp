// A small Beast HTTP/1.1 client for the demo: keep-alive connections reused from a pool, TLS
// (Asio's OpenSSL support) when the URL is https, one deadline per exchange. It knows nothing of
// rate limits: weir wraps its calls.
#pragma once

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace demo {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

using response = http::response<http::string_body>;

struct url {
  bool tls = false;
  std::string host;
  std::string port;
  std::string path;  // without a trailing slash, e.g. "" or "/v1"

  // http[s]://host[:port][/path]; throws std::invalid_argument for anything else.
  static url parse(std::string_view text) {
    url u;
    if (text.starts_with("https://")) {
      u.tls = true;
      text.remove_prefix(8);
    } else if (text.starts_with("http://")) {
      text.remove_prefix(7);
    } else {
      throw std::invalid_argument("the URL must start with http:// or https://");
    }
    const auto slash = text.find('/');
    auto authority = text.substr(0, slash);
    if (slash != std::string_view::npos) u.path = std::string(text.substr(slash));
    while (u.path.ends_with('/')) u.path.pop_back();
    const auto colon = authority.rfind(':');
    if (colon != std::string_view::npos) {
      u.host = std::string(authority.substr(0, colon));
      u.port = std::string(authority.substr(colon + 1));
    } else {
      u.host = std::string(authority);
      u.port = u.tls ? "443" : "80";
    }
    if (u.host.empty() || u.port.empty()) throw std::invalid_argument("the URL has no host");
    return u;
  }
};

class http_client {
 public:
  // `tls` is needed only for https URLs; it must outlive the client.
  http_client(asio::any_io_executor ex, url where, asio::ssl::context* tls = nullptr)
      : executor_(std::move(ex)), where_(std::move(where)), tls_(tls) {
    if (where_.tls && !tls_) throw std::invalid_argument("an https URL needs a TLS context");
  }

  const url& where() const noexcept { return where_; }

  // POSTs `body` to the URL's path + `target`. Throws boost::system::system_error on a
  // connection failure or when `timeout` passes (beast::error::timeout).
  asio::awaitable<response> post(std::string target, std::string body,
                                 std::vector<std::pair<std::string, std::string>> headers,
                                 std::chrono::steady_clock::duration timeout) {
    http::request<http::string_body> req{http::verb::post, where_.path + target, 11};
    req.set(http::field::host, where_.host);
    req.set(http::field::user_agent, "weir-demo");
    req.set(http::field::content_type, "application/json");
    for (auto& [name, value] : headers) req.set(name, value);
    req.body() = std::move(body);
    req.keep_alive(true);
    req.prepare_payload();

    auto conn = take();
    if (!conn) conn = co_await open(timeout);
    std::visit([&](auto& s) { beast::get_lowest_layer(s).expires_after(timeout); }, conn->stream);
    response res;
    if (auto* plain = std::get_if<plain_stream>(&conn->stream))
      co_await exchange(*plain, req, conn->buffer, res);
    else
      co_await exchange(std::get<tls_stream>(conn->stream), req, conn->buffer, res);
    if (res.keep_alive()) give_back(std::move(conn));
    co_return res;
  }

 private:
  using plain_stream = beast::tcp_stream;
  using tls_stream = beast::ssl_stream<beast::tcp_stream>;

  struct connection {
    template <class... Args>
    explicit connection(Args&&... args) : stream(std::forward<Args>(args)...) {}
    std::variant<plain_stream, tls_stream> stream;
    beast::flat_buffer buffer;
  };

  template <class Stream>
  static asio::awaitable<void> exchange(Stream& s, const http::request<http::string_body>& req,
                                        beast::flat_buffer& buffer, response& res) {
    co_await http::async_write(s, req, asio::use_awaitable);
    co_await http::async_read(s, buffer, res, asio::use_awaitable);
  }

  std::unique_ptr<connection> take() {
    std::lock_guard lock(mutex_);
    if (idle_.empty()) return nullptr;
    auto c = std::move(idle_.back());
    idle_.pop_back();
    return c;
  }

  void give_back(std::unique_ptr<connection> c) {
    std::lock_guard lock(mutex_);
    if (idle_.size() < max_idle) idle_.push_back(std::move(c));
  }

  asio::awaitable<std::unique_ptr<connection>> open(std::chrono::steady_clock::duration timeout) {
    asio::ip::tcp::resolver resolver(executor_);
    const auto endpoints =
        co_await resolver.async_resolve(where_.host, where_.port, asio::use_awaitable);
    if (!where_.tls) {
      auto c = std::make_unique<connection>(std::in_place_type<plain_stream>, executor_);
      auto& s = std::get<plain_stream>(c->stream);
      s.expires_after(timeout);
      co_await s.async_connect(endpoints, asio::use_awaitable);
      s.socket().set_option(asio::ip::tcp::no_delay(true));
      co_return c;
    }
    auto c = std::make_unique<connection>(std::in_place_type<tls_stream>, executor_, *tls_);
    auto& s = std::get<tls_stream>(c->stream);
    if (!SSL_set_tlsext_host_name(s.native_handle(), where_.host.c_str()))
      throw boost::system::system_error(boost::system::error_code(
          static_cast<int>(::ERR_get_error()), asio::error::get_ssl_category()));
    s.set_verify_callback(asio::ssl::host_name_verification(where_.host));
    beast::get_lowest_layer(s).expires_after(timeout);
    co_await beast::get_lowest_layer(s).async_connect(endpoints, asio::use_awaitable);
    co_await s.async_handshake(asio::ssl::stream_base::client, asio::use_awaitable);
    co_return c;
  }

  static constexpr std::size_t max_idle = 64;

  asio::any_io_executor executor_;
  url where_;
  asio::ssl::context* tls_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<connection>> idle_;
};

}  // namespace demo
