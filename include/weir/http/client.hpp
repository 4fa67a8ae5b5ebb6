// A ready HTTP client for OpenAI- and Anthropic-style chat APIs, on Boost.Beast: keep-alive
// connections reused from a pool, TLS (Asio's OpenSSL support) for https, one deadline per
// exchange. It knows nothing of rate limits; weir wraps its calls:
//
//     boost::asio::ssl::context tls(boost::asio::ssl::context::tls_client);
//     tls.set_default_verify_paths();
//     weir::http::chat_client openai(ex, weir::http::dialect::openai,
//                                    weir::http::endpoint::parse("https://api.openai.com/v1"),
//                                    std::getenv("OPENAI_API_KEY"), &tls);
//     weir::http::chat_request ask{.model = "gpt-4o-mini", .prompt = "Hello", .max_tokens = 64};
//     auto res = co_await guarded(ctx, [&] { return openai.complete(ask, 60s); });
//     auto used = weir::http::reported_usage(res.body());
//
// Link the target weir::http_client (weir::weir plus OpenSSL). The API key is sent as a header
// and appears in no error message; the client logs nothing.
#pragma once

#include <weir/http/usage.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace weir::http {

using response = boost::beast::http::response<boost::beast::http::string_body>;
using header_list = std::vector<std::pair<std::string, std::string>>;

// Where a client sends: http[s]://host[:port][/path], the path being the API root as the SDKs
// take it ("https://api.openai.com/v1").
struct endpoint {
  bool tls = false;
  std::string host;
  std::string port;
  std::string path;  // without a trailing slash: "" or "/v1"

  // Throws std::invalid_argument for anything but an http or https URL with a host.
  static endpoint parse(std::string_view text) {
    endpoint e;
    if (text.starts_with("https://")) {
      e.tls = true;
      text.remove_prefix(8);
    } else if (text.starts_with("http://")) {
      text.remove_prefix(7);
    } else {
      throw std::invalid_argument("endpoint: the URL must start with http:// or https://");
    }
    const auto slash = text.find('/');
    const auto authority = text.substr(0, slash);
    if (slash != std::string_view::npos) e.path = std::string(text.substr(slash));
    while (e.path.ends_with('/')) e.path.pop_back();
    const auto colon = authority.rfind(':');
    e.host = std::string(authority.substr(0, colon));
    e.port = colon != std::string_view::npos ? std::string(authority.substr(colon + 1))
                                             : std::string(e.tls ? "443" : "80");
    if (e.host.empty() || e.port.empty())
      throw std::invalid_argument("endpoint: the URL has no host or no port");
    return e;
  }
};

// POSTs to one endpoint over pooled keep-alive connections. Safe to share across threads.
class client {
 public:
  // `tls` is needed only for an https endpoint; it must outlive the client.
  client(boost::asio::any_io_executor ex, endpoint where, boost::asio::ssl::context* tls = nullptr)
      : executor_(std::move(ex)), where_(std::move(where)), tls_(tls) {
    if (where_.tls && !tls_)
      throw std::invalid_argument("http::client: an https endpoint needs a TLS context");
  }

  const endpoint& where() const noexcept { return where_; }

  // POSTs `body` (JSON) to the endpoint's path + `target` and returns the response, whatever its
  // status. Throws boost::system::system_error on a connection failure, or
  // beast::error::timeout when `timeout` passes during the exchange.
  // Every argument is taken by value: the coroutine outlives the caller's expressions.
  boost::asio::awaitable<response> post(std::string target, std::string body, header_list headers,
                                        std::chrono::steady_clock::duration timeout) {
    namespace beast_http = boost::beast::http;
    beast_http::request<beast_http::string_body> req{beast_http::verb::post, where_.path + target,
                                                     11};
    req.set(beast_http::field::host, where_.host);
    req.set(beast_http::field::user_agent, "weir");
    req.set(beast_http::field::content_type, "application/json");
    for (const auto& [name, value] : headers) req.set(name, value);
    req.body() = std::move(body);
    req.keep_alive(true);
    req.prepare_payload();

    auto conn = take();
    if (!conn) conn = co_await open(timeout);
    std::visit([&](auto& s) { boost::beast::get_lowest_layer(s).expires_after(timeout); },
               conn->stream);
    response res;
    if (auto* plain = std::get_if<plain_stream>(&conn->stream))
      co_await exchange(*plain, req, conn->buffer, res);
    else
      co_await exchange(std::get<tls_stream>(conn->stream), req, conn->buffer, res);
    if (res.keep_alive()) give_back(std::move(conn));
    co_return res;
  }

 private:
  using plain_stream = boost::beast::tcp_stream;
  using tls_stream = boost::beast::ssl_stream<boost::beast::tcp_stream>;

  struct connection {
    template <class... Args>
    explicit connection(Args&&... args) : stream(std::forward<Args>(args)...) {}
    std::variant<plain_stream, tls_stream> stream;
    boost::beast::flat_buffer buffer;
  };

  template <class Stream, class Request>
  static boost::asio::awaitable<void> exchange(Stream& s, const Request& req,
                                               boost::beast::flat_buffer& buffer, response& res) {
    co_await boost::beast::http::async_write(s, req, boost::asio::use_awaitable);
    co_await boost::beast::http::async_read(s, buffer, res, boost::asio::use_awaitable);
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

  boost::asio::awaitable<std::unique_ptr<connection>> open(
      std::chrono::steady_clock::duration timeout) {
    namespace asio = boost::asio;
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
    boost::beast::get_lowest_layer(s).expires_after(timeout);
    co_await boost::beast::get_lowest_layer(s).async_connect(endpoints, asio::use_awaitable);
    co_await s.async_handshake(asio::ssl::stream_base::client, asio::use_awaitable);
    co_return c;
  }

  static constexpr std::size_t max_idle = 64;

  boost::asio::any_io_executor executor_;
  endpoint where_;
  boost::asio::ssl::context* tls_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<connection>> idle_;
};

// The two request shapes the LLM APIs share: OpenAI's chat completions (also Groq, Gemini's
// OpenAI-compatible endpoint, vLLM, Ollama) and Anthropic's messages.
enum class dialect { openai, anthropic };

// One user message; enough for most agent calls and for the demo.
struct chat_request {
  std::string model;
  std::string prompt;
  unsigned max_tokens = 256;
};

// `text` as the inside of a JSON string.
inline std::string json_escaped(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          char code[8];
          std::snprintf(code, sizeof code, "\\u%04x", static_cast<unsigned>(ch));
          out += code;
        } else {
          out += ch;
        }
    }
  }
  return out;
}

// The request body each dialect expects.
inline std::string chat_body(dialect d, const chat_request& r) {
  const std::string model = json_escaped(r.model);
  const std::string prompt = json_escaped(r.prompt);
  const std::string max_tokens = std::to_string(r.max_tokens);
  const std::string messages = R"("messages":[{"role":"user","content":")" + prompt + R"("}])";
  if (d == dialect::anthropic)
    return R"({"model":")" + model + R"(","max_tokens":)" + max_tokens + "," + messages + "}";
  return R"({"model":")" + model + R"(",)" + messages + R"(,"max_tokens":)" + max_tokens + "}";
}

// Relative to the API root.
inline const char* chat_path(dialect d) {
  return d == dialect::anthropic ? "/messages" : "/chat/completions";
}

// The headers that carry `api_key` (none when it is empty, as for a local server).
inline header_list auth_headers(dialect d, std::string_view api_key) {
  if (api_key.empty()) return {};
  if (d == dialect::anthropic)
    return {{"x-api-key", std::string(api_key)}, {"anthropic-version", "2023-06-01"}};
  return {{"authorization", "Bearer " + std::string(api_key)}};
}

// A chat API behind one endpoint, in one dialect, with one key.
class chat_client {
 public:
  chat_client(boost::asio::any_io_executor ex, dialect speaks, endpoint where,
              std::string_view api_key = {}, boost::asio::ssl::context* tls = nullptr)
      : http_(std::move(ex), std::move(where), tls),
        speaks_(speaks),
        auth_(auth_headers(speaks, api_key)) {}

  // Sends `r` and returns the response, whatever its status (weir's classifier judges it; see
  // beast.hpp). `extra` headers go along, e.g. a request id.
  boost::asio::awaitable<response> complete(const chat_request& r,
                                            std::chrono::steady_clock::duration timeout,
                                            header_list extra = {}) {
    extra.insert(extra.end(), auth_.begin(), auth_.end());
    return http_.post(chat_path(speaks_), chat_body(speaks_, r), std::move(extra), timeout);
  }

  dialect speaks() const noexcept { return speaks_; }
  const endpoint& where() const noexcept { return http_.where(); }

 private:
  client http_;
  dialect speaks_;
  header_list auth_;
};

}  // namespace weir::http
