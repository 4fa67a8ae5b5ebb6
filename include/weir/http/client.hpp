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
// and appears in no error message; the client logs nothing. Against a hostile or broken server
// (limits.hpp): a header value with CR, LF or NUL is refused before anything is sent; interim 1xx
// responses are skipped and the final one read; a connection goes back to the pool only with
// nothing unread on it; headers, whole bodies, event-stream lines and events and the transfer
// time are bounded by response_limits, and passing one is limit_exceeded (fatal).
#pragma once

#include <weir/composition/stream.hpp>
#include <weir/core/trace.hpp>
#include <weir/http/classify.hpp>
#include <weir/http/limits.hpp>
#include <weir/http/sse.hpp>
#include <weir/http/usage.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
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
    for (const char c : text)
      if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f)
        throw std::invalid_argument("endpoint: the URL holds a space or a control character");
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

using header_parser = boost::beast::http::response_parser<boost::beast::http::empty_body>;

// Reads the final response's status line and headers into `header`, skipping interim 1xx
// responses (103 Early Hints, 100 Continue; not 101, which ends the exchange): each one's bytes
// count toward max_header_bytes, so an endless run of them ends too.
template <class Stream>
boost::asio::awaitable<void> read_final_header(Stream& s, boost::beast::flat_buffer& buffer,
                                               std::optional<header_parser>& header,
                                               const response_limits& limits) {
  namespace beast_http = boost::beast::http;
  std::size_t read = 0;
  for (;;) {
    header.emplace();
    header->header_limit(static_cast<std::uint32_t>(
        std::min<std::size_t>(limits.max_header_bytes - read, UINT32_MAX)));
    auto [ec, n] = co_await beast_http::async_read_header(
        s, buffer, *header, boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec == beast_http::error::header_limit)
      limit_passed("http::client", "the response's headers",
                   fmt::format("max_header_bytes ({})", limits.max_header_bytes));
    if (ec) throw boost::system::system_error(ec);
    read += n;
    const unsigned status = header->get().result_int();
    if (status / 100 != 1 || status == 101) co_return;
    if (read >= limits.max_header_bytes)
      limit_passed("http::client", "the interim responses' headers",
                   fmt::format("max_header_bytes ({})", limits.max_header_bytes));
  }
}

// Reads the final response whole, within the limits.
template <class Stream>
boost::asio::awaitable<response> read_response(Stream& s, boost::beast::flat_buffer& buffer,
                                               const response_limits& limits) {
  namespace beast_http = boost::beast::http;
  std::optional<header_parser> header;
  co_await read_final_header(s, buffer, header, limits);
  beast_http::response_parser<beast_http::string_body> whole(std::move(*header));
  whole.body_limit(limits.max_body_bytes);  // for chunked bodies and bodies to the end
  const auto passed = [&] {
    limit_passed("http::client", "the response's body",
                 fmt::format("max_body_bytes ({})", limits.max_body_bytes));
  };
  // A declared length was judged against the header parser's limit, not this one.
  if (const auto length = whole.content_length(); length && *length > limits.max_body_bytes)
    passed();
  auto [ec, n] = co_await beast_http::async_read(s, buffer, whole,
                                                 boost::asio::as_tuple(boost::asio::use_awaitable));
  if (ec == beast_http::error::body_limit) passed();
  if (ec) throw boost::system::system_error(ec);
  co_return whole.release();
}
}  // namespace detail

// A response whose body is still arriving: its status and headers, and the body piece by piece.
// It owns its connection, which is closed when it is destroyed.
class body_stream {
 public:
  unsigned status() const noexcept { return parser_.get().result_int(); }
  const boost::beast::http::fields& headers() const noexcept { return parser_.get().base(); }

  // The next piece of the body as it arrives; nullopt once it has all come. Each read may take
  // up to `timeout` (a backstop: weir::stream's idle timeout is the one to set), and none goes
  // past the transfer's max_transfer_time (then limit_exceeded). Cancellable.
  boost::asio::awaitable<std::optional<std::string>> read_some() {
    return read_some_until(std::chrono::steady_clock::time_point::max());
  }

  // Reads the rest of the body whole (for an error status: what the server said), at most
  // `at_most` bytes and for at most `timeout` in all: a body that trickles in ends there, with
  // what came.
  boost::asio::awaitable<std::string> read_all(std::size_t at_most = 64 * 1024) {
    const auto until = std::chrono::steady_clock::now() + timeout_;
    std::string all;
    try {
      while (all.size() < at_most)
        if (auto piece = co_await read_some_until(until))
          all += *piece;
        else
          break;
    } catch (const boost::system::system_error& e) {
      if (e.code() != boost::beast::error::timeout) throw;
    }
    all.resize(std::min(all.size(), at_most));
    co_return all;
  }

 private:
  friend class client;
  using clock = std::chrono::steady_clock;

  body_stream(std::unique_ptr<detail::connection> c, clock::duration timeout,
              clock::time_point transfer_ends, std::chrono::nanoseconds max_transfer_time,
              detail::header_parser&& header)
      : connection_(std::move(c)),
        timeout_(timeout),
        transfer_ends_(transfer_ends),
        max_transfer_time_(max_transfer_time),
        parser_(std::move(header)) {
    parser_.body_limit(boost::none);  // the SSE parser bounds what it keeps
  }

  boost::asio::awaitable<std::optional<std::string>> read_some_until(clock::time_point until) {
    namespace beast_http = boost::beast::http;
    while (!parser_.is_done()) {
      parser_.get().body().data = piece_;
      parser_.get().body().size = sizeof piece_;
      const auto now = clock::now();
      if (now >= transfer_ends_) transfer_too_long();
      const auto expires = std::min({now + timeout_, until, transfer_ends_});
      std::visit([&](auto& s) { boost::beast::get_lowest_layer(s).expires_at(expires); },
                 connection_->stream);
      auto [ec, n] = co_await std::visit(
          [&](auto& s) {
            return beast_http::async_read_some(s, connection_->buffer, parser_,
                                               boost::asio::as_tuple(boost::asio::use_awaitable));
          },
          connection_->stream);
      if (ec == boost::beast::error::timeout && clock::now() >= transfer_ends_) transfer_too_long();
      if (ec && ec != beast_http::error::need_buffer) throw boost::system::system_error(ec);
      const std::size_t got = sizeof piece_ - parser_.get().body().size;
      if (got > 0) co_return std::string(piece_, got);
    }
    co_return std::nullopt;
  }

  [[noreturn]] void transfer_too_long() const {
    detail::limit_passed("http::client", "the transfer",
                         fmt::format("max_transfer_time ({})",
                                     weir::detail::duration_text(
                                         std::chrono::duration<double>(max_transfer_time_))));
  }

  std::unique_ptr<detail::connection> connection_;
  clock::duration timeout_;
  clock::time_point transfer_ends_;
  std::chrono::nanoseconds max_transfer_time_;
  boost::beast::http::response_parser<boost::beast::http::buffer_body> parser_;
  char piece_[4096];
};

// POSTs to one endpoint over pooled keep-alive connections. Safe to share across threads.
class client {
 public:
  // `tls` is needed only for an https endpoint; it must outlive the client.
  client(boost::asio::any_io_executor ex, endpoint where, boost::asio::ssl::context* tls = nullptr,
         response_limits limits = {})
      : executor_(std::move(ex)), where_(std::move(where)), tls_(tls), limits_(limits) {
    if (where_.tls && !tls_)
      throw std::invalid_argument("http::client: an https endpoint needs a TLS context");
  }

  const endpoint& where() const noexcept { return where_; }
  const response_limits& limits() const noexcept { return limits_; }

  // POSTs `body` (JSON) to the endpoint's path + `target` and returns the response, whatever its
  // status. Throws boost::system::system_error on a connection failure, or
  // beast::error::timeout when `timeout` passes during the exchange; weir::exception
  // (invalid_argument) for a header that could inject, before sending; (limit_exceeded) for a
  // response past the limits.
  // Every argument is taken by value: the coroutine outlives the caller's expressions.
  boost::asio::awaitable<response> post(std::string target, std::string body, header_list headers,
                                        std::chrono::steady_clock::duration timeout) {
    auto req = request(std::move(target), std::move(body), headers);
    const auto within = std::min<std::chrono::steady_clock::duration>(
        timeout,
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(limits_.max_transfer_time));

    auto conn = take();
    if (!conn) conn = co_await open(within);
    std::visit([&](auto& s) { boost::beast::get_lowest_layer(s).expires_after(within); },
               conn->stream);
    response res;
    if (auto* plain = std::get_if<plain_stream>(&conn->stream))
      res = co_await exchange(*plain, req, conn->buffer);
    else
      res = co_await exchange(std::get<tls_stream>(conn->stream), req, conn->buffer);
    // Bytes past the response (a server that sent more than it said) would be the next
    // caller's answer: such a connection is not reused.
    if (res.keep_alive() && conn->buffer.size() == 0 && res.result_int() != 101)
      give_back(std::move(conn));
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
    using clock = std::chrono::steady_clock;
    const auto now = clock::now();
    // No later than the end of time: max_transfer_time may be set to "none" (its max()).
    const auto transfer_ends =
        limits_.max_transfer_time >= clock::time_point::max() - now
            ? clock::time_point::max()
            : now + std::chrono::duration_cast<clock::duration>(limits_.max_transfer_time);
    auto conn = take();
    if (!conn) conn = co_await open(timeout);
    std::visit([&](auto& s) { boost::beast::get_lowest_layer(s).expires_after(timeout); },
               conn->stream);
    std::optional<detail::header_parser> header;
    if (auto* plain = std::get_if<plain_stream>(&conn->stream))
      co_await send_for_headers(*plain, req, conn->buffer, header);
    else
      co_await send_for_headers(std::get<tls_stream>(conn->stream), req, conn->buffer, header);
    co_return std::shared_ptr<body_stream>(new body_stream(
        std::move(conn), timeout, transfer_ends, limits_.max_transfer_time, std::move(*header)));
  }

 private:
  boost::beast::http::request<boost::beast::http::string_body> request(std::string target,
                                                                       std::string body,
                                                                       const header_list& headers) {
    namespace beast_http = boost::beast::http;
    beast_http::request<beast_http::string_body> req{beast_http::verb::post, where_.path + target,
                                                     11};
    const bool default_port = where_.port == (where_.tls ? "443" : "80");
    req.set(beast_http::field::host, default_port ? where_.host : where_.host + ":" + where_.port);
    req.set(beast_http::field::user_agent, "weir");
    req.set(beast_http::field::content_type, "application/json");
    for (const auto& [name, value] : headers) {
      check_header("http::client", name, value);
      req.set(name, value);
    }
    req.body() = std::move(body);
    req.keep_alive(true);
    req.prepare_payload();
    return req;
  }

  using plain_stream = detail::plain_stream;
  using tls_stream = detail::tls_stream;
  using connection = detail::connection;

  // Sends `req` and reads the final response whole, within the limits.
  template <class Stream, class Request>
  boost::asio::awaitable<response> exchange(Stream& s, const Request& req,
                                            boost::beast::flat_buffer& buffer) const {
    co_await boost::beast::http::async_write(s, req, boost::asio::use_awaitable);
    co_return co_await detail::read_response(s, buffer, limits_);
  }

  template <class Stream, class Request>
  boost::asio::awaitable<void> send_for_headers(
      Stream& s, const Request& req, boost::beast::flat_buffer& buffer,
      std::optional<detail::header_parser>& header) const {
    co_await boost::beast::http::async_write(s, req, boost::asio::use_awaitable);
    co_await detail::read_final_header(s, buffer, header, limits_);
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
  response_limits limits_;
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

// The headers that carry an attempt's trace context (weir/core/trace.hpp): traceparent, and
// tracestate when it has a passable one. None without a context, so the call sends nothing.
//
//     co_await guarded(ctx, [&](const weir::trace_context& attempt) {
//       return openai.complete(ask, 60s, weir::http::trace_headers(attempt));
//     });
inline header_list trace_headers(const trace_context& attempt) {
  header_list h;
  if (!attempt) return h;
  h.emplace_back("traceparent", attempt.traceparent());
  if (!attempt.tracestate.empty() && weir::detail::passable_tracestate(attempt.tracestate))
    h.emplace_back("tracestate", std::string(attempt.tracestate));
  return h;
}

// The server-sent events of a streamed chat response, in order, to the end of the answer.
class event_source {
 public:
  event_source(std::shared_ptr<body_stream> body, dialect speaks, rate_limit_hint hint = {},
               const response_limits& limits = {})
      : body_(std::move(body)), speaks_(speaks), hint_(std::move(hint)), parser_(limits) {}

  // The next event; nullopt at the end (OpenAI's [DONE], Anthropic's message_stop, or the end of
  // the body). Keep-alive pings are skipped. An error event in the stream (OpenAI's
  // `data: {"error":...}`, Anthropic's `event: error`) throws an http::stream_error, judged by its
  // type (sse::in_band_error).
  boost::asio::awaitable<std::optional<sse::event>> next() {
    for (;;) {
      if (done_) co_return std::nullopt;
      if (auto e = parser_.next()) {
        if (sse::is_done(*e) || e->type == "message_stop") {
          done_ = true;
          co_return std::nullopt;
        }
        if (e->type == "ping") continue;
        if (auto failure = sse::in_band_error(*e)) std::rethrow_exception(failure);
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
  // Throws weir::exception(invalid_argument) for a key that would inject a header (CR, LF, NUL),
  // naming the header and not the key.
  chat_client(boost::asio::any_io_executor ex, dialect speaks, endpoint where,
              std::string_view api_key = {}, boost::asio::ssl::context* tls = nullptr,
              response_limits limits = {})
      : http_(std::move(ex), std::move(where), tls, limits),
        speaks_(speaks),
        auth_(auth_headers(speaks, api_key)) {
    for (const auto& [name, value] : auth_) check_header("http::chat_client", name, value);
  }

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
    co_return std::make_shared<event_source>(std::move(body), speaks_, std::move(hint),
                                             http_.limits());
  }

  // The same as a weir::stream, returned with its first event that carries the answer, those
  // that open it held with it (see stream.hpp): what a pipeline or the router streams. The
  // dialect's tally counts the tokens unless `options` has one. Its times (first_token, total,
  // time to first token) count from the request: the headers come within them too. An error
  // event before then fails the call as its type says; one after breaks the stream.
  boost::asio::awaitable<weir::stream<sse::event>> stream(
      chat_request r, stream_options<sse::event> options,
      std::chrono::steady_clock::duration timeout, header_list extra = {}) {
    using clock = std::chrono::steady_clock;
    if (!options.tally)
      options.tally = speaks_ == dialect::anthropic ? sse::anthropic_tally : sse::openai_tally;
    if (!options.opening) options.opening = sse::opens_answer;
    const auto sent = clock::now();
    std::optional<std::chrono::nanoseconds> headers_within;
    for (const auto& bound : {options.first_token, options.total})
      if (bound && (!headers_within || *bound < *headers_within)) headers_within = bound;
    std::shared_ptr<event_source> source;
    if (headers_within) {
      auto opening = [&] { return open_events(r, timeout, extra); };
      auto opened = co_await weir::detail::run_until<clock, std::shared_ptr<event_source>>(
          sent + std::chrono::duration_cast<clock::duration>(*headers_within), opening);
      if (opened.deadline_passed)
        throw weir::exception(error::timeout, "the stream's first chunk did not come in time");
      source = std::move(opened.result).get();
    } else {
      auto opening = open_events(std::move(r), timeout, std::move(extra));
      source = co_await std::move(opening);
    }
    options.server_hint = source->server_hint();
    auto pull = [source] { return source->next(); };
    auto first = open_stream_from<sse::event, clock>(sent, std::move(pull), std::move(options));
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
