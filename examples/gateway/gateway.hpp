// weir-gateway's server: an HTTP endpoint speaking OpenAI's `POST /v1/chat/completions` and
// Anthropic's `POST /v1/messages`, whole and streamed, in front of weir's router. Agents in any
// language point their SDK's base URL at it; the router picks the model, paces it to the
// provider's limits, falls back and retries, and each client key's tenant gets its own limits,
// budget and fair share of the queue.
//
//     gateway::server gw(io.get_executor(), std::move(options));  // see gateway::config
//     gw.start();                      // listens; then http://HOST:PORT/v1 is the SDKs' base URL
//     co_await gw.drain(10s);          // stops accepting, lets requests in flight finish
//
// What it never does: forward a client's header that is not allow-listed, show a provider's key
// to a client, write a request body or a key anywhere (keys are kept as SHA-256 digests).
// Boost.JSON parses the bodies: include <boost/json/src.hpp> in one source file of the program.
#pragma once

#include <weir/composition/pipeline.hpp>
#include <weir/detail/listener.hpp>
#include <weir/http/beast.hpp>
#include <weir/http/client.hpp>
#include <weir/observability/metrics.hpp>
#include <weir/routing/router.hpp>
#include <weir/throttling/keyed_limiter.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/throttling/spend_budget.hpp>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace gateway {

namespace asio = boost::asio;
namespace beast_http = boost::beast::http;
using steady = std::chrono::steady_clock;
using weir::http::dialect;

// Where one of the catalog's providers is reached, and with what.
struct upstream {
  std::string provider{};  // its name in the catalog
  std::string base_url{};  // the API root, as the SDKs take it: https://api.openai.com/v1
  std::string api_key{};   // from the environment; sent to it alone, never shown or logged
  bool speaks_openai = true;
  bool speaks_anthropic = false;
};

// A name clients may ask for instead of a model ("fast", "cheap", "smart"): the router picks
// among the models that meet its constraints.
struct alias {
  std::string name{};
  double min_capability = 0;
  std::optional<double> max_cost{};      // USD per request at the estimates
  std::vector<std::string> providers{};  // empty: any
};

// Whose requests come with one client key.
struct tenant {
  std::string name{};
  std::string key_sha256{};        // hex digest of the key (sha256_hex)
  double requests_per_minute = 0;  // 0: no limit of its own
  double tokens_per_minute = 0;
  double budget_per_day = 0;  // USD; 0: no budget
  double weight = 1;          // its share of the queue's turns against the others'
};

// Waits for model `m`'s turn on a request limit this gateway shares with others (a fleet's, in
// Redis: gateway/fleet.hpp), at most until `deadline`; throws a weir::exception refusal when no
// turn comes by then, so the router tries another model or answers that none has room.
using shared_turn = std::function<boost::asio::awaitable<void>(
    const weir::routing::model_spec& m, std::chrono::steady_clock::time_point deadline)>;

struct config {
  std::string address = "127.0.0.1";
  unsigned short port = 0;  // 0: a free port (start() returns it)
  weir::routing::catalog catalog;
  std::vector<upstream> upstreams;
  std::vector<alias> aliases;
  // Empty: no client key is asked for (a gateway on loopback for one user).
  std::vector<tenant> tenants;
  // Client headers passed on to the provider; every other one stays here (lower case).
  std::vector<std::string> forwarded_headers{"anthropic-version", "anthropic-beta"};
  std::size_t max_body_bytes = 4 * 1024 * 1024;       // past it: 413
  std::size_t max_header_bytes = 16 * 1024;           // past it: 431
  std::size_t max_connections = 1024;                 // past it, a new connection is closed at once
  std::chrono::milliseconds idle_timeout{60'000};     // for the next request on a connection
  std::chrono::milliseconds request_timeout{30'000};  // to read one request's body
  std::chrono::milliseconds write_timeout{30'000};    // each write to the client
  std::chrono::milliseconds max_wait{60'000};  // a request's deadline for a model to have room
  std::chrono::milliseconds upstream_timeout{120'000};  // one whole exchange with a provider
  std::chrono::milliseconds first_token{60'000};        // a stream's first chunk
  std::chrono::milliseconds stream_idle{60'000};        // between two chunks of a stream
  std::size_t max_in_flight = 256;  // routes at once, over all tenants (the fair queue's slots)
  std::size_t max_queued = 4096;
  unsigned max_attempts = 4;
  std::optional<weir::http::adaptation_options> adaptation = weir::http::adaptation_options{};
  bool log_requests = true;  // one line per request on stderr: never a body or a key
  // What this gateway shares with the others of its fleet (gateway/fleet.hpp sets both): the
  // router's cooldowns, breaker openings and learned limits, and a turn on each model's request
  // limit before every attempt. Empty: this gateway alone.
  std::shared_ptr<weir::routing::fleet> fleet{};
  shared_turn wait_shared_turn{};
};

// The hex SHA-256 digest of `key`: how client keys are kept and compared.
inline std::string sha256_hex(std::string_view key) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned length = 0;
  EVP_Digest(key.data(), key.size(), digest, &length, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

// A name the client gave, fit for a log line or an error message: at most 64 characters, none
// of them a control character (a name holding a newline must not forge a log line).
inline std::string printable(std::string_view name) {
  std::string out(name.substr(0, 64));
  for (auto& ch : out)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  if (name.size() > 64) out += "...";
  return out;
}

// The error body each dialect's SDK reads.
inline std::string error_body(dialect d, unsigned status, std::string_view message) {
  const auto anthropic_type = [&]() -> std::string_view {
    switch (status) {
      case 401: return "authentication_error";
      case 403: return "permission_error";
      case 404: return "not_found_error";
      case 413: return "request_too_large";
      case 429: return "rate_limit_error";
      case 529:
      case 503: return "overloaded_error";
      default: return status < 500 ? "invalid_request_error" : "api_error";
    }
  };
  const auto openai_type = [&]() -> std::string_view {
    if (status == 429) return "rate_limit_exceeded";
    return status < 500 ? "invalid_request_error" : "server_error";
  };
  const auto openai_code = [&]() -> boost::json::value {
    switch (status) {
      case 401: return "invalid_api_key";
      case 404: return "model_not_found";
      case 429: return "rate_limit_exceeded";
      default: return nullptr;
    }
  };
  if (d == dialect::anthropic)
    return boost::json::serialize(boost::json::object{
        {"type", "error"},
        {"error", boost::json::object{{"type", anthropic_type()}, {"message", message}}}});
  return boost::json::serialize(boost::json::object{
      {"error", boost::json::object{
                    {"message", message}, {"type", openai_type()}, {"code", openai_code()}}}});
}

// A provider's refusal the router does not retry (a 400, say): the client gets it as it came.
class upstream_refusal : public weir::http::status_error {
 public:
  template <class Headers>
  upstream_refusal(unsigned status, const Headers& headers, std::string body)
      : weir::http::status_error(status, weir::http::judge_status(status, headers, body),
                                 weir::http::context_length_exceeded(status, body)),
        body_(std::move(body)) {}
  const std::string& body() const noexcept { return body_; }

 private:
  std::string body_;
};

// What the gateway counted, for /metrics and the tests.
struct stats {
  std::uint64_t requests = 0;  // chat requests answered, whatever the status
  std::uint64_t streams = 0;   // of them, streamed
  std::uint64_t unauthorized = 0;
  std::uint64_t bad_requests = 0;  // malformed, too large, unknown model
  std::uint64_t refused_connections = 0;
  std::uint64_t timeouts = 0;
  std::size_t open_connections = 0;
  std::size_t in_flight = 0;  // requests being answered now
  std::map<unsigned, std::uint64_t> by_status{};
};

namespace detail {

using event = weir::http::sse::event;
using answer = weir::stream<event>;

// What the client asked, parsed once; every attempt sends it with its model's id.
struct chat_body {
  dialect speaks = dialect::openai;
  bool stream = false;
  bool client_wants_usage = false;  // OpenAI: asked for the last chunk with the usage
  std::string model;                // as the client named it
  boost::json::object json;
  weir::http::header_list forwarded;  // allow-listed client headers
};

// The router's request: cheap to copy, as the router copies it for hedges.
struct chat_call {
  chat_call(std::shared_ptr<const chat_body> b, steady::time_point d)
      : body(std::move(b)), deadline(d) {}
  std::shared_ptr<const chat_body> body;
  steady::time_point deadline;  // no wait for a shared turn ends past it
};

// A whole answer, handed to the router as a stream of one chunk: one settlement path for both.
inline asio::awaitable<std::optional<event>> take_once(std::shared_ptr<std::optional<event>> e) {
  std::optional<event> out = std::move(*e);
  e->reset();
  co_return out;
}

inline void whole_tally(const event& e, weir::stream_tally& tally) {
  if (auto used = weir::http::reported_usage(e.data)) {
    tally.report_input(*used);
    tally.reported_output_tokens = used->output_tokens;
  }
}

// One provider's connection pool and what it takes to call it.
struct provider_link {
  provider_link(asio::any_io_executor ex, const upstream& u, asio::ssl::context* tls)
      : spec(u), http(std::move(ex), weir::http::endpoint::parse(u.base_url), tls) {}

  bool speaks(dialect d) const {
    return d == dialect::anthropic ? spec.speaks_anthropic : spec.speaks_openai;
  }

  upstream spec;
  weir::http::client http;
};

template <class Fields>
std::vector<std::pair<std::string_view, std::string_view>> header_pairs(const Fields& fields) {
  std::vector<std::pair<std::string_view, std::string_view>> out;
  for (const auto& f : fields) out.emplace_back(f.name_string(), f.value());
  return out;
}

// Sends one attempt of `call` to model `m` behind `link`.
inline asio::awaitable<answer> send(provider_link& link, const config& o,
                                    weir::routing::model_spec m, chat_call call) {
  if (o.wait_shared_turn) co_await o.wait_shared_turn(m, call.deadline);
  const auto& b = *call.body;
  const auto sent = steady::now();
  boost::json::object json = b.json;
  json["model"] = m.id == "*" ? b.model : m.id;
  if (b.stream && b.speaks == dialect::openai) {
    // The usage comes in a last chunk only when asked: the tenant's budget and the limits settle
    // to it. A client that did not ask does not see that chunk.
    auto& so = json["stream_options"];
    if (!so.is_object()) so.emplace_object();
    so.as_object()["include_usage"] = true;
  }
  weir::http::header_list headers = b.forwarded;
  const auto has = [&](std::string_view name) {
    return std::any_of(headers.begin(), headers.end(),
                       [&](const auto& h) { return h.first == name; });
  };
  if (b.speaks == dialect::anthropic) {
    if (!has("anthropic-version")) headers.emplace_back("anthropic-version", "2023-06-01");
    if (!link.spec.api_key.empty()) headers.emplace_back("x-api-key", link.spec.api_key);
  } else if (!link.spec.api_key.empty()) {
    headers.emplace_back("authorization", "Bearer " + link.spec.api_key);
  }
  std::string path = weir::http::chat_path(b.speaks);
  std::string text = boost::json::serialize(json);
  weir::stream_options<event> so;
  if (!b.stream) {
    auto exchange =
        link.http.post(std::move(path), std::move(text), std::move(headers), o.upstream_timeout);
    auto res = co_await std::move(exchange);
    if (res.result_int() >= 300)
      throw upstream_refusal(res.result_int(), header_pairs(res.base()), std::move(res.body()));
    so.tally = whole_tally;
    so.server_hint = weir::http::read_hints(res.base()).hint();
    auto once = std::make_shared<std::optional<event>>(event{"whole", std::move(res.body()), {}});
    auto opening = weir::open_stream_from<event, steady>(
        sent, [once] { return take_once(once); }, std::move(so));
    co_return co_await std::move(opening);
  }
  auto posting = link.http.post_streamed(std::move(path), std::move(text), std::move(headers),
                                         o.upstream_timeout);
  auto body = co_await std::move(posting);
  const auto pairs = header_pairs(body->headers());
  if (body->status() >= 300) {
    auto said = co_await body->read_all();
    throw upstream_refusal(body->status(), pairs, std::move(said));
  }
  auto hint = weir::http::read_header_pairs(pairs).hint();
  so.server_hint = hint;
  so.tally = b.speaks == dialect::anthropic ? weir::http::sse::anthropic_tally
                                            : weir::http::sse::openai_tally;
  so.opening = weir::http::sse::opens_answer;
  so.first_token = o.first_token;
  so.idle = o.stream_idle;
  auto source = std::make_shared<weir::http::event_source>(std::move(body), b.speaks,
                                                           std::move(hint), link.http.limits());
  auto opening = weir::open_stream_from<event, steady>(
      sent, [source] { return source->next(); }, std::move(so));
  co_return co_await std::move(opening);
}

// An event as the dialect writes it on the wire.
inline std::string wire(const event& e, dialect d) {
  std::string out;
  if (d == dialect::anthropic || e.type != "message") out += "event: " + e.type + "\n";
  std::string_view data = e.data;
  for (;;) {
    const auto nl = data.find('\n');
    out += "data: ";
    out += data.substr(0, nl);
    out += '\n';
    if (nl == std::string_view::npos) break;
    data.remove_prefix(nl + 1);
  }
  out += '\n';
  return out;
}

// OpenAI's last chunk, the one with the usage and no choices.
inline bool usage_only_chunk(const event& e) {
  return e.data.find("\"choices\":[]") != std::string::npos &&
         e.data.find("\"usage\"") != std::string::npos;
}

}  // namespace detail

class server {
 public:
  using router_type = weir::routing::router<detail::chat_call, detail::answer, steady,
                                            weir::http::response_classifier>;

  // Throws weir::exception (invalid_argument) or std::invalid_argument for options that cannot
  // work: a provider of the catalog with no upstream, a bad URL, an empty catalog.
  server(asio::any_io_executor ex, config o)
      : state_(std::make_shared<state>(std::move(ex), std::move(o))) {}
  ~server() {
    state_->draining = true;
    state_->close_all();
  }
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  // Binds and listens (throws boost::system::system_error if it cannot); returns the port.
  unsigned short start() {
    namespace ip = asio::ip;
    auto& s = *state_;
    s.port = weir::detail::listen_on(
        s.acceptor, ip::tcp::endpoint(ip::make_address(s.options.address), s.options.port));
    asio::co_spawn(s.acceptor.get_executor(), accept(state_), asio::detached);
    for (const auto& link : s.links)
      asio::co_spawn(s.executor, resolve_ahead(state_, link->http.where()), asio::detached);
    return s.port;
  }

  // Stops accepting and closes idle connections; requests in flight have `grace` to finish,
  // then their connections are closed too. Completes when none is left.
  asio::awaitable<void> drain(std::chrono::milliseconds grace) {
    auto s = state_;
    s->draining = true;
    asio::post(s->acceptor.get_executor(), [s] {
      boost::system::error_code ignored;
      s->acceptor.close(ignored);
    });
    s->close_idle();
    const auto until = steady::now() + grace;
    asio::steady_timer tick(co_await asio::this_coro::executor);
    while (s->in_flight.load() > 0 && steady::now() < until) {
      tick.expires_after(std::chrono::milliseconds(10));
      co_await tick.async_wait(asio::use_awaitable);
    }
    s->close_all();
    const auto hard = steady::now() + std::chrono::seconds(2);
    while (s->open.load() > 0 && steady::now() < hard) {
      tick.expires_after(std::chrono::milliseconds(10));
      co_await tick.async_wait(asio::use_awaitable);
    }
  }

  unsigned short port() const noexcept { return state_->port; }
  // The base URL the SDKs take.
  std::string base_url() const {
    return fmt::format("http://{}:{}/v1", state_->options.address, state_->port);
  }
  stats counts() const {
    std::lock_guard lock(state_->mutex);
    auto c = state_->counted;
    c.open_connections = state_->open.load();
    c.in_flight = state_->in_flight.load();
    return c;
  }
  std::vector<weir::routing::model_status> status() const { return state_->router.status(); }
  std::vector<weir::budget_status> spend() const {
    return state_->budgets ? state_->budgets->status() : std::vector<weir::budget_status>{};
  }

 private:
  using stream_type = boost::beast::tcp_stream;
  using request_type = beast_http::request<beast_http::string_body>;

  struct connection {
    explicit connection(asio::ip::tcp::socket socket) : stream(std::move(socket)) {}
    stream_type stream;
    std::atomic<bool> busy{false};     // a request is being answered
    asio::cancellation_signal cancel;  // cuts off what the request awaits (on its strand)
  };

  using guard_type = decltype(weir::pipeline(
      weir::pipeline_options{}, std::declval<const weir::request_queue&>(),
      std::declval<const weir::keyed_limiter<>&>(), std::declval<const weir::keyed_limiter<>&>()));

  struct state : std::enable_shared_from_this<state> {
    state(asio::any_io_executor ex, config o)
        : executor(ex),
          acceptor(asio::make_strand(ex)),
          options(std::move(o)),
          registry("weir-gateway"),
          router(ex, options.catalog, router_options()),
          queue(ex, {.max_concurrent = options.max_in_flight,
                     .max_queued = options.max_queued,
                     .fair_between_tenants = true,
                     .weight_of = [this](std::string_view t) { return find(t).weight; },
                     .name = "gateway-queue"}),
          requests_per_tenant(
              ex, {.limit_of =
                       [this](std::string_view t) { return limit(find(t).requests_per_minute); },
                   .counts = weir::counts::requests,
                   .name = "tenant-requests"}),
          tokens_per_tenant(
              ex,
              {.limit_of = [this](std::string_view t) { return limit(find(t).tokens_per_minute); },
               .counts = weir::counts::tokens,
               .name = "tenant-tokens"}),
          guard(weir::pipeline(weir::pipeline_options{.watch = registry.observer()}, queue,
                               requests_per_tenant, tokens_per_tenant)) {
      for (std::size_t i = 0; i < options.tenants.size(); ++i)
        by_key.emplace(options.tenants[i].key_sha256, i);
      for (const auto& p : options.catalog.providers()) {
        const auto u = std::find_if(options.upstreams.begin(), options.upstreams.end(),
                                    [&](const upstream& x) { return x.provider == p.name; });
        if (u == options.upstreams.end())
          throw weir::exception(weir::error::invalid_argument,
                                fmt::format("gateway: provider {} has no base URL", p.name));
        if (u->base_url.starts_with("https://") && !tls) {
          tls.emplace(asio::ssl::context::tls_client);
          tls->set_default_verify_paths();
          tls->set_verify_mode(asio::ssl::verify_peer);
        }
        auto& link = links.emplace_back(
            std::make_unique<detail::provider_link>(ex, *u, tls ? &*tls : nullptr));
        router.connect(p.name, [l = link.get(), o = &options](const weir::routing::model_spec& m,
                                                              const detail::chat_call& c) {
          return detail::send(*l, *o, m, c);
        });
      }
    }

    router_type::options_type router_options() {
      router_type::options_type ro;
      ro.max_attempts = options.max_attempts;
      ro.adaptation = options.adaptation;
      ro.watch = registry.observer();
      ro.fleet = options.fleet;
      ro.context_exceeded = [](const weir::outcome<detail::answer>& o) {
        try {
          if (!o.has_value()) std::rethrow_exception(o.failure());
        } catch (const weir::http::status_error& e) {
          return e.context_exceeded();
        } catch (...) {
        }
        return false;
      };
      const bool any_budget = std::any_of(options.tenants.begin(), options.tenants.end(),
                                          [](const tenant& t) { return t.budget_per_day > 0; });
      if (any_budget) {
        budgets.emplace(weir::spend_budget_options{.name = "tenant-budget",
                                                   .limit_of =
                                                       [this](std::string_view t) {
                                                         const auto b = find(t).budget_per_day;
                                                         return b > 0 ? b : 1e15;
                                                       },
                                                   .window = weir::budget_window::daily(),
                                                   .per = weir::budget_scope::tenant,
                                                   .watch = registry.observer()});
        ro.budgets = {*budgets};
      }
      return ro;
    }

    static weir::key_limit limit(double per_minute) {
      if (per_minute <= 0) return {.rate = weir::unlimited, .burst = 1};
      // A tenth of a minute's worth at once.
      return {.rate = weir::per_minute(per_minute),
              .burst = static_cast<std::uint64_t>(std::max(1.0, per_minute / 10))};
    }

    const tenant& find(std::string_view name) const {
      for (const auto& t : options.tenants)
        if (t.name == name) return t;
      return anyone;
    }

    void count(unsigned status, bool streamed) {
      std::lock_guard lock(mutex);
      ++counted.requests;
      counted.streams += streamed;
      ++counted.by_status[status];
    }

    void track(const std::shared_ptr<connection>& c) {
      std::lock_guard lock(mutex);
      std::erase_if(connections, [](const auto& w) { return w.expired(); });
      connections.push_back(c);
    }

    // Each close runs on its connection's strand: Asio's sockets are not thread-safe.
    template <class Which>
    void close_where(Which which, bool cut_off) {
      std::vector<std::shared_ptr<connection>> live;
      {
        std::lock_guard lock(mutex);
        for (auto& w : connections)
          if (auto c = w.lock()) live.push_back(std::move(c));
      }
      for (auto& c : live)
        asio::post(c->stream.get_executor(), [c, which, cut_off] {
          if (!which(*c)) return;
          if (cut_off) c->cancel.emit(asio::cancellation_type::terminal);
          boost::system::error_code ignored;
          c->stream.socket().shutdown(asio::socket_base::shutdown_both, ignored);
          c->stream.socket().close(ignored);
        });
    }
    void close_idle() {
      close_where([](const connection& c) { return !c.busy.load(); }, false);
    }
    void close_all() {
      close_where([](const connection&) { return true; }, true);
    }

    asio::any_io_executor executor;
    asio::ip::tcp::acceptor acceptor;
    config options;
    std::optional<asio::ssl::context> tls;
    weir::metrics registry;
    std::optional<weir::spend_budget<>> budgets;
    router_type router;
    weir::request_queue queue;
    weir::keyed_limiter<> requests_per_tenant;
    weir::keyed_limiter<> tokens_per_tenant;
    guard_type guard;
    std::vector<std::unique_ptr<detail::provider_link>> links;
    std::unordered_map<std::string, std::size_t> by_key;  // key digest: tenant
    tenant anyone{.name = "anyone"};                      // when no key is asked for
    unsigned short port = 0;
    std::atomic<bool> draining{false};
    std::atomic<std::size_t> open{0}, in_flight{0};
    mutable std::mutex mutex;
    stats counted;
    std::vector<std::weak_ptr<connection>> connections;
  };

  // The first name lookup starts Asio's resolver thread and the system's name service: left to
  // the first request, it made that request reach the upstream milliseconds late, and the
  // second, paced on time, too soon after it for a strict limit (nginx's burst 0 refused it in
  // five gateway starts of six; one of six with the lookup done here, ahead of requests).
  static asio::awaitable<void> resolve_ahead(std::shared_ptr<state> s, weir::http::endpoint where) {
    asio::ip::tcp::resolver resolver(s->executor);
    co_await resolver.async_resolve(where.host, where.port, asio::as_tuple(asio::use_awaitable));
  }

  static asio::awaitable<void> accept(std::shared_ptr<state> s) {
    for (;;) {
      auto [ec, socket] = co_await s->acceptor.async_accept(asio::make_strand(s->executor),
                                                            asio::as_tuple(asio::use_awaitable));
      if (ec == asio::error::operation_aborted || !s->acceptor.is_open() || s->draining) co_return;
      if (ec == asio::error::connection_aborted) continue;
      if (ec) {  // out of file descriptors, say: try again shortly rather than spin or stop
        asio::steady_timer pause(s->acceptor.get_executor(), std::chrono::milliseconds(100));
        co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
        continue;
      }
      if (s->open.load() >= s->options.max_connections) {
        std::lock_guard lock(s->mutex);
        ++s->counted.refused_connections;
        boost::system::error_code ignored;
        socket.close(ignored);
        continue;
      }
      boost::system::error_code ignored;
      socket.set_option(asio::ip::tcp::no_delay(true), ignored);
      auto c = std::make_shared<connection>(std::move(socket));
      s->track(c);
      ++s->open;
      auto ex = c->stream.get_executor();
      auto slot = c->cancel.slot();
      asio::co_spawn(ex, serve(s, std::move(c)),
                     asio::bind_cancellation_slot(std::move(slot), asio::detached));
    }
  }

  // One connection: requests one after another until the client closes, a timeout, an answer
  // that closes it, or the drain.
  static asio::awaitable<void> serve(std::shared_ptr<state> s, std::shared_ptr<connection> c) {
    struct closer {
      state& s;
      connection& c;
      ~closer() {
        boost::system::error_code ignored;
        c.stream.socket().shutdown(asio::socket_base::shutdown_both, ignored);
        c.stream.socket().close(ignored);
        --s.open;
      }
    } close_at_end{*s, *c};
    auto& stream = c->stream;
    boost::beast::flat_buffer buffer;
    for (;;) {
      beast_http::request_parser<beast_http::string_body> parser;
      parser.header_limit(static_cast<std::uint32_t>(s->options.max_header_bytes));
      parser.body_limit(s->options.max_body_bytes);
      stream.expires_after(s->options.idle_timeout);
      auto [ec, n] = co_await beast_http::async_read_header(stream, buffer, parser,
                                                            asio::as_tuple(asio::use_awaitable));
      if (ec == boost::beast::error::timeout) {
        std::lock_guard lock(s->mutex);
        ++s->counted.timeouts;
        co_return;
      }
      if (ec == beast_http::error::end_of_stream || !stream.socket().is_open() || s->draining)
        co_return;
      c->busy = true;
      ++s->in_flight;
      struct not_busy {
        state& s;
        connection& c;
        ~not_busy() {
          c.busy = false;
          --s.in_flight;
        }
      } done{*s, *c};
      const dialect d = std::string_view(parser.get().target()).starts_with("/v1/messages")
                            ? dialect::anthropic
                            : dialect::openai;
      if (ec == beast_http::error::header_limit || ec == beast_http::error::buffer_overflow) {
        co_await refuse(*s, stream, d, 431, "the request's headers are too large", 11);
        co_return;
      }
      if (ec == beast_http::error::body_limit) {
        co_await refuse(*s, stream, d, 413, "the request body is too large", 11);
        co_return;
      }
      if (ec) {
        co_await refuse(*s, stream, d, 400, "malformed HTTP request", 11);
        co_return;
      }
      if (parser.get().method() == beast_http::verb::post) {
        stream.expires_after(s->options.request_timeout);
        auto [bec, bn] = co_await beast_http::async_read(stream, buffer, parser,
                                                         asio::as_tuple(asio::use_awaitable));
        if (bec == boost::beast::error::timeout) {
          std::lock_guard lock(s->mutex);
          ++s->counted.timeouts;
          co_return;
        }
        if (bec == beast_http::error::body_limit) {
          co_await refuse(*s, stream, d, 413, "the request body is too large", 11);
          co_return;
        }
        if (bec) co_return;
      }
      const auto req = parser.release();
      const bool keep = co_await answer(s, stream, req);
      if (!keep || !req.keep_alive() || s->draining) co_return;
    }
  }

  // Writes a whole response; false when the connection is to close. The answer to a HEAD
  // request is its header alone, Content-Length included (RFC 9110, 9.3.2): a body after it
  // would be read as the next response on a kept-alive connection.
  static asio::awaitable<bool> write(state& s, stream_type& stream, unsigned status,
                                     std::string body, std::string_view content_type,
                                     unsigned version, bool keep_alive,
                                     weir::http::header_list extra = {}, bool head = false) {
    beast_http::response<beast_http::string_body> res(static_cast<beast_http::status>(status),
                                                      version);
    res.set(beast_http::field::server, "weir-gateway");
    res.set(beast_http::field::content_type, content_type);
    for (auto& [name, value] : extra) res.set(name, value);
    res.body() = std::move(body);
    res.keep_alive(keep_alive && !s.draining);
    res.prepare_payload();
    stream.expires_after(s.options.write_timeout);
    if (head) {
      beast_http::response_serializer<beast_http::string_body> header(res);
      auto [ec, n] = co_await beast_http::async_write_header(stream, header,
                                                             asio::as_tuple(asio::use_awaitable));
      co_return !ec && res.keep_alive();
    }
    auto [ec, n] =
        co_await beast_http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
    co_return !ec && res.keep_alive();
  }

  static asio::awaitable<bool> error(state& s, stream_type& stream, dialect d, unsigned status,
                                     std::string_view message, const request_type& req,
                                     weir::http::header_list extra = {}) {
    s.count(status, false);
    return write(s, stream, status, error_body(d, status, message), "application/json",
                 req.version(), req.keep_alive(), std::move(extra),
                 req.method() == beast_http::verb::head);
  }

  // Answers a request that cannot be read on, and closes.
  static asio::awaitable<void> refuse(state& s, stream_type& stream, dialect d, unsigned status,
                                      std::string_view message, unsigned version) {
    {
      std::lock_guard lock(s.mutex);
      ++s.counted.bad_requests;
    }
    s.count(status, false);
    auto said = error_body(d, status, message);
    co_await write(s, stream, status, std::move(said), "application/json", version, false);
  }

  static std::string_view bearer(const request_type& req) {
    if (auto it = req.find(beast_http::field::authorization); it != req.end()) {
      std::string_view v = it->value();
      if (v.size() > 7 && (v.starts_with("Bearer ") || v.starts_with("bearer ")))
        return v.substr(7);
    }
    if (auto it = req.find("x-api-key"); it != req.end()) return it->value();
    return {};
  }

  // The tenant of the request's key; nullptr for an unknown key or none.
  static const tenant* authenticate(const state& s, const request_type& req) {
    if (s.options.tenants.empty()) return &s.anyone;
    const auto key = bearer(req);
    if (key.empty()) return nullptr;
    auto it = s.by_key.find(sha256_hex(key));
    return it == s.by_key.end() ? nullptr : &s.options.tenants[it->second];
  }

  static asio::awaitable<bool> answer(std::shared_ptr<state> s, stream_type& stream,
                                      const request_type& req) {
    const std::string_view target = req.target();
    const std::string_view path = target.substr(0, target.find('?'));
    const bool head = req.method() == beast_http::verb::head;
    const bool get = req.method() == beast_http::verb::get || head;
    if (path == "/health" && get) {
      const bool ready = !s->draining;
      std::string said = ready ? R"({"status":"ready"})" : R"({"status":"draining"})";
      co_return co_await write(*s, stream, ready ? 200 : 503, std::move(said), "application/json",
                               req.version(), req.keep_alive(), {}, head);
    }
    if (path == "/metrics" && get) {
      auto page = metrics_text(*s);
      co_return co_await write(*s, stream, 200, std::move(page), "text/plain; version=0.0.4",
                               req.version(), req.keep_alive(), {}, head);
    }
    const dialect d = path == "/v1/messages" ? dialect::anthropic : dialect::openai;
    const bool chat = path == "/v1/chat/completions" || path == "/v1/messages";
    if (!chat && path != "/v1/models")
      co_return co_await error(*s, stream, d, 404, "no such endpoint", req);
    if (chat ? req.method() != beast_http::verb::post : !get)
      co_return co_await error(*s, stream, d, 405, "method not allowed", req);
    const tenant* who = authenticate(*s, req);
    if (!who) {
      {
        std::lock_guard lock(s->mutex);
        ++s->counted.unauthorized;
      }
      co_return co_await error(*s, stream, d, 401, "invalid or missing API key", req);
    }
    if (!chat) {
      auto list = models_json(*s);
      co_return co_await write(*s, stream, 200, std::move(list), "application/json", req.version(),
                               req.keep_alive(), {}, head);
    }
    co_return co_await chat_request(s, stream, req, d, *who);
  }

  static asio::awaitable<bool> bad_request(state& s, stream_type& stream, dialect d,
                                           unsigned status, std::string_view why,
                                           const request_type& req) {
    {
      std::lock_guard lock(s.mutex);
      ++s.counted.bad_requests;
    }
    co_return co_await error(s, stream, d, status, why, req);
  }

  static asio::awaitable<bool> chat_request(std::shared_ptr<state> s, stream_type& stream,
                                            const request_type& req, dialect d, const tenant& who) {
    const auto began = steady::now();
    auto body = std::make_shared<detail::chat_body>();
    body->speaks = d;
    boost::system::error_code jec;
    auto parsed = boost::json::parse(req.body(), jec);
    if (jec || !parsed.is_object())
      co_return co_await bad_request(*s, stream, d, 400, "the body is not a JSON object", req);
    body->json = std::move(parsed.as_object());
    const auto* model = body->json.if_contains("model");
    if (!model || !model->is_string() || model->as_string().empty())
      co_return co_await bad_request(*s, stream, d, 400, "the body names no model", req);
    body->model = std::string(model->as_string());
    if (const auto* st = body->json.if_contains("stream"); st && st->is_bool())
      body->stream = st->as_bool();
    if (const auto* so = body->json.if_contains("stream_options"); so && so->is_object())
      if (const auto* u = so->as_object().if_contains("include_usage"); u && u->is_bool())
        body->client_wants_usage = u->as_bool();
    for (const auto& name : s->options.forwarded_headers)
      if (auto it = req.find(name); it != req.end())
        body->forwarded.emplace_back(name, std::string(it->value()));

    // What the name stands for: a model of the catalog, an alias, or anything (one upstream
    // with no models listed: the client's name goes through).
    auto c = constraints_for(*s, *body, d);
    if (!c || c->allowed_providers.empty()) {
      const auto why =
          !c ? fmt::format("no model named '{}' here", printable(body->model))
             : fmt::format("no provider of '{}' speaks this API", printable(body->model));
      co_return co_await bad_request(*s, stream, d, c ? 400 : 404, why, req);
    }
    c->input_tokens = std::max<std::uint64_t>(1, req.body().size() / 4);
    c->output_tokens = 1024;
    for (const char* key : {"max_tokens", "max_completion_tokens"})
      if (const auto* v = body->json.if_contains(key); v && v->is_int64() && v->as_int64() > 0)
        c->output_tokens = static_cast<std::uint64_t>(v->as_int64());
    c->deadline = began + s->options.max_wait;
    c->operation = "chat";
    c->tenant = who.name;

    weir::call_context ctx{.tokens = c->input_tokens + c->output_tokens,
                           .deadline = c->deadline,
                           .operation = "chat",
                           .tenant = who.name};
    detail::chat_call call(body, *c->deadline);
    unsigned status = 200;
    bool keep = true;
    std::optional<detail::answer> got;
    std::string failure;  // the error body, when there is one
    weir::http::header_list extra;
    try {
      auto routing = s->guard(ctx, [&] { return s->router.route(call, *c); });
      auto routed = co_await std::move(routing);
      got.emplace(std::move(routed.response));
    } catch (const upstream_refusal& e) {
      status = e.status();
      failure = e.body();
    } catch (const weir::exception& e) {
      std::tie(status, failure) = describe(d, e, extra);
    } catch (const std::exception&) {
      status = 500;
      failure = error_body(d, 500, "the gateway failed to serve the request");
    }
    if (!got) {
      s->count(status, false);
      keep = co_await write(*s, stream, status, std::move(failure), "application/json",
                            req.version(), req.keep_alive(), std::move(extra));
    } else if (!body->stream) {
      std::string whole;
      if (auto e = co_await got->next()) whole = std::move(e->data);
      got->close();
      s->count(200, false);
      keep = co_await write(*s, stream, 200, std::move(whole), "application/json", req.version(),
                            req.keep_alive());
    } else {
      s->count(200, true);
      keep = co_await relay(*s, stream, *got, *body, req);
    }
    if (s->options.log_requests)
      fmt::print(stderr, "weir-gateway: {} {} tenant {} model {} {} {:.0f} ms\n",
                 std::string_view(req.method_string()), path_of(req), who.name,
                 printable(body->model), status,
                 std::chrono::duration<double, std::milli>(steady::now() - began).count());
    co_return keep;
  }

  static std::string_view path_of(const request_type& req) {
    const std::string_view t = req.target();
    return t.substr(0, t.find('?'));
  }

  // A failure the router or the tenant's stages reported, as the status and body a client gets.
  static std::pair<unsigned, std::string> describe(dialect d, const weir::exception& e,
                                                   weir::http::header_list& extra) {
    const auto retry_after = [&] {
      if (auto after = e.retry_after()) {
        const auto seconds =
            std::max<long long>(1, std::chrono::ceil<std::chrono::seconds>(*after).count());
        extra.emplace_back("retry-after", std::to_string(seconds));
      }
    };
    const auto is = [&](weir::error code) { return e.code() == code; };
    // Every model turned the request away before sending it (no turn on the fleet's limit in
    // time): the client hears that refusal, not that the providers failed.
    if (is(weir::error::retries_exhausted) && e.cause()) {
      try {
        std::rethrow_exception(e.cause());
      } catch (const weir::exception& cause) {
        if (cause.refused_locally()) return describe(d, cause, extra);
      } catch (...) {
      }
    }
    if (is(weir::error::over_budget)) {
      retry_after();
      extra.emplace_back("x-should-retry", "false");
      return {429, error_body(d, 429, "this key's spend budget is spent for now")};
    }
    if (is(weir::error::rate_limited)) {
      retry_after();
      return {429, error_body(d, 429, "this key's rate limit is reached")};
    }
    if (is(weir::error::no_provider_available)) {
      retry_after();
      return {429, error_body(d, 429, "no model has room for the request before its deadline")};
    }
    if (is(weir::error::queue_full) || is(weir::error::evicted) || is(weir::error::shut_down))
      return {503, error_body(d, 503, "the gateway is overloaded")};
    if (is(weir::error::timeout)) return {504, error_body(d, 504, "the request's deadline passed")};
    if (is(weir::error::retries_exhausted) || is(weir::error::circuit_open))
      return {502, error_body(d, 502, "the providers failed to answer")};
    return {500, error_body(d, 500, "the gateway failed to serve the request")};
  }

  // The router's constraints for the name the client asked for; nullopt for an unknown name.
  static std::optional<router_type::constraints> constraints_for(const state& s,
                                                                 const detail::chat_body& b,
                                                                 dialect d) {
    router_type::constraints c;
    std::vector<std::string_view> providers;  // of the named models
    bool found = false;
    for (const auto& a : s.options.aliases)
      if (a.name == b.model) {
        found = true;
        c.min_capability = a.min_capability;
        c.max_cost = a.max_cost;
        for (const auto& p : a.providers) providers.push_back(p);
        if (providers.empty())
          for (const auto& p : s.options.catalog.providers()) providers.push_back(p.name);
        break;
      }
    if (!found)
      for (const auto& m : s.options.catalog.models())
        if (m.id == b.model || m.id == "*") {
          found = true;
          c.allowed_models = {m.id};
          providers.push_back(m.provider);
        }
    if (!found) return std::nullopt;
    for (const auto& link : s.links)
      if (link->speaks(d) &&
          std::find(providers.begin(), providers.end(), link->spec.provider) != providers.end())
        c.allowed_providers.push_back(link->spec.provider);
    return c;
  }

  // Passes a stream's events to the client as they come; false when the connection is to close.
  static asio::awaitable<bool> relay(state& s, stream_type& stream, detail::answer& events,
                                     const detail::chat_body& b, const request_type& req) {
    beast_http::response<beast_http::empty_body> head(beast_http::status::ok, req.version());
    head.set(beast_http::field::server, "weir-gateway");
    head.set(beast_http::field::content_type, "text/event-stream");
    head.set(beast_http::field::cache_control, "no-cache");
    head.keep_alive(req.keep_alive() && !s.draining);
    head.chunked(true);
    beast_http::response_serializer<beast_http::empty_body> serializer(head);
    stream.expires_after(s.options.write_timeout);
    auto [hec, h] = co_await beast_http::async_write_header(stream, serializer,
                                                            asio::as_tuple(asio::use_awaitable));
    if (hec) co_return false;
    const auto send = [&](const std::string& text) -> asio::awaitable<bool> {
      stream.expires_after(s.options.write_timeout);
      auto [ec, n] = co_await asio::async_write(stream, beast_http::make_chunk(asio::buffer(text)),
                                                asio::as_tuple(asio::use_awaitable));
      co_return !ec;
    };
    std::string ending;
    try {
      for (;;) {
        auto e = co_await events.next();
        if (!e) break;
        if (b.speaks == dialect::openai && !b.client_wants_usage && detail::usage_only_chunk(*e))
          continue;
        const auto text = detail::wire(*e, b.speaks);
        if (!co_await send(text)) {
          events.close();
          co_return false;
        }
      }
      ending = b.speaks == dialect::anthropic
                   ? "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
                   : "data: [DONE]\n\n";
    } catch (const std::exception&) {
      // Broken after the first chunk: the client has part of an answer, so it is told, not
      // silently given a second one.
      const auto said = error_body(b.speaks, 502, "the provider's stream broke");
      ending = b.speaks == dialect::anthropic ? "event: error\ndata: " + said + "\n\n"
                                              : "data: " + said + "\n\n";
    }
    if (!co_await send(ending)) co_return false;
    stream.expires_after(s.options.write_timeout);
    auto [lec, l] = co_await asio::async_write(stream, beast_http::make_chunk_last(),
                                               asio::as_tuple(asio::use_awaitable));
    co_return !lec && head.keep_alive();
  }

  // The catalog's models and the aliases, in a shape both SDKs read (OpenAI's list; Anthropic's
  // data, has_more, first_id and last_id).
  static std::string models_json(const state& s) {
    boost::json::array data;
    std::vector<std::string_view> seen;
    const auto add = [&](std::string_view id, std::string_view owner) {
      if (id == "*" || std::find(seen.begin(), seen.end(), id) != seen.end()) return;
      seen.push_back(id);
      data.push_back(boost::json::object{{"id", id},
                                         {"object", "model"},
                                         {"created", 0},
                                         {"owned_by", owner},
                                         {"type", "model"},
                                         {"display_name", id},
                                         {"created_at", "1970-01-01T00:00:00Z"}});
    };
    for (const auto& m : s.options.catalog.models()) add(m.id, m.provider);
    for (const auto& a : s.options.aliases) add(a.name, "weir-gateway");
    boost::json::object out{{"object", "list"}, {"has_more", false}};
    out["first_id"] = seen.empty() ? boost::json::value(nullptr) : boost::json::value(seen.front());
    out["last_id"] = seen.empty() ? boost::json::value(nullptr) : boost::json::value(seen.back());
    out["data"] = std::move(data);
    return boost::json::serialize(out);
  }

  static std::string metrics_text(const state& s) {
    std::string out;
    stats c;
    {
      std::lock_guard lock(s.mutex);
      c = s.counted;
    }
    out +=
        "# HELP weir_gateway_requests_total Chat requests answered, by status.\n"
        "# TYPE weir_gateway_requests_total counter\n";
    for (const auto& [status, n] : c.by_status)
      out += fmt::format("weir_gateway_requests_total{{status=\"{}\"}} {}\n", status, n);
    out += fmt::format(
        "# HELP weir_gateway_streams_total Chat requests answered as a stream.\n"
        "# TYPE weir_gateway_streams_total counter\nweir_gateway_streams_total {}\n"
        "# HELP weir_gateway_unauthorized_total Requests with an unknown or missing key.\n"
        "# TYPE weir_gateway_unauthorized_total counter\nweir_gateway_unauthorized_total {}\n"
        "# HELP weir_gateway_open_connections Client connections open now.\n"
        "# TYPE weir_gateway_open_connections gauge\nweir_gateway_open_connections {}\n"
        "# HELP weir_gateway_in_flight Requests being answered now.\n"
        "# TYPE weir_gateway_in_flight gauge\nweir_gateway_in_flight {}\n",
        c.streams, c.unauthorized, s.open.load(), s.in_flight.load());
    weir::write_prometheus(out, {&s.registry});
    if (s.budgets) weir::write_prometheus(out, s.budgets->status());
    return out;
  }

  std::shared_ptr<state> state_;
};

}  // namespace gateway
