// The demo's world: a fleet of local mock providers, an agent workload, and two ways to run it —
// weir's router, and the naive loop that fires and sleeps on a 429. weir-demo drives it, and the
// demo test runs it in-process.
#pragma once

#include <weir/composition/pipeline.hpp>
#include <weir/failure/fallback.hpp>
#include <weir/failure/hedging.hpp>
#include <weir/failure/timeout.hpp>
#include <weir/http/beast.hpp>
#include <weir/http/client.hpp>
#include <weir/http/usage.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/mock_provider.hpp>
#include <weir/throttling/adaptive_concurrency.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/request_queue.hpp>

#include <fmt/format.h>
#include <boost/asio/redirect_error.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace demo {

namespace asio = boost::asio;
using steady = std::chrono::steady_clock;
using response = weir::http::response;
using weir::http::dialect;
using namespace std::chrono_literals;

struct model_setup {
  std::string id;
  double capability = 5;
  double input_price = 0;   // USD per million tokens
  double output_price = 0;  // USD per million tokens
  double requests_per_minute = 600;
  double tokens_per_minute = 600'000;
  std::uint64_t context_window = 0;
};

struct provider_setup {
  std::string name;
  dialect speaks = dialect::openai;
  std::vector<model_setup> models;
  weir::testing::fault_profile faults{};
  std::chrono::microseconds base_latency{40'000};
  std::chrono::microseconds per_output_token{40};
  double burst_seconds = 10;  // how much of a minute's limit the mock lets through at once
  std::string base_url{};     // empty: a local mock; otherwise a real endpoint
  std::string api_key{};      // sent as a header, never printed
  // A self-hosted server (vLLM, TGI, Ollama): no rate limits, its requests take turns on this
  // many workers (503 past max_queue waiting), so its latency climbs with load. 0: a hosted API.
  std::size_t workers = 0;
  std::size_t max_queue = 0;
  // How long a local mock keeps a prompt prefix cached after its last use (0: no cache).
  std::chrono::milliseconds prompt_cache_ttl{5min};
};

// Three providers with the limits, prices and temperaments of the real ones, scaled so that the
// default workload takes a quarter of a minute.
inline std::vector<provider_setup> default_fleet() {
  std::vector<provider_setup> fleet;
  fleet.push_back({.name = "openai",
                   .speaks = dialect::openai,
                   .models = {{"gpt-mini", 6, 0.15, 0.60, 240, 240'000, 128'000},
                              {"gpt-large", 9, 2.50, 10.00, 90, 120'000, 128'000}},
                   .faults = {.server_errors = 0.02, .slow_first_tokens = 0.03}});
  fleet.push_back({.name = "anthropic",
                   .speaks = dialect::anthropic,
                   .models = {{"claude-haiku", 7, 0.80, 4.00, 180, 200'000, 200'000},
                              {"claude-sonnet", 9, 3.00, 15.00, 90, 120'000, 200'000}},
                   .faults = {.overloaded = 0.04, .stream_stalls = 0.01}});
  // The cheapest, with the tightest limits and a stretch of outage in the middle of the run.
  fleet.push_back(
      {.name = "groq",
       .speaks = dialect::openai,
       .models = {{"llama-8b", 5, 0.05, 0.08, 180, 150'000, 8'000},
                  {"llama-70b", 7, 0.59, 0.79, 120, 150'000, 32'000}},
       .faults = {.resets = 0.02, .outages = {{5'000ms, 11'000ms}}, .stream_resets = 0.01}});
  return fleet;
}

// A self-hosted model server for --self-hosted: free, as capable as the small hosted models, with
// four workers that take 0.3 s plus 2 ms per token written (about 0.65 s a request).
inline provider_setup self_hosted_provider() {
  provider_setup p;  // assigned field by field: gcc 12 misreads the aggregate form
  p.name = "vllm";
  p.speaks = dialect::openai;
  p.models.push_back({"llama-local", 6, 0, 0, 0, 0, 32'000});
  p.base_latency = 300ms;
  p.per_output_token = 2ms;
  p.workers = 4;
  p.max_queue = 256;
  return p;
}

// Requests per second a self-hosted server can answer with every worker busy, for requests that
// write `output_tokens` on average. 0 for a hosted API.
inline double capacity_per_second(const provider_setup& p, double output_tokens) {
  const double service = std::chrono::duration<double>(p.base_latency).count() +
                         std::chrono::duration<double>(p.per_output_token).count() * output_tokens;
  return p.workers > 0 && service > 0 ? static_cast<double>(p.workers) / service : 0;
}

// The router's catalog of a fleet, every provider with `breaker`.
inline weir::routing::catalog catalog_of(const std::vector<provider_setup>& fleet,
                                         const weir::circuit_breaker_options& breaker) {
  weir::routing::catalog models;
  for (const auto& p : fleet) {
    models.add(weir::routing::provider_spec{
        .name = p.name, .breaker = breaker, .default_cooldown = std::chrono::seconds(1)});
    for (const auto& m : p.models)
      models.add(weir::routing::model_spec{.provider = p.name,
                                           .id = m.id,
                                           .input_price = m.input_price,
                                           .output_price = m.output_price,
                                           .capability = m.capability,
                                           .context_window = m.context_window,
                                           .requests_per_minute = m.requests_per_minute,
                                           .tokens_per_minute = m.tokens_per_minute});
  }
  return models;
}

// One request of the agent workload.
struct job {
  std::size_t id = 0;  // sent as x-weir-request, so a server's log can be matched to the client's
  std::string prompt;  // ~4 characters per token
  unsigned max_tokens = 256;
  double min_capability = 5;
  weir::priority priority = weir::priority::normal;
  // A turn of a conversation: its key (the router keeps a session where its cache is warm), and
  // the turn before it, whose answer it waits for. Empty / nullopt: a request on its own.
  std::string session{};
  std::optional<std::size_t> after{};

  std::uint64_t input_tokens() const { return std::max<std::uint64_t>(1, prompt.size() / 4); }
};

// Varied sizes and needs: mostly small and undemanding, some long, some needing the best model;
// half are turns of six-turn conversations (eight at a time, interleaved) that open with 600 to
// 1,000 tokens of instructions and context, each turn resending the conversation so far plus 100
// to 200 tokens, as an agent does. Every prompt begins
// with its own name, so only a conversation's own earlier turns share a prefix with it.
inline std::vector<job> make_workload(std::size_t n, std::uint64_t seed) {
  constexpr std::size_t open_conversations = 8, turns = 6;
  struct conversation {
    std::string session, prompt;
    double min_capability = 5;
    std::size_t turns = 0, last = 0;
  };
  std::vector<std::optional<conversation>> open(open_conversations);
  std::size_t conversations = 0;
  std::mt19937_64 random(seed);
  const auto tokens_from = [&](int low, int high) {
    return static_cast<std::size_t>(std::uniform_int_distribution<>(low, high)(random));
  };
  std::vector<job> jobs;
  for (std::size_t i = 0; i < n; ++i) {
    const double kind = std::uniform_real_distribution<>(0, 1)(random);
    job j;
    j.id = i;
    if (kind < 0.5) {
      auto& c = open[tokens_from(0, static_cast<int>(open_conversations) - 1)];
      if (!c) {
        c.emplace();
        c->session = fmt::format("conversation-{}", conversations++);
        c->prompt = c->session + ": ";
        c->prompt.append(tokens_from(600, 1'000) * 4, 'x');  // its instructions and context
        c->min_capability = kind < 0.35 ? 5 : 7;
      } else {
        j.after = c->last;
      }
      c->prompt.append(tokens_from(100, 200) * 4, 'x');  // the last answer and the next question
      j.prompt = c->prompt;
      j.session = c->session;
      j.min_capability = c->min_capability;
      j.max_tokens = static_cast<unsigned>(tokens_from(50, 300));
      c->last = i;
      if (++c->turns == turns) c.reset();
    } else {
      const auto tokens = kind < 0.55 ? tokens_from(4'000, 12'000) : tokens_from(100, 1'200);
      j.prompt = fmt::format("request {}: ", i);
      j.prompt.resize(std::max(j.prompt.size(), tokens * 4), 'x');
      j.max_tokens = static_cast<unsigned>(tokens_from(50, 500));
      j.min_capability = kind < 0.75 ? 5 : kind < 0.93 ? 7 : 9;
      j.priority = i % 4 == 0 ? weir::priority::batch : weir::priority::normal;
    }
    jobs.push_back(std::move(j));
  }
  return jobs;
}

// Lets a conversation's turn wait until the turn before it has ended, as its user waits for the
// answer before writing again. Jobs are taken in order, so the turn waited for has a worker
// already. Used from one io thread.
class turn_order {
 public:
  asio::awaitable<void> wait_for(std::size_t job) {
    if (ended_.contains(job)) co_return;
    const auto ex = co_await asio::this_coro::executor;
    auto& signal = waiting_[job];
    signal = std::make_unique<asio::steady_timer>(ex, asio::steady_timer::time_point::max());
    boost::system::error_code cancelled;
    co_await signal->async_wait(asio::redirect_error(asio::use_awaitable, cancelled));
    waiting_.erase(job);
  }
  void ended(std::size_t job) {
    ended_.insert(job);
    if (auto it = waiting_.find(job); it != waiting_.end()) it->second->cancel();
  }

 private:
  std::set<std::size_t> ended_;
  std::map<std::size_t, std::unique_ptr<asio::steady_timer>> waiting_;
};

// What an answer cost by the usage it reported, its cache reads and writes at the model's cache
// prices; what the same tokens cost at the full input price; and what its cache reads saved.
struct charge {
  double cost = 0;
  double at_full_price = 0;
  double saved_by_reads = 0;
};
inline charge charge_of(const weir::routing::model_spec& m, const weir::token_usage& used) {
  const double at_full_price = m.cost(used.input_tokens, used.output_tokens);
  const weir::token_usage reads_only{.input_tokens = used.input_tokens,
                                     .output_tokens = used.output_tokens,
                                     .cache_read_tokens = used.cache_read_tokens};
  return {m.cost(used), at_full_price, at_full_price - m.cost(reads_only)};
}

// What a job asks of `model`.
inline weir::http::chat_request request_of(std::string_view model, const job& j) {
  return {.model = std::string(model), .prompt = j.prompt, .max_tokens = j.max_tokens};
}

// The usage a response reports, in either dialect.
inline std::optional<weir::token_usage> usage_of(const response& res) {
  if (res.result_int() != 200) return std::nullopt;
  return weir::http::reported_usage(res.body());
}

// The mock providers of a fleet, serving on their own thread.
class mock_fleet {
 public:
  explicit mock_fleet(std::vector<provider_setup>& setups, std::uint64_t seed) {
    for (auto& p : setups) {
      if (!p.base_url.empty()) continue;
      weir::testing::mock_provider_options o{.name = p.name,
                                             .burst_seconds = p.burst_seconds,
                                             .base_latency = p.base_latency,
                                             .per_output_token = p.per_output_token,
                                             .faults = p.faults,
                                             .seed = seed + servers_.size(),
                                             .workers = p.workers,
                                             .max_queue = p.max_queue,
                                             .prompt_cache_ttl = p.prompt_cache_ttl};
      for (const auto& m : p.models)
        o.models.push_back({m.id, m.requests_per_minute, m.tokens_per_minute, m.context_window});
      servers_.push_back(
          std::make_unique<weir::testing::mock_provider>(io_.get_executor(), std::move(o)));
      servers_.back()->start();
      p.base_url = servers_.back()->base_url();
    }
    thread_ = std::thread([this] { io_.run(); });
  }
  ~mock_fleet() {
    for (auto& s : servers_) s->stop();
    work_.reset();
    thread_.join();
  }
  mock_fleet(const mock_fleet&) = delete;
  mock_fleet& operator=(const mock_fleet&) = delete;

  const weir::testing::mock_provider* find(std::string_view name) const {
    for (const auto& s : servers_)
      if (s->options().name == name) return s.get();
    return nullptr;
  }

 private:
  asio::io_context io_{1};
  asio::executor_work_guard<asio::io_context::executor_type> work_{io_.get_executor()};
  std::vector<std::unique_ptr<weir::testing::mock_provider>> servers_;
  std::thread thread_;
};

// What one run saw, from the client's side.
struct provider_tally {
  std::uint64_t sent = 0;
  std::uint64_t succeeded = 0;
  std::uint64_t rate_limited = 0;  // 429 answers
  std::uint64_t failed = 0;        // 5xx, resets, timeouts
  double cost = 0;
  std::map<int, std::uint64_t> sent_per_second;
  std::map<int, std::uint64_t> limited_per_second;
  std::vector<std::pair<double, double>> breaker_open;  // [from, to) seconds since the start
  std::vector<double> breaker_closed;                   // when it closed again
  double limit_per_second = 0;                          // the sum of its models' request limits
};

struct run_report {
  std::string mode;
  double seconds = 0;
  std::size_t requests = 0;
  std::uint64_t completed = 0;
  std::uint64_t failed = 0;
  std::uint64_t canned = 0;        // answered by the fallback's canned reply (--fallback)
  std::uint64_t rate_limited = 0;  // 429 answers seen
  std::uint64_t retries = 0;       // attempts beyond the first
  std::map<std::string, std::uint64_t> failures;  // by error message
  std::map<std::string, provider_tally> providers;
  std::map<std::size_t, unsigned> endings;  // by job id: how many times it ended (must be 1)
  std::set<std::size_t> succeeded;          // job ids reported successful
  double limit_per_second = 0;              // of the whole fleet, in the dimension that binds
  double burst_seconds = 0;  // how much of that rate the servers let through at once at the start
  std::vector<double> latencies;  // seconds, of each completed request, start to answer
  // Seconds from sending to the first chunk, of each stream the router returned (a restarted
  // job's too): what gen_ai.client.operation.time_to_first_chunk measures, waits left out.
  std::vector<double> first_tokens;
  std::vector<double> first_tokens_waited;  // of each streamed job, from its start: waits included
  std::uint64_t hedges = 0;                 // hedges started beside slow requests
  std::uint64_t streams_restarted = 0;      // streams broken after their first chunk, sent again
  // The prompt cache, over the answers that reported their usage: their input tokens, those read
  // from the cache; and what every answer would have cost at the full input price.
  std::uint64_t input_tokens = 0;
  std::uint64_t cached_input_tokens = 0;
  double cost_at_full_input_price = 0;
  double saved_by_cache_reads = 0;  // the input price less the cache's, on the tokens read

  // The latency below which a share `p` of the completed requests were answered.
  double latency_percentile(double p) const { return percentile(latencies, p); }
  // The same of the times to first token.
  double first_token_percentile(double p) const { return percentile(first_tokens, p); }
  double first_token_waited_percentile(double p) const {
    return percentile(first_tokens_waited, p);
  }

  static double percentile(const std::vector<double>& values, double p) {
    if (values.empty()) return 0;
    auto sorted = values;
    const auto at = static_cast<std::size_t>(p * static_cast<double>(sorted.size() - 1));
    std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(at),
                     sorted.end());
    return sorted[at];
  }

  double cost() const {
    double total = 0;
    for (const auto& [name, t] : providers) total += t.cost;
    return total;
  }
  // Input tokens read from the prompt cache, as a share of all input tokens.
  double cache_hit_rate() const {
    return input_tokens ? static_cast<double>(cached_input_tokens) / input_tokens : 0;
  }
  // What the cache saved against the full input price, net of what cache writes cost above it.
  double saved_by_cache() const { return cost_at_full_input_price - cost(); }
  // What cache writes cost above the input price (Anthropic's 1.25x).
  double cache_write_premium() const { return saved_by_cache_reads - saved_by_cache(); }

  // Completed requests per second.
  double goodput() const { return seconds > 0 ? completed / seconds : 0; }
  // Completed requests as a share of what the limits allowed over the run.
  double share_of_limits() const {
    const double allowed = limit_per_second * (seconds + burst_seconds);
    return allowed > 0 ? static_cast<double>(completed) / allowed : 0;
  }
};

// How a job ended: answered by a model, by the fallback's canned reply, or not at all.
enum class job_end { completed, canned, failed };

// Live counters a dashboard reads while a run goes on.
struct progress {
  std::atomic<std::uint64_t> done{0}, failed{0}, in_flight{0}, rate_limited{0}, retries{0};
};

// The thread-safe log of one run, fed by router events or the naive loop.
class recorder {
 public:
  // Starts with the limits the fleet's setup gives (0 where it gives none).
  recorder(const std::vector<provider_setup>& fleet, progress& live)
      : start_(steady::now()), live_(live) {
    for (const auto& p : fleet) {
      auto& t = report_.providers[p.name];
      for (const auto& m : p.models) t.limit_per_second += m.requests_per_minute / 60;
      report_.limit_per_second += t.limit_per_second;
      report_.burst_seconds = std::max(report_.burst_seconds, p.burst_seconds);
    }
  }

  double now() const { return std::chrono::duration<double>(steady::now() - start_).count(); }

  void sent(std::string_view provider, bool retry) {
    std::lock_guard lock(mutex_);
    auto& t = tally(provider);
    ++t.sent;
    ++t.sent_per_second[static_cast<int>(now())];
    if (retry) {
      ++report_.retries;
      ++live_.retries;
    }
  }
  // An attempt counted by sent() that its provider's own queue refused before sending.
  void not_sent(std::string_view provider) {
    std::lock_guard lock(mutex_);
    auto& t = tally(provider);
    if (t.sent > 0) --t.sent;
    for (auto it = t.sent_per_second.rbegin(); it != t.sent_per_second.rend(); ++it)
      if (it->second > 0) {
        --it->second;
        break;
      }
  }
  // An answer whose usage was reported (a 200): its cost, and what the prompt cache did for it.
  void answered(std::string_view provider, const weir::token_usage& used, const charge& c) {
    std::lock_guard lock(mutex_);
    succeeded(provider, c);
    report_.input_tokens += used.input_tokens;
    report_.cached_input_tokens += used.cache_read_tokens;
  }
  void answered(std::string_view provider, unsigned status, double cost) {
    std::lock_guard lock(mutex_);
    auto& t = tally(provider);
    if (status == 200) {
      succeeded(provider, {cost, cost, 0});
    } else if (status == 429) {
      ++t.rate_limited;
      ++report_.rate_limited;
      ++live_.rate_limited;
      ++t.limited_per_second[static_cast<int>(now())];
    } else if (status >= 500 || status == 0) {
      ++t.failed;
    }
  }
  void breaker(std::string_view provider, weir::breaker_state to) {
    std::lock_guard lock(mutex_);
    const bool open = to == weir::breaker_state::open;
    if (to == weir::breaker_state::closed) tally(provider).breaker_closed.push_back(now());
    auto& spans = tally(provider).breaker_open;
    if (open && (spans.empty() || spans.back().second >= 0)) spans.emplace_back(now(), -1.0);
    if (!open && !spans.empty() && spans.back().second < 0) spans.back().second = now();
  }
  void started(std::size_t job) {
    std::lock_guard lock(mutex_);
    began_[job] = now();
  }
  void hedged() {
    std::lock_guard lock(mutex_);
    ++report_.hedges;
  }
  void first_token(std::size_t job, std::chrono::nanoseconds after_sending, bool restarted) {
    std::lock_guard lock(mutex_);
    report_.first_tokens.push_back(std::chrono::duration<double>(after_sending).count());
    if (auto it = began_.find(job); it != began_.end() && !restarted)
      report_.first_tokens_waited.push_back(now() - it->second);
  }
  void stream_restarted() {
    std::lock_guard lock(mutex_);
    ++report_.streams_restarted;
  }
  void finished(std::size_t job, bool ok, const std::string& why = {}) {
    finished(job, ok ? job_end::completed : job_end::failed, why);
  }
  void finished(std::size_t job, job_end how, const std::string& why = {}) {
    std::lock_guard lock(mutex_);
    const bool ok = how == job_end::completed;
    if (auto it = began_.find(job); it != began_.end()) {
      if (ok) report_.latencies.push_back(now() - it->second);
      began_.erase(it);
    }
    ++report_.endings[job];
    if (ok) report_.succeeded.insert(job);
    if (ok) {
      ++report_.completed;
      ++live_.done;
    } else if (how == job_end::canned) {
      ++report_.canned;
      ++live_.done;
    } else {
      ++report_.failed;
      ++live_.failed;
      ++report_.failures[why];
    }
  }

  run_report snapshot() {
    std::lock_guard lock(mutex_);
    return report_;
  }

  run_report take(std::string mode, std::size_t requests) {
    std::lock_guard lock(mutex_);
    report_.mode = std::move(mode);
    report_.requests = requests;
    report_.seconds = now();
    for (auto& [name, t] : report_.providers)
      for (auto& span : t.breaker_open)
        if (span.second < 0) span.second = report_.seconds;
    return report_;
  }

 private:
  provider_tally& tally(std::string_view provider) {
    return report_.providers[std::string(provider)];
  }
  void succeeded(std::string_view provider, const charge& c) {
    auto& t = tally(provider);
    ++t.succeeded;
    t.cost += c.cost;
    report_.cost_at_full_input_price += c.at_full_price;
    report_.saved_by_cache_reads += c.saved_by_reads;
  }

  steady::time_point start_;
  progress& live_;
  std::mutex mutex_;
  run_report report_;
  std::map<std::size_t, double> began_;  // job id: when it started
};

struct run_options {
  std::size_t concurrency = 32;
  weir::circuit_breaker_options breaker{
      .consecutive_failures = 4, .break_duration = 2s, .break_growth = 2, .max_break_duration = 8s};
  std::optional<weir::retry_budget_options> fallback_budget{};
  std::chrono::milliseconds attempt_timeout{5'000};
  std::size_t connections_per_provider = 16;
  std::chrono::milliseconds naive_backoff{1'000};  // the naive loop's first sleep, then doubled
  bool hedge = false;  // weir: hedge a request still unanswered at the p90 of the latencies
  // weir streams the answers (server-sent events): the router acts until the first token, which
  // must come within `first_token`; a stream quiet for `idle` is broken, and sent again (at most
  // twice) by the worker, which then knows it starts over.
  bool stream = true;
  // A job the router gives up on gets a canned reply from a weir::fallback around it.
  bool fallback = false;
  std::chrono::milliseconds first_token{2'000};
  std::chrono::milliseconds idle{2'000};
  weir::observer watch{};  // weir: every event of the run too (e.g. a weir::metrics)
};

// What a status line needs of a running router.
using status_source = std::function<std::vector<weir::routing::model_status>()>;

// What a status line shows of a self-hosted server: the client's learned limit and queue.
struct concurrency_status {
  std::string provider;
  std::size_t limit = 0;
  std::size_t in_flight = 0;
  std::size_t queued = 0;
};
using concurrency_source = std::function<std::vector<concurrency_status>()>;

// A self-hosted server's capacity stands in for the rate limit it does not have.
inline void add_capacities(run_report& r, const std::vector<provider_setup>& fleet,
                           double output_tokens) {
  for (const auto& p : fleet)
    if (const double capacity = capacity_per_second(p, output_tokens); capacity > 0) {
      r.providers[p.name].limit_per_second += capacity;
      r.limit_per_second += capacity;
    }
}

// Requests per second a model's limits allow now, in the dimension that binds: its request limit,
// or its token limit over the tokens a request takes, whichever is lower. 0 when neither is
// known (yet).
inline double binding_limit(const weir::routing::model_status& m, double tokens_per_request) {
  double per_second = 0;
  if (m.requests_limit) per_second = *m.requests_limit / 60;
  if (m.tokens_limit && tokens_per_request > 0) {
    const double by_tokens = *m.tokens_limit / 60 / tokens_per_request;
    per_second = per_second > 0 ? std::min(per_second, by_tokens) : by_tokens;
  }
  return per_second;
}

// The tokens a mock writes for a request of the workload (uniformly from max_tokens / 4 to
// max_tokens), on average.
inline double mean_output_tokens(const std::vector<job>& jobs) {
  double total = 0;
  for (const auto& j : jobs) total += (std::max(1u, j.max_tokens / 4) + j.max_tokens) / 2.0;
  return jobs.empty() ? 0 : total / static_cast<double>(jobs.size());
}

// The tokens a request of the workload is charged on arrival (prompt + max_tokens), on average.
inline double mean_tokens(const std::vector<job>& jobs) {
  double total = 0;
  for (const auto& j : jobs) total += static_cast<double>(j.input_tokens() + j.max_tokens);
  return jobs.empty() ? 0 : total / static_cast<double>(jobs.size());
}

// Runs copies of a worker coroutine and calls `on_done` once, when the last one ends.
class worker_group {
 public:
  template <class MakeWorker>
  void start(asio::io_context& io, std::size_t count, MakeWorker make,
             std::function<void()> on_done) {
    left_ = count;
    on_done_ = std::move(on_done);
    for (std::size_t w = 0; w < count; ++w)
      asio::co_spawn(io, make(), [this](std::exception_ptr) {
        if (--left_ == 0) on_done_();
      });
  }

 private:
  std::atomic<std::size_t> left_{0};
  std::function<void()> on_done_;
};

// ---- weir's way ----------------------------------------------------------------------------

struct chat {
  const job* work = nullptr;
};

class weir_run {
 public:
  using router_type =
      weir::routing::router<chat, response, steady, weir::http::response_classifier>;
  using event_stream = weir::stream<weir::http::sse::event>;
  using stream_router_type =
      weir::routing::router<chat, event_stream, steady, weir::http::response_classifier>;

  weir_run(asio::io_context& io, std::vector<provider_setup> fleet, run_options options,
           progress& live)
      : io_(io),
        fleet_(std::move(fleet)),
        options_(options),
        log_(fleet_, live),
        prices_(catalog_of(fleet_, options_.breaker)) {
    auto models = prices_;
    const auto configure = [&](auto& ro) {
      ro.max_attempts = 6;
      // A conversation stays on the model whose prompt cache holds it while that has room.
      ro.strategy = weir::routing::strategies::cache_affinity<steady>();
      if (options_.fallback_budget) ro.fallback_budget.emplace(*options_.fallback_budget);
      ro.watch = [this](const weir::event& e) { observe(e); };
    };
    if (options_.stream) {
      stream_router_type::options_type ro;
      configure(ro);
      ro.context_exceeded = [](const weir::outcome<event_stream>& o) {
        try {
          if (!o.has_value()) std::rethrow_exception(o.failure());
        } catch (const weir::http::status_error& e) {
          return e.context_exceeded();
        } catch (...) {
        }
        return false;
      };
      stream_router_.emplace(io.get_executor(), std::move(models), std::move(ro));
    } else {
      router_type::options_type ro;
      configure(ro);
      ro.usage_of = [](const response& r) { return demo::usage_of(r); };
      ro.response_model_of = [](const response& r) {
        return r.result_int() == 200 ? weir::http::reported_model(r.body()) : std::string();
      };
      ro.context_exceeded = [](const weir::outcome<response>& o) {
        return o.has_value() && weir::http::context_length_exceeded(o.value());
      };
      router_.emplace(io.get_executor(), std::move(models), std::move(ro));
    }
    if (options_.hedge)
      // Half a second until twenty answers have shown what the p90 is. Its hedge_started events
      // go to the router's observer.
      hedge_.emplace(weir::hedging_options{.delay = 500ms,
                                           .delay_percentile = 0.9,
                                           .max_in_flight = 8,
                                           .budget = weir::retry_budget({.ratio = 0.1})});

    if (options_.fallback)
      canned_.emplace(
          [](const weir::outcome<served>&) { return served::canned; },
          weir::fallback_options{.name = "canned reply",
                                 .operation = "chat",
                                 .watch = [this](const weir::event& e) { observe(e); }});

    for (const auto& p : fleet_) {
      auto& conn = connections_.emplace_back(std::make_unique<connection>(
          io.get_executor(), weir::http::endpoint::parse(p.base_url), tls(), p, options_));
      if (stream_router_)
        stream_router_->connect(
            p.name, [c = conn.get()](const weir::routing::model_spec& m, const chat& request) {
              return c->send_streamed(m, *request.work);
            });
      else
        router_->connect(p.name,
                         [c = conn.get()](const weir::routing::model_spec& m, const chat& request) {
                           return c->send(m, *request.work);
                         });
    }
  }

  // Starts `concurrency` workers over `jobs` (which must outlive the run); `on_done` is called
  // once, on an io thread, when every job has ended.
  void start(const std::vector<job>& jobs, std::function<void()> on_done) {
    tokens_per_request_ = mean_tokens(jobs);
    output_tokens_ = mean_output_tokens(jobs);
    workers_.start(
        io_, options_.concurrency, [&] { return worker(jobs); }, std::move(on_done));
  }

  // The run's figures, with "what the limits allow" taken from the limits in force at its end:
  // given, reported by the servers, or discovered.
  run_report report(std::size_t requests) {
    auto r = log_.take("weir", requests);
    r.limit_per_second = 0;
    for (auto& [name, t] : r.providers) t.limit_per_second = 0;
    for (const auto& m : status()()) {
      const double allowed = binding_limit(m, tokens_per_request_);
      r.providers[std::string(m.provider)].limit_per_second += allowed;
      r.limit_per_second += allowed;
    }
    add_capacities(r, fleet_, output_tokens_);
    return r;
  }
  run_report peek() { return log_.snapshot(); }
  status_source status() {
    return [this] { return stream_router_ ? stream_router_->status() : router_->status(); };
  }
  // The learned limits of the self-hosted servers.
  concurrency_source concurrency() {
    return [this] {
      std::vector<concurrency_status> all;
      for (std::size_t i = 0; i < fleet_.size(); ++i)
        if (const auto& a = connections_[i]->adaptive)
          all.push_back({.provider = fleet_[i].name,
                         .limit = a->limit(),
                         .in_flight = a->in_flight(),
                         .queued = a->queued()});
      return all;
    };
  }

 private:
  // One provider's HTTP client, wrapped in weir: a deadline on each exchange so a stalled server
  // cannot hold a worker, and at most `connections_per_provider` exchanges at once (the rest
  // queue) — or, for a self-hosted server, as many as its latency says it can take: an adaptive
  // limit, whose short queue spills the rest over to the other providers.
  struct connection {
    connection(asio::any_io_executor ex, weir::http::endpoint where, asio::ssl::context* tls,
               const provider_setup& p, const run_options& o)
        : client(ex, p.speaks, std::move(where), p.api_key, tls),
          queue(ex, {.max_concurrent = o.connections_per_provider, .max_queued = 10'000}),
          deadline(o.attempt_timeout),
          streaming{.first_token = o.first_token, .idle = o.idle, .total = 60s} {
      if (p.workers > 0)
        adaptive.emplace(ex, weir::adaptive_concurrency_options{.max_queued = 4, .name = p.name});
    }

    asio::awaitable<response> send(const weir::routing::model_spec& m, const job& j) {
      auto exchange = [this, &m, &j] {
        weir::http::header_list request_id{{"x-weir-request", std::to_string(j.id)}};
        return client.complete(request_of(m.id, j), 2 * deadline.limit(), std::move(request_id));
      };
      if (adaptive) return weir::pipeline(*adaptive, deadline)(exchange);
      return weir::pipeline(queue, deadline)(exchange);
    }

    // The same, streamed: the deadline bounds the wait for the first token, and the queue's
    // slot is held until the stream ends.
    asio::awaitable<event_stream> send_streamed(const weir::routing::model_spec& m, const job& j) {
      auto exchange = [this, &m, &j] {
        weir::http::header_list request_id{{"x-weir-request", std::to_string(j.id)}};
        return client.stream(request_of(m.id, j), streaming, 2 * deadline.limit(),
                             std::move(request_id));
      };
      if (adaptive) return weir::pipeline(*adaptive, deadline)(exchange);
      return weir::pipeline(queue, deadline)(exchange);
    }

    weir::http::chat_client client;
    weir::request_queue queue;
    std::optional<weir::adaptive_concurrency<steady>> adaptive;
    weir::timeout<steady> deadline;
    weir::stream_options<weir::http::sse::event> streaming;
  };

  // How a job was answered: by a model, or by the fallback's canned reply.
  enum class served { by_model, canned };

  asio::awaitable<void> worker(const std::vector<job>& jobs) {
    for (;;) {
      const auto i = next_++;
      if (i >= jobs.size()) co_return;
      const auto& j = jobs[i];
      if (j.after) co_await order_.wait_for(*j.after);
      log_.started(j.id);
      try {
        // The awaitable is made before the co_await: g++ 12 can free a temporary with a
        // destructor twice when it sits inside a co_await expression.
        auto serve = [this, &j] { return stream_router_ ? stream_answer(j) : whole_answer(j); };
        auto op = canned_ ? (*canned_)(serve) : serve();
        const served how = co_await std::move(op);
        log_.finished(j.id, how == served::by_model ? job_end::completed : job_end::canned);
      } catch (const weir::http::status_error& e) {
        log_.finished(j.id, job_end::failed, fmt::format("HTTP {}", e.status()));
      } catch (const weir::exception& e) {
        log_.finished(j.id, job_end::failed, e.code().message());
      } catch (const std::exception&) {
        log_.finished(j.id, job_end::failed, "unexpected failure");
      }
      order_.ended(j.id);
    }
  }

  weir::routing::basic_route_constraints<steady> constraints_of(const job& j) const {
    return {.input_tokens = j.input_tokens(),
            .output_tokens = j.max_tokens,
            .min_capability = j.min_capability,
            .priority = j.priority,
            .deadline = steady::now() + 60s,
            .operation = "chat",
            .session = j.session};
  }

  // One job, whole: routed (hedged, with --hedge, to another provider's model) to its answer. A
  // status the router returns rather than retries (a 400) is the job's failure.
  asio::awaitable<served> whole_answer(const job& j) {
    auto op = hedge_ ? router_->route_hedged(chat{&j}, constraints_of(j), *hedge_)
                     : router_->route(chat{&j}, constraints_of(j));
    auto [res, route] = co_await std::move(op);
    const auto status = res.result_int();
    const auto* model = prices_.find_model(route.provider, route.model);
    if (const auto used = usage_of(res); used && model)
      log_.answered(route.provider, *used, charge_of(*model, *used));
    else
      log_.answered(route.provider, status, route.cost);
    if (status != 200) throw weir::http::status_error(status, {weir::verdict::fatal, {}});
    co_return served::by_model;
  }

  // One job, streamed: routed until its first token, then read to the end. A stream that breaks
  // after its first token is not retried by weir (the caller has part of an answer); this caller
  // chooses to start over, at most twice, and counts it.
  asio::awaitable<served> stream_answer(const job& j) {
    for (int restarts = 0;; ++restarts) {
      try {
        auto op = hedge_ ? stream_router_->route_hedged(chat{&j}, constraints_of(j), *hedge_)
                         : stream_router_->route(chat{&j}, constraints_of(j));
        auto [answer, route] = co_await std::move(op);
        log_.first_token(j.id, answer.report().time_to_first_token, restarts > 0);
        for (;;) {
          auto event = co_await answer.next();
          if (!event) break;
        }
        const auto tally = answer.report().tally;
        const auto* model = prices_.find_model(route.provider, route.model);
        if (tally.reported_output_tokens && model) {
          const weir::token_usage used{
              .input_tokens = tally.reported_input_tokens.value_or(j.input_tokens()),
              .output_tokens = *tally.reported_output_tokens,
              .cache_read_tokens = tally.reported_cache_read_tokens.value_or(0),
              .cache_write_tokens = tally.reported_cache_write_tokens.value_or(0)};
          log_.answered(route.provider, used, charge_of(*model, used));
        } else {
          log_.answered(route.provider, 200, route.cost);
        }
        co_return served::by_model;
      } catch (const weir::exception& e) {
        if (e.code() != weir::error::stream_broken || restarts == 2) throw;
        log_.stream_restarted();
      }
    }
  }

  void observe(const weir::event& e) {
    if (options_.watch) options_.watch(e);
    if (auto* c = std::get_if<weir::route_chosen>(&e)) {
      log_.sent(c->provider, c->attempt > 1);
    } else if (auto* f = std::get_if<weir::route_fallback>(&e)) {
      if (f->refused_locally) {  // spilled over before it was sent
        log_.not_sent(f->provider);
        return;
      }
      const unsigned status = f->cause == weir::verdict::rate_limited ? 429
                              : f->context_exceeded                   ? 400
                                                                      : 500;
      log_.answered(f->provider, status, 0);
    } else if (auto* b = std::get_if<weir::breaker_changed>(&e); b && b->from != b->to) {
      log_.breaker(b->operation, b->to);
    } else if (std::holds_alternative<weir::hedge_started>(e)) {
      log_.hedged();
    }
  }

  asio::ssl::context* tls() {
    if (!tls_) {
      tls_.emplace(asio::ssl::context::tls_client);
      tls_->set_default_verify_paths();
      tls_->set_verify_mode(asio::ssl::verify_peer);
    }
    return &*tls_;
  }

  asio::io_context& io_;
  std::vector<provider_setup> fleet_;
  run_options options_;
  recorder log_;
  weir::routing::catalog prices_;  // the fleet's models, with their cache prices filled in
  turn_order order_;
  std::optional<asio::ssl::context> tls_;
  std::vector<std::unique_ptr<connection>> connections_;
  std::optional<router_type> router_;
  std::optional<weir::hedging<steady>> hedge_;
  using canned_reply = weir::fallback<served (*)(const weir::outcome<served>&)>;
  std::optional<canned_reply> canned_;
  std::optional<stream_router_type> stream_router_;
  std::atomic<std::size_t> next_{0};
  double tokens_per_request_ = 0;
  double output_tokens_ = 0;
  worker_group workers_;
};

// ---- the naive way --------------------------------------------------------------------------

// What the article's sketch does: the cheapest model that is capable (and, to be fair, whose
// context fits), fire, and on a 429 or a failure sleep 1 s, 2 s, 4 s ... and try the same model
// again, ignoring what the server said; five retries, then give up.
class naive_run {
 public:
  naive_run(asio::io_context& io, std::vector<provider_setup> fleet, run_options options,
            progress& live)
      : io_(io),
        fleet_(std::move(fleet)),
        options_(options),
        log_(fleet_, live),
        prices_(catalog_of(fleet_, options_.breaker)) {
    for (const auto& p : fleet_)
      clients_.emplace_back(io.get_executor(), p.speaks, weir::http::endpoint::parse(p.base_url),
                            p.api_key);
  }

  void start(const std::vector<job>& jobs, std::function<void()> on_done) {
    tokens_per_request_ = mean_tokens(jobs);
    output_tokens_ = mean_output_tokens(jobs);
    workers_.start(
        io_, options_.concurrency, [&] { return worker(jobs); }, std::move(on_done));
  }

  // "What the limits allow" from the fleet's own limits, in the dimension that binds, as for weir.
  run_report report(std::size_t requests) {
    auto r = log_.take("naive", requests);
    r.limit_per_second = 0;
    for (const auto& p : fleet_) {
      auto& t = r.providers[p.name];
      t.limit_per_second = 0;
      for (const auto& m : p.models) {
        weir::routing::model_status given;
        given.requests_limit = m.requests_per_minute;
        given.tokens_limit = m.tokens_per_minute;
        t.limit_per_second += binding_limit(given, tokens_per_request_);
      }
      r.limit_per_second += t.limit_per_second;
    }
    add_capacities(r, fleet_, output_tokens_);
    return r;
  }
  run_report peek() { return log_.snapshot(); }

 private:
  struct choice {
    std::size_t provider = 0;
    const model_setup* model = nullptr;
  };

  std::optional<choice> cheapest(const job& j) const {
    std::optional<choice> best;
    for (std::size_t p = 0; p < fleet_.size(); ++p)
      for (const auto& m : fleet_[p].models) {
        if (m.capability < j.min_capability) continue;
        if (m.context_window && j.input_tokens() + j.max_tokens > m.context_window) continue;
        if (!best || m.input_price < best->model->input_price) best = choice{p, &m};
      }
    return best;
  }

  asio::awaitable<void> worker(const std::vector<job>& jobs) {
    asio::steady_timer sleep(co_await asio::this_coro::executor);
    for (;;) {
      const auto i = next_++;
      if (i >= jobs.size()) co_return;
      const auto& j = jobs[i];
      if (j.after) co_await order_.wait_for(*j.after);
      log_.started(j.id);
      const auto target = cheapest(j);
      if (!target) {
        log_.finished(j.id, false, "no capable model");
        order_.ended(j.id);
        continue;
      }
      const auto& p = fleet_[target->provider];
      bool ok = false;
      for (int attempt = 0; attempt < 6 && !ok; ++attempt) {
        if (attempt > 0) {
          sleep.expires_after(options_.naive_backoff * (1 << (attempt - 1)));
          co_await sleep.async_wait(asio::use_awaitable);
        }
        log_.sent(p.name, attempt > 0);
        unsigned status = 0;
        try {
          const auto request = request_of(target->model->id, j);
          auto res =
              co_await clients_[target->provider].complete(request, options_.attempt_timeout);
          status = res.result_int();
          const auto* model = prices_.find_model(p.name, target->model->id);
          if (const auto used = usage_of(res); used && model)
            log_.answered(p.name, *used, charge_of(*model, *used));
          else
            log_.answered(p.name, status, 0);
        } catch (const std::exception&) {
          log_.answered(p.name, 0, 0);
        }
        ok = status == 200;
        if (status >= 400 && status < 500 && status != 429) break;  // hopeless
      }
      log_.finished(j.id, ok, ok ? "" : "gave up after retries");
      order_.ended(j.id);
    }
  }

  asio::io_context& io_;
  std::vector<provider_setup> fleet_;
  run_options options_;
  recorder log_;
  weir::routing::catalog prices_;  // the fleet's models, with their cache prices filled in
  turn_order order_;
  std::deque<weir::http::chat_client> clients_;
  std::atomic<std::size_t> next_{0};
  double tokens_per_request_ = 0;
  double output_tokens_ = 0;
  worker_group workers_;
};

}  // namespace demo
