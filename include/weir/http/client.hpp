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

#include <weir/http/classify.hpp>
#include <weir/http/sse.hpp>
#include <weir/http/usage.hpp>
#include <weir/stream.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
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

namespace detail {
using plain_stream = boost::beast::tcp_stream;
using tls_stream = boost::beast::ssl_stream<boost::beast::tcp_stream>;
struct connection {
  template <class... Args>
  explicit connection(Args&&... args) : stream(std::forward<Args>(args)...) {}
  std::variant<plain_stream, tls_stream> stream;
  boost::beast::flat_buffer buffer;
};
}  // namespace detail

// A response whose body is still arriving: its status and headers, and the body piece by piece.
// It owns its connection, which is closed when it is destroyed.
class body_stream {
 public:
  unsigned status() const noexcept { return parser_.get().result_int(); }
  const boost::beast::http::fields& headers() const noexcept { return parser_.get().base(); }

  // The next piece of the body as it arrives; nullopt once it has all come. Each read may take
  // up to `timeout` (a backstop: weir::stream's idle timeout is the one to set). Cancellable.
  boost::asio::awaitable<std::optional<std::string>> read_some() {
    namespace beast_http = boost::beast::http;
    while (!parser_.is_done()) {
      parser_.get().body().data = piece_;
      parser_.get().body().size = sizeof piece_;
      std::visit([&](auto& s) { boost::beast::get_lowest_layer(s).expires_after(timeout_); },
                 connection_->stream);
      auto [ec, n] = co_await std::visit(
          [&](auto& s) {
            return beast_http::async_read_some(s, connection_->buffer, parser_,
                                               boost::asio::as_tuple(boost::asio::use_awaitable));
          },
          connection_->stream);
      if (ec && ec != beast_http::error::need_buffer) throw boost::system::system_error(ec);
      const std::size_t got = sizeof piece_ - parser_.get().body().size;
      if (got > 0) co_return std::string(piece_, got);
    }
    co_return std::nullopt;
  }

  // Reads the rest of the body whole (for an error status: what the server said).
  boost::asio::awaitable<std::string> read_all(std::size_t at_most = 64 * 1024) {
    std::string all;
    while (all.size() < at_most)
      if (auto piece = co_await read_some())
        all += *piece;
      else
        break;
    co_return all;
  }

 private:
  friend class client;
  body_stream(std::unique_ptr<detail::connection> c, std::chrono::steady_clock::duration timeout)
      : connection_(std::move(c)), timeout_(timeout) {
    parser_.body_limit(boost::none);
  }

  std::unique_ptr<detail::connection> connection_;
  std::chrono::steady_clock::duration timeout_;
  boost::beast::http::response_parser<boost::beast::http::buffer_body> parser_;
  char piece_[4096];
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
    auto req = request(std::move(target), std::move(body), headers);

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

  // POSTs like post() but returns as soon as the response's headers came, its body still
  // arriving (a stream of server-sent events). `timeout` bounds the connection, the headers and
  // each read. The connection is the body_stream's.
  boost::asio::awaitable<std::shared_ptr<body_stream>> post_streamed(
      std::string target, std::string body, header_list headers,
      std::chrono::steady_clock::duration timeout) {
    namespace beast_http = boost::beast::http;
    auto req = request(std::move(target), std::move(body), headers);
    req.set(beast_http::field::accept, "text/event-stream");
    auto conn = take();
    if (!conn) conn = co_await open(timeout);
    std::shared_ptr<body_stream> out(new body_stream(std::move(conn), timeout));
    auto& c = *out->connection_;
    std::visit([&](auto& s) { boost::beast::get_lowest_layer(s).expires_after(timeout); },
               c.stream);
    if (auto* plain = std::get_if<plain_stream>(&c.stream))
      co_await send_for_headers(*plain, req, c.buffer, out->parser_);
    else
      co_await send_for_headers(std::get<tls_stream>(c.stream), req, c.buffer, out->parser_);
    co_return out;
  }

 private:
  boost::beast::http::request<boost::beast::http::string_body> request(std::string target,
                                                                       std::string body,
                                                                       const header_list& headers) {
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
    return req;
  }

  using plain_stream = detail::plain_stream;
  using tls_stream = detail::tls_stream;
  using connection = detail::connection;

  template <class Stream, class Request>
  static boost::asio::awaitable<void> exchange(Stream& s, const Request& req,
                                               boost::beast::flat_buffer& buffer, response& res) {
    co_await boost::beast::http::async_write(s, req, boost::asio::use_awaitable);
    co_await boost::beast::http::async_read(s, buffer, res, boost::asio::use_awaitable);
  }

  template <class Stream, class Request, class Parser>
  static boost::asio::awaitable<void> send_for_headers(Stream& s, const Request& req,
                                                       boost::beast::flat_buffer& buffer,
                                                       Parser& parser) {
    co_await boost::beast::http::async_write(s, req, boost::asio::use_awaitable);
    co_await boost::beast::http::async_read_header(s, buffer, parser, boost::asio::use_awaitable);
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
  bool stream = false;  // server-sent events (chat_client::stream sets it)
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
  // Streamed, OpenAI sends the usage only when asked, in a last chunk.
  const std::string streamed = !r.stream ? ""
                               : d == dialect::anthropic
                                   ? R"(,"stream":true)"
                                   : R"(,"stream":true,"stream_options":{"include_usage":true})";
  if (d == dialect::anthropic)
    return R"({"model":")" + model + R"(","max_tokens":)" + max_tokens + "," + messages + streamed +
           "}";
  return R"({"model":")" + model + R"(",)" + messages + R"(,"max_tokens":)" + max_tokens +
         streamed + "}";
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

// The server-sent events of a streamed chat response, in order, to the end of the answer.
class event_source {
 public:
  event_source(std::shared_ptr<body_stream> body, dialect speaks, rate_limit_hint hint = {})
      : body_(std::move(body)), speaks_(speaks), hint_(std::move(hint)) {}

  // The next event; nullopt at the end (OpenAI's [DONE], Anthropic's message_stop, or the end of
  // the body). Keep-alive pings are skipped. An error event in the stream (Anthropic sends an
  // overloaded_error so) throws a judged_failure, retryable.
  boost::asio::awaitable<std::optional<sse::event>> next() {
    for (;;) {
      if (done_) co_return std::nullopt;
      if (auto e = parser_.next()) {
        if (sse::is_done(*e) || e->type == "message_stop") {
          done_ = true;
          co_return std::nullopt;
        }
        if (e->type == "ping") continue;
        if (e->type == "error")
          throw judged_failure({verdict::retryable, {}}, "the stream sent an error event");
        co_return e;
      }
      auto piece = co_await body_->read_some();
      if (!piece) {
        done_ = true;
        co_return std::nullopt;
      }
      parser_.feed(*piece);
    }
  }

  dialect speaks() const noexcept { return speaks_; }
  // What the response's rate-limit headers said.
  const rate_limit_hint& server_hint() const noexcept { return hint_; }

 private:
  std::shared_ptr<body_stream> body_;
  dialect speaks_;
  rate_limit_hint hint_;
  sse::parser parser_;
  bool done_ = false;
};

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

  // Sends `r` to be streamed and returns once the headers came: a 2xx as an event source; any
  // other status read whole and thrown as status_error, judged by its status and headers (a
  // 429's Retry-After is the hint), so retries and the router act on it as on a response.
  boost::asio::awaitable<std::shared_ptr<event_source>> open_events(
      chat_request r, std::chrono::steady_clock::duration timeout, header_list extra = {}) {
    r.stream = true;
    extra.insert(extra.end(), auth_.begin(), auth_.end());
    // Named before the co_await: g++ 12 can destroy a temporary with a destructor that sits in
    // a co_await expression twice.
    std::string path = chat_path(speaks_);
    std::string json = chat_body(speaks_, r);
    auto sending = http_.post_streamed(std::move(path), std::move(json), std::move(extra), timeout);
    auto body = co_await std::move(sending);
    std::vector<std::pair<std::string_view, std::string_view>> headers;
    for (const auto& field : body->headers())
      headers.emplace_back(field.name_string(), field.value());
    if (body->status() >= 300) {
      const auto said = co_await body->read_all();
      throw status_error::from(body->status(), headers, said);
    }
    auto hint = read_header_pairs(headers).hint();
    co_return std::make_shared<event_source>(std::move(body), speaks_, std::move(hint));
  }

  // The same as a weir::stream, returned with its first event (see stream.hpp): what a pipeline
  // or the router streams. The dialect's tally counts the tokens unless `options` has one.
  boost::asio::awaitable<weir::stream<sse::event>> stream(
      chat_request r, stream_options<sse::event> options,
      std::chrono::steady_clock::duration timeout, header_list extra = {}) {
    if (!options.tally)
      options.tally = speaks_ == dialect::anthropic ? sse::anthropic_tally : sse::openai_tally;
    // The time to first token counts from the request: the headers come within it too.
    const auto started = std::chrono::steady_clock::now();
    std::shared_ptr<event_source> source;
    if (options.first_token) {
      auto opening = [&] { return open_events(r, timeout, extra); };
      auto opened = co_await weir::detail::run_until<std::chrono::steady_clock,
                                                     std::shared_ptr<event_source>>(
          started + *options.first_token, opening);
      if (opened.deadline_passed)
        throw weir::exception(error::timeout, "the stream's first chunk did not come in time");
      source = std::move(opened.result).get();
      options.first_token = std::max<std::chrono::nanoseconds>(
          std::chrono::nanoseconds(0),
          *options.first_token - (std::chrono::steady_clock::now() - started));
    } else {
      auto opening = open_events(std::move(r), timeout, std::move(extra));
      source = co_await std::move(opening);
    }
    options.server_hint = source->server_hint();
    auto pull = [source] { return source->next(); };
    auto first = open_stream<sse::event>(std::move(pull), std::move(options));
    co_return co_await std::move(first);
  }

  dialect speaks() const noexcept { return speaks_; }
  const endpoint& where() const noexcept { return http_.where(); }

 private:
  client http_;
  dialect speaks_;
  header_list auth_;
};

}  // namespace weir::http
