// Counters and gauges for one pipeline or provider, fed by its events, readable from code and
// written in the Prometheus text exposition format.
//
//     weir::metrics openai("openai");
//     auto guarded = weir::pipeline(weir::pipeline_options{.watch = openai.observer()}, retry, limits);
//     std::string page;
//     weir::write_prometheus(page, {&openai, &anthropic});
#pragma once

#include <weir/events.hpp>

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
#include <vector>

namespace weir {

// The attempt-latency histogram's upper bounds, in seconds: from a cached answer to a long
// generation. Prometheus adds +Inf.
inline constexpr std::array<double, 14> latency_bounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                          1,     2.5,  5,     10,   30,  60,   120};

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
};

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

 private:
  struct state {
    explicit state(std::string n) : name(std::move(n)) {}

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
      add(latency_ns, static_cast<std::uint64_t>(std::max<std::int64_t>(0, latency.count())));
      const double seconds = std::chrono::duration<double>(latency).count();
      std::size_t b = 0;
      while (b < latency_bounds.size() && seconds > latency_bounds[b]) ++b;
      add(latency_buckets[b]);
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
      s.latency_seconds = static_cast<double>(get(latency_ns)) / 1e9;
      for (std::size_t b = 0; b < s.latency_buckets.size(); ++b) {
        s.latency_buckets[b] = get(latency_buckets[b]);
        s.latency_count += s.latency_buckets[b];
      }
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
      std::lock_guard lock(policies_mutex);
      s.policies = policies;
      return s;
    }

    std::string name;
    std::atomic<std::uint64_t> attempts{0}, successes{0}, failures{0}, retries{0};
    std::atomic<std::uint64_t> throttled_count{0}, throttled_ns{0}, server_rate_limited_count{0};
    std::atomic<std::uint64_t> latency_ns{0};
    std::atomic<std::uint64_t> routed{0}, fallbacks{0}, cooldowns{0}, exhaustions{0},
        fleet_losses{0};
    std::atomic<std::uint64_t> budget_alerts{0};
    std::atomic<std::uint64_t> streams_completed{0}, streams_broken{0}, streams_abandoned{0};
    std::array<std::atomic<std::uint64_t>, rejection_kinds> rejections{};
    std::array<std::atomic<std::uint64_t>, latency_bounds.size() + 1> latency_buckets{};
    std::atomic<breaker_state> breaker{breaker_state::closed};
    mutable std::mutex policies_mutex;
    std::vector<policy_metrics> policies;
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
  for (const auto& [name, s] : read) {
    std::uint64_t cumulative = 0;
    for (std::size_t b = 0; b < s.latency_buckets.size(); ++b) {
      cumulative += s.latency_buckets[b];
      const auto le = b < latency_bounds.size() ? fmt::format("{}", latency_bounds[b]) : "+Inf";
      fmt::format_to(std::back_inserter(out),
                     "weir_attempt_latency_seconds_bucket{{pipeline=\"{}\",le=\"{}\"}} {}\n", name,
                     le, cumulative);
    }
    fmt::format_to(std::back_inserter(out),
                   "weir_attempt_latency_seconds_sum{{pipeline=\"{}\"}} {}\n"
                   "weir_attempt_latency_seconds_count{{pipeline=\"{}\"}} {}\n",
                   name, s.latency_seconds, name, s.latency_count);
  }
  // Each breaker's state as a state set, one sample per state (as Resilience4j's Micrometer
  // binding exposes it): 1 for the current one, 0 for the others. A breaker appears with its
  // first change of state; a pipeline without a breaker reports none.
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
}

inline void write_prometheus(std::string& out, std::initializer_list<const metrics*> sources) {
  write_prometheus(out, std::span<const metrics* const>(sources.begin(), sources.size()));
}

}  // namespace weir
