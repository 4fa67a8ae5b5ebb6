// A local LLM provider for tests and demos: Beast on 127.0.0.1, speaking OpenAI's
// `POST /v1/chat/completions` and Anthropic's `POST /v1/messages`. It enforces requests and tokens
// per minute per model with a continuously refilled bucket, answers with each dialect's real
// rate-limit headers and Retry-After on a 429, takes time in proportion to the tokens it writes,
// and injects faults from a seeded generator or a schedule. It counts every answer it gave.
// With `workers`, it is a self-hosted server instead (vLLM, TGI, Ollama): a model without limits
// never refuses, its requests wait in line for one of the workers, so latency climbs with load.
//
//     weir::testing::mock_provider server(io.get_executor(), {
//         .name = "openai", .models = {{.id = "gpt-mini", .requests_per_minute = 300}},
//         .faults = {.server_errors = 0.05}});
//     server.start();  // then POST to server.base_url() + "/chat/completions"
#pragma once

#include <weir/detail/listener.hpp>
#include <weir/http/usage.hpp>

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace weir::testing {

struct mock_model {
  std::string id;
  double requests_per_minute = 600;  // with tokens_per_minute 0: no limit and no limit headers
  double tokens_per_minute = 600'000;
  std::uint64_t context_window = 0;  // prompt + max_tokens above it: 400; 0: no check
};

// A stretch of the server's life (from its start) during which it answers every request 503.
struct outage {
  std::chrono::milliseconds from{0};
  std::chrono::milliseconds to{0};
};

// Chances per request, drawn from the seeded generator, in this order.
struct fault_profile {
  double resets = 0;         // close the connection without an answer
  double stalls = 0;         // wait `stall` before answering
  double server_errors = 0;  // 500
  double overloaded = 0;     // 529 (Anthropic's "overloaded_error"; OpenAI dialect too)
  double random_429 = 0;     // a 429 the limits did not call for, with a random Retry-After:
  std::chrono::milliseconds random_429_min{1'000};  // ... from this
  std::chrono::milliseconds random_429_max{5'000};  // ... to this
  std::chrono::milliseconds stall{10'000};
  std::vector<outage> outages{};
  // For a streamed answer (a request with "stream": true), drawn when it is answered 200:
  double slow_first_tokens = 0;  // the first chunk comes `first_token_delay` late
  double stream_stalls = 0;      // half way, the stream stops for `stall`
  double stream_resets = 0;      // half way, the connection is reset
  std::chrono::milliseconds first_token_delay{3'000};
};

struct mock_provider_options {
  std::string name = "mock";
  std::vector<mock_model> models{};
  // The bucket holds this much of a minute's limit: how much may come at once.
  double burst_seconds = 10;
  std::chrono::microseconds base_latency{20'000};
  std::chrono::microseconds per_output_token{20};
  fault_profile faults{};
  std::uint64_t seed = 1;
  // 0: every request is served at once (a hosted API). Otherwise the requests answered 200 take
  // turns, first come first served, on this many workers; past `max_queue` waiting, 503.
  std::size_t workers = 0;
  std::size_t max_queue = 0;  // 0: no bound
  // A prompt cache as the providers keep one: a prompt's longest prefix, in whole blocks of
  // `prompt_cache_block` characters, that the same model was sent within this time of its last
  // use is read from the cache (reported as OpenAI's cached_tokens, Anthropic's
  // cache_read_input_tokens); the prompt's other whole blocks are written to it (Anthropic's
  // cache_creation_input_tokens). 0: no cache.
  std::chrono::milliseconds prompt_cache_ttl{0};
  std::size_t prompt_cache_block = 512;  // 128 tokens, OpenAI's increment
};

// What the server answered, by kind. Every request read ends in exactly one of: a status, a
// reset.
struct mock_stats {
  std::uint64_t requests = 0;
  std::map<unsigned, std::uint64_t> by_status{};
  std::uint64_t resets = 0;
  std::uint64_t stalls = 0;
  std::uint64_t input_tokens = 0;        // of successful answers
  std::uint64_t output_tokens = 0;       // of successful answers (a stream's: what it sent)
  std::uint64_t cache_read_tokens = 0;   // of their input, read from the prompt cache
  std::uint64_t cache_write_tokens = 0;  // ... and written to it
  // Streamed answers begun, and the faults drawn for them.
  std::uint64_t streams = 0;
  std::uint64_t slow_first_tokens = 0;
  std::uint64_t stream_stalls = 0;
  std::uint64_t stream_resets = 0;
  // With workers: requests being served, waiting for a worker now, and the most that waited.
  std::size_t serving = 0;
  std::size_t waiting = 0;
  std::size_t longest_queue = 0;
  // The x-weir-request header of every 200 answered without a stall (one the client may have
  // given up on is left out), for matching the server's view of a request to the client's.
  std::set<std::string> succeeded_requests{};
  // The traceparent header of the last `traces_kept` requests read, oldest first (empty: the
  // request had none), for tests of trace propagation.
  static constexpr std::size_t traces_kept = 64;
  std::deque<std::string> traceparents{};

  std::uint64_t status(unsigned s) const {
    auto it = by_status.find(s);
    return it == by_status.end() ? 0 : it->second;
  }
};

namespace detail::mock {

// A continuously refilled bucket, in doubles: not weir's GCRA, so the mock is an independent
// judge of whether a client keeps to the limit.
struct bucket {
  double capacity = 1;
  double per_second = 1;
  double level = 1;
  std::chrono::steady_clock::time_point at{};

  void refill(std::chrono::steady_clock::time_point now) {
    level =
        std::min(capacity, level + per_second * std::chrono::duration<double>(now - at).count());
    at = now;
  }
  double seconds_until(double n) const { return n <= level ? 0.0 : (n - level) / per_second; }
  double seconds_to_full() const { return (capacity - level) / per_second; }
};

}  // namespace detail::mock

class mock_provider {
 public:
  using clock = std::chrono::steady_clock;

  mock_provider(boost::asio::any_io_executor ex, mock_provider_options options)
      : state_(std::make_shared<state>(std::move(ex), std::move(options))) {}
  ~mock_provider() { stop(); }
  mock_provider(const mock_provider&) = delete;
  mock_provider& operator=(const mock_provider&) = delete;

  // Listens on 127.0.0.1 on a free port and returns it. Time for outages starts now.
  unsigned short start() {
    namespace ip = boost::asio::ip;
    auto& s = *state_;
    s.port = weir::detail::listen_on(s.acceptor, {ip::make_address_v4("127.0.0.1"), 0});
    s.started = clock::now();
    for (auto& [id, l] : s.buckets) l.requests.at = l.tokens.at = s.started;
    boost::asio::co_spawn(s.executor, accept(state_), boost::asio::detached);
    return s.port;
  }

  // Stops accepting and closes every open connection (on the server's strand, so it is safe
  // from any thread while the server runs).
  void stop() {
    boost::asio::post(state_->executor, [s = state_] {
      std::lock_guard lock(s->mutex);
      weir::detail::close_all(s->acceptor, s->sessions);
    });
  }

  unsigned short port() const { return state_->port; }
  // In the form the SDKs take (OPENAI_BASE_URL): the API root, "/v1" included.
  std::string base_url() const { return fmt::format("http://127.0.0.1:{}/v1", port()); }
  const mock_provider_options& options() const { return state_->options; }

  mock_stats stats() const {
    std::lock_guard lock(state_->mutex);
    return state_->stats;
  }

 private:
  using request_type = boost::beast::http::request<boost::beast::http::string_body>;
  using response_type = boost::beast::http::response<boost::beast::http::string_body>;
  using stream_type = boost::beast::tcp_stream;

  struct limits {
    detail::mock::bucket requests, tokens;
    std::uint64_t context_window = 0;
    bool unlimited = false;
  };

  // What to do with one request, decided at once under the lock; the waiting happens outside.
  struct plan {
    bool reset = false;
    bool needs_worker = false;
    std::chrono::microseconds delay{0};
    response_type response{};
    // A streamed 200: server-sent events written in batches, `per_batch` apart, after `delay`.
    std::vector<std::string> events{};
    std::chrono::microseconds per_batch{0};
    std::size_t fault_at = 0;  // events written before a stall or reset
    bool stream_stall = false, stream_reset = false;
  };

  enum class dialect { openai, anthropic };

  struct state {
    state(boost::asio::any_io_executor ex, mock_provider_options o)
        : executor(boost::asio::make_strand(ex)),
          acceptor(executor),
          options(std::move(o)),
          random(options.seed) {
      for (const auto& m : options.models) {
        const auto make = [&](double per_minute) {
          detail::mock::bucket b;
          b.per_second = per_minute / 60.0;
          b.capacity = std::max(1.0, per_minute * options.burst_seconds / 60.0);
          b.level = b.capacity;
          return b;
        };
        buckets.emplace(m.id, limits{make(std::max(m.requests_per_minute, 1.0)),
                                     make(std::max(m.tokens_per_minute, 1.0)), m.context_window,
                                     m.requests_per_minute <= 0 && m.tokens_per_minute <= 0});
      }
    }

    bool chance(double p) { return p > 0 && std::uniform_real_distribution<>(0, 1)(random) < p; }

    static void set_error(response_type& res, unsigned status, dialect d, std::string_view type,
                          std::string_view message) {
      res.result(status);
      res.body() = d == dialect::anthropic
                       ? fmt::format(R"({{"type":"error","error":{{"type":"{}","message":"{}"}}}})",
                                     type, message)
                       : fmt::format(R"({{"error":{{"message":"{}","type":"{}","code":"{}"}}}})",
                                     message, type, type);
    }

    void set_limit_headers(response_type& res, dialect d, const limits& l,
                           std::chrono::system_clock::time_point wall) const {
      // As OpenAI and Anthropic count it: the limit per minute less what was used of it, which
      // is what the bucket lacks of full (the bucket itself may hold less than a minute's
      // worth: a limit "enforced over shorter periods").
      const auto remaining = [](const detail::mock::bucket& b) {
        const double used = b.capacity - b.level;
        return static_cast<std::uint64_t>(std::max(0.0, std::floor(b.per_second * 60 - used)));
      };
      const auto per_minute = [](const detail::mock::bucket& b) {
        return static_cast<std::uint64_t>(std::llround(b.per_second * 60));
      };
      const auto ms = [](double seconds) {
        return static_cast<std::int64_t>(std::ceil(seconds * 1000));
      };
      if (d == dialect::openai) {
        res.set("x-ratelimit-limit-requests", std::to_string(per_minute(l.requests)));
        res.set("x-ratelimit-remaining-requests", std::to_string(remaining(l.requests)));
        res.set("x-ratelimit-reset-requests",
                fmt::format("{}ms", ms(l.requests.seconds_to_full())));
        res.set("x-ratelimit-limit-tokens", std::to_string(per_minute(l.tokens)));
        res.set("x-ratelimit-remaining-tokens", std::to_string(remaining(l.tokens)));
        res.set("x-ratelimit-reset-tokens", fmt::format("{}ms", ms(l.tokens.seconds_to_full())));
        return;
      }
      const auto at = [&](double seconds) {
        const auto t = std::chrono::time_point_cast<std::chrono::seconds>(
            wall + std::chrono::milliseconds(ms(seconds)) + std::chrono::seconds(1));
        return fmt::format("{:%Y-%m-%dT%H:%M:%S}Z", t);
      };
      res.set("anthropic-ratelimit-requests-limit", std::to_string(per_minute(l.requests)));
      res.set("anthropic-ratelimit-requests-remaining", std::to_string(remaining(l.requests)));
      res.set("anthropic-ratelimit-requests-reset", at(l.requests.seconds_to_full()));
      res.set("anthropic-ratelimit-tokens-limit", std::to_string(per_minute(l.tokens)));
      res.set("anthropic-ratelimit-tokens-remaining", std::to_string(remaining(l.tokens)));
      res.set("anthropic-ratelimit-tokens-reset", at(l.tokens.seconds_to_full()));
    }

    static void set_retry_after(response_type& res, dialect d, double seconds) {
      const auto whole = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(seconds)));
      res.set(boost::beast::http::field::retry_after, std::to_string(whole));
      if (d == dialect::openai)
        res.set("retry-after-ms", std::to_string(std::max<std::int64_t>(
                                      1, static_cast<std::int64_t>(std::ceil(seconds * 1000)))));
    }

    plan decide(const request_type& req) {
      namespace http = boost::beast::http;
      plan p;
      auto& res = p.response;
      res.version(req.version());
      res.keep_alive(req.keep_alive());
      res.set(http::field::content_type, "application/json");
      res.set(http::field::server, "weir-mock");

      std::lock_guard lock(mutex);
      ++stats.requests;
      if (stats.traceparents.size() == mock_stats::traces_kept) stats.traceparents.pop_front();
      const auto traceparent = req.find("traceparent");
      stats.traceparents.emplace_back(traceparent == req.end() ? std::string()
                                                               : std::string(traceparent->value()));
      const auto now = clock::now();
      const auto wall = std::chrono::system_clock::now();
      const auto since_start = now - started;
      const std::string_view target = req.target();
      const dialect d = target == "/v1/messages" ? dialect::anthropic : dialect::openai;

      const auto finish = [&](unsigned status) {
        ++stats.by_status[status];
        res.prepare_payload();
        return std::move(p);
      };
      if (req.method() != http::verb::post ||
          (target != "/v1/messages" && target != "/v1/chat/completions")) {
        set_error(res, 404, d, "not_found_error", "no such endpoint");
        return finish(404);
      }
      const auto model = weir::http::detail::json_string(req.body(), "model");
      auto found = model ? buckets.find(*model) : buckets.end();
      if (found == buckets.end()) {
        set_error(res, 404, d, "not_found_error", "no such model");
        return finish(404);
      }
      auto& l = found->second;
      const auto content = weir::http::detail::json_string(req.body(), "content").value_or("");
      const std::uint64_t input = std::max<std::uint64_t>(1, content.size() / 4);
      const std::uint64_t max_tokens = std::max<std::uint64_t>(
          1, weir::http::detail::json_number(req.body(), "max_tokens").value_or(256));

      const auto& f = options.faults;
      for (const auto& o : f.outages)
        if (since_start >= o.from && since_start < o.to) {
          set_error(res, 503, d, "api_error", "service unavailable");
          return finish(503);
        }
      if (chance(f.resets)) {
        ++stats.resets;
        p.reset = true;
        return p;
      }
      bool stalled = false;
      if (chance(f.stalls)) {
        ++stats.stalls;
        p.delay += f.stall;
        stalled = true;
      }
      if (chance(f.server_errors)) {
        set_error(res, 500, d, "api_error", "internal server error");
        return finish(500);
      }
      if (chance(f.overloaded)) {
        set_error(res, 529, d, "overloaded_error", "Overloaded");
        return finish(529);
      }
      if (chance(f.random_429)) {
        set_error(res, 429, d, "rate_limit_error", "rate limited");
        const auto ms = std::uniform_int_distribution<std::int64_t>(
            f.random_429_min.count(), std::max(f.random_429_min, f.random_429_max).count())(random);
        set_retry_after(res, d, static_cast<double>(ms) / 1000);
        return finish(429);
      }
      if (l.context_window && input + max_tokens > l.context_window) {
        set_error(res, 400, d,
                  d == dialect::openai ? "context_length_exceeded" : "invalid_request_error",
                  d == dialect::openai ? "maximum context length exceeded" : "prompt is too long");
        return finish(400);
      }

      if (options.workers > 0) {
        if (options.max_queue > 0 && stats.serving >= options.workers &&
            stats.waiting >= options.max_queue) {
          set_error(res, 503, d, "overloaded_error", "server overloaded");
          return finish(503);
        }
        p.needs_worker = true;
      }
      if (l.unlimited)
        return answer(p, req, *model, content, input, max_tokens, stalled, d, finish);

      // Like OpenAI, the request is charged its prompt plus max_tokens when it arrives.
      l.requests.refill(now);
      l.tokens.refill(now);
      const double cost = static_cast<double>(input + max_tokens);
      if (l.requests.level < 1 || l.tokens.level < cost) {
        set_limit_headers(res, d, l, wall);
        set_error(res, 429, d, "rate_limit_error",
                  l.requests.level < 1 ? "rate limit reached for requests"
                                       : "rate limit reached for tokens");
        const double wait = cost > l.tokens.capacity ? 60.0
                                                     : std::max(l.requests.seconds_until(1),
                                                                l.tokens.seconds_until(cost));
        set_retry_after(res, d, wait);
        return finish(429);
      }
      l.requests.level -= 1;
      l.tokens.level -= cost;
      set_limit_headers(res, d, l, wall);
      return answer(p, req, *model, content, input, max_tokens, stalled, d, finish);
    }

    // A 200 with the usage; the time it takes grows with the tokens written.
    template <class Finish>
    plan answer(plan& p, const request_type& req, std::string_view model, std::string_view prompt,
                std::uint64_t input, std::uint64_t max_tokens, bool stalled, dialect d,
                const Finish& finish) {
      auto& res = p.response;
      const auto output = std::uniform_int_distribution<std::uint64_t>(
          std::max<std::uint64_t>(1, max_tokens / 4), max_tokens)(random);
      const auto id = stats.requests;
      const auto cached = use_prompt_cache(model, prompt, clock::now(), input);
      stats.cache_read_tokens += cached.read;
      stats.cache_write_tokens += cached.written;
      if (req.body().find(R"("stream":true)") != std::string::npos)
        return stream(p, req, model, input, output, cached, id, d, stalled, finish);
      if (auto tag = req.find("x-weir-request"); tag != req.end() && !stalled)
        stats.succeeded_requests.emplace(tag->value());
      p.delay += options.base_latency + options.per_output_token * static_cast<long>(output);
      stats.input_tokens += input;
      stats.output_tokens += output;
      res.body() =
          d == dialect::anthropic
              ? fmt::format(R"({{"id":"msg_{}","type":"message","role":"assistant","model":"{}",)"
                            R"("content":[{{"type":"text","text":"ok"}}],"stop_reason":"end_turn",)"
                            R"("usage":{}}})",
                            id, model, usage_json(d, input, output, cached))
              : fmt::format(
                    R"({{"id":"chatcmpl-{}","object":"chat.completion","model":"{}",)"
                    R"("choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},)"
                    R"("finish_reason":"stop"}}],"usage":{}}})",
                    id, model, usage_json(d, input, output, cached));
      return finish(200);
    }

    // What the prompt cache did for one prompt, in tokens.
    struct cache_use {
      std::uint64_t read = 0;
      std::uint64_t written = 0;
    };

    // With a prompt cache: the longest prefix of whole blocks this model was sent within the TTL
    // is read, the prompt's other whole blocks are written, and every block's life starts again.
    // Blocks are told apart by a running hash (FNV-1a) of the model and the prompt up to them.
    cache_use use_prompt_cache(std::string_view model, std::string_view prompt,
                               clock::time_point now, std::uint64_t input) {
      const auto ttl = options.prompt_cache_ttl;
      const auto block = options.prompt_cache_block;
      if (ttl.count() <= 0 || block == 0) return {};
      std::uint64_t hash = 14695981039346656037ull;
      const auto mix = [&](std::string_view bytes) {
        for (const char ch : bytes)
          hash = (hash ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
      };
      mix(model);
      mix(std::string_view("\0", 1));
      std::size_t read_chars = 0, block_chars = 0;
      bool reading = true;
      for (std::size_t at = 0; at + block <= prompt.size(); at += block) {
        mix(prompt.substr(at, block));
        auto& until = prompt_cache[hash];
        reading = reading && until > now;
        if (reading) read_chars = at + block;
        until = now + ttl;
        block_chars = at + block;
      }
      if (prompt_cache.size() >= prompt_cache_sweep_at) {
        std::erase_if(prompt_cache, [&](const auto& entry) { return entry.second <= now; });
        prompt_cache_sweep_at = std::max<std::size_t>(4096, 2 * prompt_cache.size());
      }
      const auto read = std::min<std::uint64_t>(input, read_chars / 4);
      return {read, std::min<std::uint64_t>(input - read, (block_chars - read_chars) / 4)};
    }

    // The usage object of an answer in the dialect's form: Anthropic's input_tokens leave out
    // what was read from or written to the cache, OpenAI's prompt_tokens count it.
    static std::string usage_json(dialect d, std::uint64_t input, std::uint64_t output,
                                  cache_use cached) {
      if (d == dialect::anthropic)
        return fmt::format(R"({{"input_tokens":{},"cache_creation_input_tokens":{},)"
                           R"("cache_read_input_tokens":{},"output_tokens":{}}})",
                           input - cached.read - cached.written, cached.written, cached.read,
                           output);
      return fmt::format(R"({{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},)"
                         R"("prompt_tokens_details":{{"cached_tokens":{}}}}})",
                         input, output, input + output, cached.read);
    }

    // A 200 whose body is server-sent events in the dialect's form: the first chunk after the
    // base latency, then one event per output token, written in batches.
    template <class Finish>
    plan stream(plan& p, const request_type& req, std::string_view model, std::uint64_t input,
                std::uint64_t output, cache_use cached, std::uint64_t id, dialect d, bool stalled,
                const Finish& finish) {
      auto& res = p.response;
      const auto& f = options.faults;
      ++stats.streams;
      p.delay += options.base_latency;  // waited after the headers: the time to first token
      if (chance(f.slow_first_tokens)) {
        ++stats.slow_first_tokens;
        p.delay += f.first_token_delay;
      }
      p.stream_stall = chance(f.stream_stalls);
      p.stream_reset = !p.stream_stall && chance(f.stream_resets);
      stats.stream_stalls += p.stream_stall;
      stats.stream_resets += p.stream_reset;
      if (auto tag = req.find("x-weir-request");
          tag != req.end() && !stalled && !p.stream_stall && !p.stream_reset)
        stats.succeeded_requests.emplace(tag->value());
      p.per_batch = options.per_output_token * static_cast<long>(batch);
      res.set(boost::beast::http::field::content_type, "text/event-stream");
      res.set(boost::beast::http::field::cache_control, "no-cache");
      res.chunked(true);
      auto& e = p.events;
      if (d == dialect::anthropic) {
        e.push_back(fmt::format(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":"
            "\"msg_{}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"{}\","
            "\"content\":[],\"usage\":{}}}}}\n\n",
            id, model, usage_json(d, input, 1, cached)));
        e.push_back(
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,"
            "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
        e.push_back("event: ping\ndata: {\"type\": \"ping\"}\n\n");
        for (std::uint64_t t = 0; t < output; ++t)
          e.push_back(
              "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
              "\"delta\":{\"type\":\"text_delta\",\"text\":\"ok \"}}\n\n");
        e.push_back(
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n");
        e.push_back(fmt::format(
            "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":"
            "\"end_turn\"}},\"usage\":{{\"output_tokens\":{}}}}}\n\n",
            output));
        e.push_back("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
      } else {
        const auto chunk = [&](std::string_view choice, std::string_view usage) {
          return fmt::format(
              "data: {{\"id\":\"chatcmpl-{}\",\"object\":\"chat.completion.chunk\",\"model\":"
              "\"{}\",\"choices\":[{}],\"usage\":{}}}\n\n",
              id, model, choice, usage);
        };
        e.push_back(chunk(R"({"index":0,"delta":{"role":"assistant","content":""}})", "null"));
        for (std::uint64_t t = 0; t < output; ++t)
          e.push_back(chunk(R"({"index":0,"delta":{"content":"ok "}})", "null"));
        e.push_back(chunk(R"({"index":0,"delta":{},"finish_reason":"stop"})", "null"));
        if (req.body().find(R"("include_usage":true)") != std::string::npos)
          e.push_back(chunk("", usage_json(d, input, output, cached)));
        e.push_back("data: [DONE]\n\n");
      }
      // The fault comes half way through the tokens; what was sent before it is what counts.
      p.fault_at = (p.stream_stall || p.stream_reset) ? e.size() / 2 : e.size();
      const std::size_t before_tokens = d == dialect::anthropic ? 3 : 1;
      const std::uint64_t sent =
          p.stream_reset ? std::min<std::uint64_t>(
                               output, p.fault_at > before_tokens ? p.fault_at - before_tokens : 0)
                         : output;
      stats.output_tokens += sent;
      stats.input_tokens += input;
      return finish(200);
    }
    static constexpr std::size_t batch = 8;  // events per write

    // On the strand. A waiter's timer never expires by itself: the worker that frees up cancels
    // it, and the worker passes to it then.
    boost::asio::awaitable<void> take_worker() {
      boost::asio::steady_timer turn(executor, boost::asio::steady_timer::time_point::max());
      {
        std::lock_guard lock(mutex);
        if (stats.serving < options.workers) {
          ++stats.serving;
          co_return;
        }
        line.push_back(&turn);
        stats.waiting = line.size();
        stats.longest_queue = std::max(stats.longest_queue, line.size());
      }
      co_await turn.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    }
    void free_worker() {
      std::lock_guard lock(mutex);
      if (line.empty()) {
        --stats.serving;
        return;
      }
      line.front()->cancel();  // the worker goes to the first in line
      line.pop_front();
      stats.waiting = line.size();
    }

    boost::asio::strand<boost::asio::any_io_executor> executor;
    boost::asio::ip::tcp::acceptor acceptor;
    mock_provider_options options;
    mutable std::mutex mutex;
    std::mt19937_64 random;
    // The prompt cache: until when each block (by its hash) lives.
    std::unordered_map<std::uint64_t, clock::time_point> prompt_cache;
    std::size_t prompt_cache_sweep_at = 4096;
    std::map<std::string, limits, std::less<>> buckets;
    mock_stats stats;
    clock::time_point started{};
    unsigned short port = 0;
    std::vector<std::weak_ptr<stream_type>> sessions;
    std::deque<boost::asio::steady_timer*> line;  // waiting for a worker, oldest first
  };

  static boost::asio::awaitable<void> accept(std::shared_ptr<state> s) {
    for (;;) {
      auto [ec, socket] =
          co_await s->acceptor.async_accept(boost::asio::as_tuple(boost::asio::use_awaitable));
      if (ec) co_return;  // stopped
      auto stream = std::make_shared<stream_type>(std::move(socket));
      {
        std::lock_guard lock(s->mutex);
        std::erase_if(s->sessions, [](const auto& w) { return w.expired(); });
        s->sessions.push_back(stream);
      }
      boost::asio::co_spawn(s->executor, session(s, std::move(stream)), boost::asio::detached);
    }
  }

  static boost::asio::awaitable<void> session(std::shared_ptr<state> s,
                                              std::shared_ptr<stream_type> stream) {
    namespace http = boost::beast::http;
    using boost::asio::as_tuple;
    using boost::asio::use_awaitable;
    boost::beast::flat_buffer buffer;
    for (;;) {
      request_type req;
      auto [ec, n] = co_await http::async_read(*stream, buffer, req, as_tuple(use_awaitable));
      if (ec) co_return;
      auto p = s->decide(req);
      if (p.needs_worker) co_await s->take_worker();
      if (p.delay.count() > 0 && p.events.empty()) {
        boost::asio::steady_timer timer(s->executor, p.delay);
        co_await timer.async_wait(as_tuple(use_awaitable));
      }
      const auto reset = [&] {
        boost::system::error_code ignored;
        stream->socket().set_option(boost::asio::socket_base::linger(true, 0), ignored);
        stream->socket().close(ignored);  // a linger of zero makes the close a reset
      };
      if (!p.events.empty()) {
        const bool completed = co_await write_stream(s, *stream, p, reset);
        if (p.needs_worker) s->free_worker();
        if (!completed || !p.response.keep_alive()) co_return;
        continue;
      }
      if (p.needs_worker) s->free_worker();
      if (p.reset) {
        reset();
        co_return;
      }
      auto [wec, w] = co_await http::async_write(*stream, p.response, as_tuple(use_awaitable));
      if (wec || !p.response.keep_alive()) co_return;
    }
  }

  // Writes a streamed answer's events in batches; false when the connection is gone (reset by
  // the plan, or closed by the client).
  template <class Reset>
  static boost::asio::awaitable<bool> write_stream(std::shared_ptr<state> s, stream_type& stream,
                                                   plan& p, const Reset& reset) {
    namespace http = boost::beast::http;
    using boost::asio::as_tuple;
    using boost::asio::use_awaitable;
    http::response<http::empty_body> head(p.response.result(), p.response.version());
    for (const auto& field : p.response.base()) head.set(field.name_string(), field.value());
    head.chunked(true);
    http::response_serializer<http::empty_body> serializer(head);
    auto [hec, h] = co_await http::async_write_header(stream, serializer, as_tuple(use_awaitable));
    if (hec) co_return false;
    boost::asio::steady_timer timer(s->executor, p.delay);
    co_await timer.async_wait(as_tuple(use_awaitable));
    std::string batch;
    for (std::size_t i = 0; i < p.events.size();) {
      if (i == p.fault_at) {
        if (p.stream_reset) {
          reset();
          co_return false;
        }
        timer.expires_after(s->options.faults.stall);
        co_await timer.async_wait(as_tuple(use_awaitable));
      }
      batch.clear();
      const std::size_t end = std::min(
          {p.events.size(), i + state::batch, i < p.fault_at ? p.fault_at : p.events.size()});
      for (; i < end; ++i) batch += p.events[i];
      auto [wec, w] = co_await boost::asio::async_write(
          stream, http::make_chunk(boost::asio::buffer(batch)), as_tuple(use_awaitable));
      if (wec) co_return false;
      if (i < p.events.size()) {
        timer.expires_after(p.per_batch);
        co_await timer.async_wait(as_tuple(use_awaitable));
      }
    }
    auto [lec, l] =
        co_await boost::asio::async_write(stream, http::make_chunk_last(), as_tuple(use_awaitable));
    co_return !lec;
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir::testing
