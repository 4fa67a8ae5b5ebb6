// Counters and gauges for one pipeline or provider, fed by its events, readable from code and
// written in the Prometheus text exposition format.
//
//     weir::metrics openai("openai");
//     auto guarded = weir::pipeline(weir::pipeline_options{.watch = openai.observer()}, retry, limits);
//     std::string page;
//     weir::write_prometheus(page, {&openai, &anthropic});
#pragma once

#include <weir/core/events.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weir {

// The attempt-latency histogram's upper bounds, in seconds: from a cached answer to a long
// generation. Prometheus adds +Inf.
inline constexpr std::array<double, 14> latency_bounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                          1,     2.5,  5,     10,   30,  60,   120};

// The bucket bounds OpenTelemetry's GenAI semantic conventions recommend: for
// gen_ai.client.operation.duration and .time_to_first_chunk, in seconds, doubling from 10 ms to
// 81.92 s; for gen_ai.client.token.usage, powers of 4 from 1 to 67 108 864 tokens.
inline constexpr std::array<double, 14> gen_ai_duration_bounds = {
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92};
inline constexpr std::array<double, 14> gen_ai_token_bounds = {
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864};

// A histogram read: observations per bucket (not cumulative; the last is above every bound),
// their sum and count.
template <std::size_t Bounds>
struct histogram_counts {
  std::array<std::uint64_t, Bounds + 1> buckets{};
  double sum = 0;
  std::uint64_t count = 0;
};

// The GenAI client metrics of one label set: the router's calls to one model (with one response
// model and one error.type), as the events model_call_ended tell them.
struct gen_ai_series {
  std::string operation;       // gen_ai.operation.name
  std::string provider;        // gen_ai.provider.name
  std::string request_model;   // gen_ai.request.model
  std::string response_model;  // gen_ai.response.model; empty: not known
  std::string error_type;      // error.type; empty: the calls succeeded
  histogram_counts<gen_ai_duration_bounds.size()> duration{};             // seconds
  histogram_counts<gen_ai_duration_bounds.size()> time_to_first_chunk{};  // seconds, streams
  histogram_counts<gen_ai_token_bounds.size()> input_tokens{};
  histogram_counts<gen_ai_token_bounds.size()> output_tokens{};
  std::uint64_t cache_read_tokens = 0;      // of the input tokens, read from the prompt cache
  std::uint64_t cache_creation_tokens = 0;  // and written to it
};

// What one named policy did (see the `name` of each policy's options).
struct policy_metrics {
  std::string name;
  std::uint64_t throttled = 0;  // calls it held
  double throttled_seconds = 0;
  std::array<std::uint64_t, rejection_kinds> rejections{};  // calls it refused, by rejection
  std::optional<breaker_state> breaker{};          // a breaker's state, from its last change
  std::optional<std::size_t> concurrency_limit{};  // an adaptive limit, from its last change
  std::uint64_t fallbacks_used = 0;                // failures a fallback replaced
  std::uint64_t hedges = 0;                        // hedges a hedging policy started
};

struct metrics_snapshot {
  std::uint64_t attempts = 0;
  std::uint64_t successes = 0;
  std::uint64_t failures = 0;
  std::uint64_t retries = 0;
  std::uint64_t throttled = 0;
  double throttled_seconds = 0;
  std::array<std::uint64_t, rejection_kinds> rejections{};  // by weir::rejection
  std::uint64_t server_rate_limited = 0;
  double latency_seconds = 0;  // sum over finished attempts (successes + failures)
  std::uint64_t latency_count = 0;
  // Finished attempts per latency bucket (not cumulative): latency_bounds, then one above all.
  std::array<std::uint64_t, latency_bounds.size() + 1> latency_buckets{};
  breaker_state breaker = breaker_state::closed;  // after the last change of any breaker
  std::uint64_t routed = 0;                       // router attempts sent to a model
  std::uint64_t fallbacks = 0;      // router attempts that failed over to another candidate
  std::uint64_t cooldowns = 0;      // providers the router cooled down on the server's word
  std::uint64_t exhaustions = 0;    // models the router took out: a quota or the credit was spent
  std::uint64_t fleet_losses = 0;   // times the router lost its fleet (routed on local state)
  std::uint64_t budget_alerts = 0;  // spend budget thresholds crossed
  std::uint64_t streams_completed = 0;   // streams that reached their last chunk
  std::uint64_t streams_broken = 0;      // streams that failed after their first chunk
  std::uint64_t streams_abandoned = 0;   // streams the caller stopped reading
  std::vector<policy_metrics> policies;  // by the name in each event, in order of first event
  // By label set, in order of first event. Token usage and time to first chunk are recorded in
  // the series without error.type, as the conventions give them no such attribute.
  std::vector<gen_ai_series> gen_ai;
  std::uint64_t gen_ai_dropped = 0;  // calls not recorded: metrics::max_gen_ai_series were full
};

namespace detail {
// A histogram of relaxed atomic counters: safe to observe from any thread.
template <std::size_t Bounds>
struct atomic_histogram {
  // Counts `value` in its bucket (the first bound it does not pass) and adds `units` to the sum.
  void observe(double value, std::uint64_t units, const std::array<double, Bounds>& bounds) {
    std::size_t b = 0;
    while (b < Bounds && value > bounds[b]) ++b;
    buckets[b].fetch_add(1, std::memory_order_relaxed);
    sum_units.fetch_add(units, std::memory_order_relaxed);
  }
  // The sum is read as sum_units * unit (1e-9 for nanoseconds as seconds).
  histogram_counts<Bounds> read(double unit) const {
    histogram_counts<Bounds> h;
    for (std::size_t b = 0; b < h.buckets.size(); ++b) {
      h.buckets[b] = buckets[b].load(std::memory_order_relaxed);
      h.count += h.buckets[b];
    }
    h.sum = static_cast<double>(sum_units.load(std::memory_order_relaxed)) * unit;
    return h;
  }

  std::array<std::atomic<std::uint64_t>, Bounds + 1> buckets{};
  std::atomic<std::uint64_t> sum_units{0};
};

inline std::uint64_t nanoseconds_of(std::chrono::nanoseconds d) {
  return static_cast<std::uint64_t>(std::max<std::int64_t>(0, d.count()));
}
inline double seconds_of(std::chrono::nanoseconds d) {
  return std::chrono::duration<double>(d).count();
}
}  // namespace detail

// Copies share the counters. Recording is a few relaxed atomic adds: safe from any thread.
class metrics {
 public:
  explicit metrics(std::string name) : state_(std::make_shared<state>(std::move(name))) {}

  // The observer to attach to a pipeline (or to fan_out with others).
  weir::observer observer() const {
    return [s = state_](const event& e) { s->record(e); };
  }

  metrics_snapshot read() const { return state_->read(); }
  const std::string& name() const noexcept { return state_->name; }

  // The GenAI label sets one registry keeps; the catalog's models bound them, this bounds a
  // catalog gone wild (calls with a new label set past it are counted as dropped).
  static constexpr std::size_t max_gen_ai_series = 1024;

 private:
  // One label set's GenAI series. A list that only grows: recording finds its series without a
  // lock; a new label set is added under one.
  struct gen_ai_entry {
    gen_ai_entry(const model_call_ended& e, std::string_view error)
        : operation(e.gen_ai_operation),
          provider(e.gen_ai_provider),
          request_model(e.model),
          response_model(e.response_model),
          error_type(error) {}

    bool is(const model_call_ended& e, std::string_view error) const {
      return error_type == error && request_model == e.model && provider == e.gen_ai_provider &&
             response_model == e.response_model && operation == e.gen_ai_operation;
    }

    const std::string operation, provider, request_model, response_model, error_type;
    detail::atomic_histogram<gen_ai_duration_bounds.size()> duration, first_chunk;
    detail::atomic_histogram<gen_ai_token_bounds.size()> input, output;
    std::atomic<std::uint64_t> cache_read{0}, cache_creation{0};
    gen_ai_entry* next = nullptr;
  };

  struct state {
    explicit state(std::string n) : name(std::move(n)) {}
    ~state() {
      for (auto* e = gen_ai_head.load(std::memory_order_acquire); e;)
        delete std::exchange(e, e->next);
    }
    state(const state&) = delete;
    state& operator=(const state&) = delete;

    static void add(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) {
      c.fetch_add(n, std::memory_order_relaxed);
    }

    void record(const event& e) {
      std::visit(
          [&](const auto& v) {
            using T = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<T, attempt_started>) {
              add(attempts);
            } else if constexpr (std::is_same_v<T, attempt_succeeded>) {
              add(successes);
              observe_latency(v.latency);
            } else if constexpr (std::is_same_v<T, attempt_failed>) {
              add(failures);
              observe_latency(v.latency);
            } else if constexpr (std::is_same_v<T, retry_scheduled>) {
              add(retries);
            } else if constexpr (std::is_same_v<T, throttled>) {
              add(throttled_count);
              add(throttled_ns, static_cast<std::uint64_t>(v.wait.count()));
              by_policy(v.policy, [&](policy_metrics& p) {
                ++p.throttled;
                p.throttled_seconds += std::chrono::duration<double>(v.wait).count();
              });
            } else if constexpr (std::is_same_v<T, rejected>) {
              add(rejections[static_cast<std::size_t>(v.reason)]);
              by_policy(v.policy, [&](policy_metrics& p) {
                ++p.rejections[static_cast<std::size_t>(v.reason)];
              });
            } else if constexpr (std::is_same_v<T, weir::server_rate_limited>) {
              add(server_rate_limited_count);
            } else if constexpr (std::is_same_v<T, breaker_changed>) {
              breaker.store(v.to, std::memory_order_relaxed);
              by_policy(v.policy, [&](policy_metrics& p) { p.breaker = v.to; });
            } else if constexpr (std::is_same_v<T, route_chosen>) {
              add(routed);
            } else if constexpr (std::is_same_v<T, route_fallback>) {
              add(fallbacks);
            } else if constexpr (std::is_same_v<T, budget_alert>) {
              add(budget_alerts);
            } else if constexpr (std::is_same_v<T, concurrency_changed>) {
              by_policy(v.policy, [&](policy_metrics& p) { p.concurrency_limit = v.to; });
            } else if constexpr (std::is_same_v<T, fallback_used>) {
              by_policy(v.policy, [&](policy_metrics& p) { ++p.fallbacks_used; });
            } else if constexpr (std::is_same_v<T, stream_ended>) {
              add(v.how == stream_end::completed ? streams_completed
                  : v.how == stream_end::broken  ? streams_broken
                                                 : streams_abandoned);
            } else if constexpr (std::is_same_v<T, hedge_started>) {
              by_policy(v.policy, [&](policy_metrics& p) { ++p.hedges; });
            } else if constexpr (std::is_same_v<T, provider_exhausted>) {
              add(exhaustions);
            } else if constexpr (std::is_same_v<T, fleet_connection>) {
              add(fleet_losses, v.reachable ? 0 : 1);
            } else if constexpr (std::is_same_v<T, model_call_ended>) {
              record_gen_ai(v);
            } else {
              static_assert(std::is_same_v<T, provider_cooling>);
              add(cooldowns);
            }
          },
          e);
    }

    // The events of waiting and refusing calls, and breaker changes, are counted per policy
    // under a mutex: they are not on any call's fast path.
    template <class F>
    void by_policy(std::string_view name, F&& f) {
      if (name.empty()) return;
      std::lock_guard lock(policies_mutex);
      auto it = std::find_if(policies.begin(), policies.end(),
                             [&](const policy_metrics& p) { return p.name == name; });
      if (it == policies.end()) it = policies.insert(policies.end(), {.name = std::string(name)});
      f(*it);
    }

    void observe_latency(std::chrono::nanoseconds latency) {
      latency_histogram.observe(detail::seconds_of(latency), detail::nanoseconds_of(latency),
                                latency_bounds);
    }

    void record_gen_ai(const model_call_ended& e) {
      auto* call = gen_ai_series_of(e, e.error_type);
      if (!call) return;
      call->duration.observe(detail::seconds_of(e.duration), detail::nanoseconds_of(e.duration),
                             gen_ai_duration_bounds);
      if (!e.time_to_first_chunk && !e.input_tokens && !e.output_tokens) return;
      auto* answer = e.error_type.empty() ? call : gen_ai_series_of(e, {});
      if (!answer) return;
      if (e.time_to_first_chunk)
        answer->first_chunk.observe(detail::seconds_of(*e.time_to_first_chunk),
                                    detail::nanoseconds_of(*e.time_to_first_chunk),
                                    gen_ai_duration_bounds);
      if (e.input_tokens) {
        answer->input.observe(static_cast<double>(*e.input_tokens), *e.input_tokens,
                              gen_ai_token_bounds);
        add(answer->cache_read, e.cache_read_tokens);
        add(answer->cache_creation, e.cache_creation_tokens);
      }
      if (e.output_tokens)
        answer->output.observe(static_cast<double>(*e.output_tokens), *e.output_tokens,
                               gen_ai_token_bounds);
    }

    // The series of this label set, added if new; nullptr (counted) when the table is full.
    gen_ai_entry* gen_ai_series_of(const model_call_ended& e, std::string_view error) {
      const auto find = [&](gen_ai_entry* from) -> gen_ai_entry* {
        for (auto* p = from; p; p = p->next)
          if (p->is(e, error)) return p;
        return nullptr;
      };
      auto* head = gen_ai_head.load(std::memory_order_acquire);
      if (auto* found = find(head)) return found;
      std::lock_guard lock(gen_ai_mutex);
      head = gen_ai_head.load(std::memory_order_acquire);
      if (auto* found = find(head)) return found;
      if (gen_ai_count == max_gen_ai_series) {
        add(gen_ai_dropped);
        return nullptr;
      }
      auto* added = new gen_ai_entry(e, error);
      added->next = head;
      ++gen_ai_count;
      gen_ai_head.store(added, std::memory_order_release);
      return added;
    }

    metrics_snapshot read() const {
      auto get = [](const std::atomic<std::uint64_t>& c) {
        return c.load(std::memory_order_relaxed);
      };
      metrics_snapshot s;
      s.attempts = get(attempts);
      s.successes = get(successes);
      s.failures = get(failures);
      s.retries = get(retries);
      s.throttled = get(throttled_count);
      s.throttled_seconds = static_cast<double>(get(throttled_ns)) / 1e9;
      for (std::size_t i = 0; i < s.rejections.size(); ++i) s.rejections[i] = get(rejections[i]);
      s.server_rate_limited = get(server_rate_limited_count);
      const auto latency = latency_histogram.read(1e-9);
      s.latency_seconds = latency.sum;
      s.latency_buckets = latency.buckets;
      s.latency_count = latency.count;
      s.breaker = breaker.load(std::memory_order_relaxed);
      s.routed = get(routed);
      s.fallbacks = get(fallbacks);
      s.cooldowns = get(cooldowns);
      s.exhaustions = get(exhaustions);
      s.fleet_losses = get(fleet_losses);
      s.budget_alerts = get(budget_alerts);
      s.streams_completed = get(streams_completed);
      s.streams_broken = get(streams_broken);
      s.streams_abandoned = get(streams_abandoned);
      for (auto* e = gen_ai_head.load(std::memory_order_acquire); e; e = e->next)
        s.gen_ai.push_back({.operation = e->operation,
                            .provider = e->provider,
                            .request_model = e->request_model,
                            .response_model = e->response_model,
                            .error_type = e->error_type,
                            .duration = e->duration.read(1e-9),
                            .time_to_first_chunk = e->first_chunk.read(1e-9),
                            .input_tokens = e->input.read(1),
                            .output_tokens = e->output.read(1),
                            .cache_read_tokens = get(e->cache_read),
                            .cache_creation_tokens = get(e->cache_creation)});
      std::reverse(s.gen_ai.begin(), s.gen_ai.end());  // the list holds the newest first
      s.gen_ai_dropped = get(gen_ai_dropped);
      std::lock_guard lock(policies_mutex);
      s.policies = policies;
      return s;
    }

    std::string name;
    std::atomic<std::uint64_t> attempts{0}, successes{0}, failures{0}, retries{0};
    std::atomic<std::uint64_t> throttled_count{0}, throttled_ns{0}, server_rate_limited_count{0};
    std::atomic<std::uint64_t> routed{0}, fallbacks{0}, cooldowns{0}, exhaustions{0},
        fleet_losses{0};
    std::atomic<std::uint64_t> budget_alerts{0};
    std::atomic<std::uint64_t> streams_completed{0}, streams_broken{0}, streams_abandoned{0};
    std::array<std::atomic<std::uint64_t>, rejection_kinds> rejections{};
    detail::atomic_histogram<latency_bounds.size()> latency_histogram;
    std::atomic<breaker_state> breaker{breaker_state::closed};
    mutable std::mutex policies_mutex;
    std::vector<policy_metrics> policies;
    std::atomic<gen_ai_entry*> gen_ai_head{nullptr};
    std::mutex gen_ai_mutex;  // held to add a label set
    std::size_t gen_ai_count = 0;
    std::atomic<std::uint64_t> gen_ai_dropped{0};
  };

  std::shared_ptr<state> state_;
};

namespace detail {
// A label value in the exposition format: backslash, double quote and newline escaped.
inline std::string prometheus_label(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

// One histogram's samples: cumulative `_bucket`s (le="+Inf" last), `_sum` and `_count`, each
// labelled with `labels` (`a="x",b="y"`, escaped).
template <std::size_t Bounds>
void write_histogram(std::string& out, std::string_view name, std::string_view labels,
                     const std::array<double, Bounds>& bounds, const histogram_counts<Bounds>& h) {
  std::uint64_t cumulative = 0;
  for (std::size_t b = 0; b < h.buckets.size(); ++b) {
    cumulative += h.buckets[b];
    const auto le = b < Bounds ? fmt::format("{}", bounds[b]) : "+Inf";
    fmt::format_to(std::back_inserter(out), "{}_bucket{{{},le=\"{}\"}} {}\n", name, labels, le,
                   cumulative);
  }
  fmt::format_to(std::back_inserter(out), "{}_sum{{{}}} {}\n{}_count{{{}}} {}\n", name, labels,
                 h.sum, name, labels, h.count);
}

// The GenAI series' labels: the conventions' attributes, dots turned into underscores.
inline std::string gen_ai_labels(std::string_view pipeline, const gen_ai_series& g) {
  auto labels = fmt::format(
      "pipeline=\"{}\",gen_ai_operation_name=\"{}\",gen_ai_provider_name=\"{}\","
      "gen_ai_request_model=\"{}\"",
      pipeline, prometheus_label(g.operation), prometheus_label(g.provider),
      prometheus_label(g.request_model));
  if (!g.response_model.empty())
    labels += fmt::format(",gen_ai_response_model=\"{}\"", prometheus_label(g.response_model));
  if (!g.error_type.empty())
    labels += fmt::format(",error_type=\"{}\"", prometheus_label(g.error_type));
  return labels;
}

// The OpenTelemetry GenAI client metrics, named as OpenTelemetry maps them to Prometheus (dots
// to underscores, the unit `s` as `_seconds`, the annotation `{token}` dropped).
inline void write_gen_ai(std::string& out,
                         std::span<const std::pair<std::string, metrics_snapshot>> read) {
  struct timing {
    const char* name;
    const char* help;
    histogram_counts<gen_ai_duration_bounds.size()> gen_ai_series::*counts;
  };
  static constexpr timing timings[] = {
      {"gen_ai_client_operation_duration_seconds", "GenAI operation duration.",
       &gen_ai_series::duration},
      {"gen_ai_client_operation_time_to_first_chunk_seconds",
       "Time to receive the first chunk of a streamed answer, from when the request was sent.",
       &gen_ai_series::time_to_first_chunk},
  };
  for (const auto& t : timings) {
    fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} histogram\n", t.name, t.help,
                   t.name);
    for (const auto& [name, s] : read)
      for (const auto& g : s.gen_ai)
        if ((g.*t.counts).count > 0)
          write_histogram(out, t.name, gen_ai_labels(name, g), gen_ai_duration_bounds, g.*t.counts);
  }
  out +=
      "# HELP gen_ai_client_token_usage Number of input and output tokens used.\n"
      "# TYPE gen_ai_client_token_usage histogram\n";
  for (const auto& [name, s] : read)
    for (const auto& g : s.gen_ai)
      for (const auto& [type, h] :
           {std::pair{"input", &g.input_tokens}, std::pair{"output", &g.output_tokens}})
        if (h->count > 0)
          write_histogram(out, "gen_ai_client_token_usage",
                          fmt::format("{},gen_ai_token_type=\"{}\"", gen_ai_labels(name, g), type),
                          gen_ai_token_bounds, *h);
  out +=
      "# HELP weir_gen_ai_cached_input_tokens_total Input tokens read from (read) or written to "
      "(creation) the provider's prompt cache; gen_ai_client_token_usage's input counts them.\n"
      "# TYPE weir_gen_ai_cached_input_tokens_total counter\n";
  for (const auto& [name, s] : read)
    for (const auto& g : s.gen_ai)
      if (g.input_tokens.count > 0)
        for (const auto& [cache, n] : {std::pair{"read", g.cache_read_tokens},
                                       std::pair{"creation", g.cache_creation_tokens}})
          fmt::format_to(std::back_inserter(out),
                         "weir_gen_ai_cached_input_tokens_total{{{},gen_ai_token_cache=\"{}\"}} "
                         "{}\n",
                         gen_ai_labels(name, g), cache, n);
}
}  // namespace detail

// Appends every family of `sources` to `out` in the Prometheus text format (version 0.0.4), one
// HELP and TYPE line per family and one sample per source, labelled pipeline="<name>".
inline void write_prometheus(std::string& out, std::span<const metrics* const> sources) {
  struct family {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const metrics_snapshot&);
  };
  static constexpr family families[] = {
      {"weir_attempts_total", "counter", "Attempts started.",
       [](const metrics_snapshot& s) { return double(s.attempts); }},
      {"weir_successes_total", "counter", "Attempts that succeeded.",
       [](const metrics_snapshot& s) { return double(s.successes); }},
      {"weir_failures_total", "counter", "Attempts that failed.",
       [](const metrics_snapshot& s) { return double(s.failures); }},
      {"weir_retries_total", "counter", "Retries scheduled.",
       [](const metrics_snapshot& s) { return double(s.retries); }},
      {"weir_throttled_total", "counter", "Calls held by a limiter or the queue.",
       [](const metrics_snapshot& s) { return double(s.throttled); }},
      {"weir_throttled_seconds_total", "counter",
       "Time calls spent held by a limiter or the queue.",
       [](const metrics_snapshot& s) { return s.throttled_seconds; }},
      {"weir_server_rate_limited_total", "counter", "Attempts the server refused as rate limited.",
       [](const metrics_snapshot& s) { return double(s.server_rate_limited); }},
      {"weir_routed_total", "counter", "Router attempts sent to a model.",
       [](const metrics_snapshot& s) { return double(s.routed); }},
      {"weir_fallbacks_total", "counter", "Router attempts that failed over to another model.",
       [](const metrics_snapshot& s) { return double(s.fallbacks); }},
      {"weir_cooldowns_total", "counter", "Provider cooldowns ordered by a server.",
       [](const metrics_snapshot& s) { return double(s.cooldowns); }},
      {"weir_exhausted_total", "counter",
       "Models taken out of routes because a quota or the account's credit was spent.",
       [](const metrics_snapshot& s) { return double(s.exhaustions); }},
      {"weir_fleet_losses_total", "counter", "Times the router lost its fleet's shared state.",
       [](const metrics_snapshot& s) { return double(s.fleet_losses); }},
      {"weir_budget_alerts_total", "counter", "Spend budget thresholds crossed.",
       [](const metrics_snapshot& s) { return double(s.budget_alerts); }},
      {"weir_streams_completed_total", "counter", "Streams that reached their last chunk.",
       [](const metrics_snapshot& s) { return double(s.streams_completed); }},
      {"weir_streams_broken_total", "counter", "Streams that failed after their first chunk.",
       [](const metrics_snapshot& s) { return double(s.streams_broken); }},
      {"weir_streams_abandoned_total", "counter", "Streams the caller stopped reading.",
       [](const metrics_snapshot& s) { return double(s.streams_abandoned); }},
      {"weir_gen_ai_dropped_total", "counter",
       "Router calls left out of the GenAI series: their table of label sets was full.",
       [](const metrics_snapshot& s) { return double(s.gen_ai_dropped); }},
  };
  constexpr const char* reasons[] = {"queue_full",   "circuit_open", "budget_exhausted",
                                     "rate_limited", "shut_down",    "evicted",
                                     "over_budget"};
  static_assert(std::size(reasons) == rejection_kinds);
  std::vector<std::pair<std::string, metrics_snapshot>> read;
  for (const auto* m : sources) read.emplace_back(detail::prometheus_label(m->name()), m->read());

  for (const auto& f : families) {
    fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", f.name, f.help, f.name,
                   f.type);
    for (const auto& [name, s] : read)
      fmt::format_to(std::back_inserter(out), "{}{{pipeline=\"{}\"}} {}\n", f.name, name,
                     f.value(s));
  }
  // Latency as a histogram, so that quantiles can be queried (histogram_quantile).
  out +=
      "# HELP weir_attempt_latency_seconds Latency of finished attempts.\n"
      "# TYPE weir_attempt_latency_seconds histogram\n";
  for (const auto& [name, s] : read)
    detail::write_histogram(
        out, "weir_attempt_latency_seconds", fmt::format("pipeline=\"{}\"", name), latency_bounds,
        histogram_counts<latency_bounds.size()>{
            .buckets = s.latency_buckets, .sum = s.latency_seconds, .count = s.latency_count});
  // Each breaker's state as a state set, one sample per state (as Resilience4j's Micrometer
  // binding exposes it): 1 for the current one, 0 for the others. A breaker appears with its
  // first report: a router's when the router is built, a pipeline's at its first change; a
  // pipeline without a breaker reports none.
  out +=
      "# HELP weir_breaker_state Circuit breaker state: 1 for the current one.\n"
      "# TYPE weir_breaker_state gauge\n";
  constexpr const char* states[] = {"closed", "open", "half_open", "isolated"};
  for (const auto& [name, s] : read)
    for (const auto& p : s.policies)
      if (p.breaker)
        for (std::size_t i = 0; i < std::size(states); ++i)
          fmt::format_to(std::back_inserter(out),
                         "weir_breaker_state{{pipeline=\"{}\",breaker=\"{}\",state=\"{}\"}} {}\n",
                         name, detail::prometheus_label(p.name), states[i],
                         static_cast<std::size_t>(*p.breaker) == i ? 1 : 0);
  // Each adaptive concurrency limit, from its last change.
  out +=
      "# HELP weir_concurrency_limit An adaptive concurrency limit in force.\n"
      "# TYPE weir_concurrency_limit gauge\n";
  for (const auto& [name, s] : read)
    for (const auto& p : s.policies)
      if (p.concurrency_limit)
        fmt::format_to(std::back_inserter(out),
                       "weir_concurrency_limit{{pipeline=\"{}\",policy=\"{}\"}} {}\n", name,
                       detail::prometheus_label(p.name), *p.concurrency_limit);
  // What each named policy held and refused.
  out +=
      "# HELP weir_policy_throttled_total Calls a limiter or queue held, by policy.\n"
      "# TYPE weir_policy_throttled_total counter\n";
  for (const auto& [name, s] : read)
    for (const auto& p : s.policies)
      fmt::format_to(std::back_inserter(out),
                     "weir_policy_throttled_total{{pipeline=\"{}\",policy=\"{}\"}} {}\n", name,
                     detail::prometheus_label(p.name), p.throttled);
  out +=
      "# HELP weir_policy_throttled_seconds_total Time a limiter or queue held calls, by policy.\n"
      "# TYPE weir_policy_throttled_seconds_total counter\n";
  for (const auto& [name, s] : read)
    for (const auto& p : s.policies)
      fmt::format_to(std::back_inserter(out),
                     "weir_policy_throttled_seconds_total{{pipeline=\"{}\",policy=\"{}\"}} {}\n",
                     name, detail::prometheus_label(p.name), p.throttled_seconds);
  out +=
      "# HELP weir_policy_fallbacks_total Failures a fallback replaced, by policy.\n"
      "# TYPE weir_policy_fallbacks_total counter\n";
  for (const auto& [name, s] : read)
    for (const auto& p : s.policies)
      if (p.fallbacks_used > 0)
        fmt::format_to(std::back_inserter(out),
                       "weir_policy_fallbacks_total{{pipeline=\"{}\",policy=\"{}\"}} {}\n", name,
                       detail::prometheus_label(p.name), p.fallbacks_used);
  out +=
      "# HELP weir_policy_hedges_total Hedges started beside slow calls, by policy.\n"
      "# TYPE weir_policy_hedges_total counter\n";
  for (const auto& [name, s] : read)
    for (const auto& p : s.policies)
      if (p.hedges > 0)
        fmt::format_to(std::back_inserter(out),
                       "weir_policy_hedges_total{{pipeline=\"{}\",policy=\"{}\"}} {}\n", name,
                       detail::prometheus_label(p.name), p.hedges);
  out +=
      "# HELP weir_policy_rejections_total Calls refused without being tried, by policy.\n"
      "# TYPE weir_policy_rejections_total counter\n";
  for (const auto& [name, s] : read)
    for (const auto& p : s.policies)
      for (std::size_t r = 0; r < p.rejections.size(); ++r)
        fmt::format_to(
            std::back_inserter(out),
            "weir_policy_rejections_total{{pipeline=\"{}\",policy=\"{}\",reason=\"{}\"}} {}\n",
            name, detail::prometheus_label(p.name), reasons[r], p.rejections[r]);
  out +=
      "# HELP weir_rejections_total Calls refused without being tried.\n"
      "# TYPE weir_rejections_total counter\n";
  for (const auto& [name, s] : read)
    for (std::size_t r = 0; r < s.rejections.size(); ++r)
      fmt::format_to(std::back_inserter(out),
                     "weir_rejections_total{{pipeline=\"{}\",reason=\"{}\"}} {}\n", name,
                     reasons[r], s.rejections[r]);
  detail::write_gen_ai(out, read);
}

inline void write_prometheus(std::string& out, std::initializer_list<const metrics*> sources) {
  write_prometheus(out, std::span<const metrics* const>(sources.begin(), sources.size()));
}

}  // namespace weir
