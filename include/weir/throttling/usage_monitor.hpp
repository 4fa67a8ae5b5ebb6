// A sliding window of requests, tokens, errors and rate-limit hits: fixed memory, O(1) record, and
// queries that cost one pass over a fixed number of buckets however high the rate.
//
//     weir::usage_monitor<> monitor({.window = 60s, .buckets = 60,
//                                    .requests_limit = weir::per_minute(500)});
//     monitor.record({.tokens = 1200});
//     if (monitor.utilization() > 0.8) ...
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/rate.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/gcra.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

namespace weir {

struct usage_monitor_options {
  std::chrono::nanoseconds window = std::chrono::seconds(60);
  std::uint32_t buckets = 60;                  // resolution: window / buckets
  std::optional<weir::rate> requests_limit{};  // for utilization()
  std::optional<weir::rate> tokens_limit{};
  double slow_down_above = 0.8;  // utilization where pacing_delay() starts to grow
};

// One finished (or failed) call, as the monitor records it (not an event of events.hpp).
struct usage_record {
  std::uint64_t requests = 1;
  std::uint64_t tokens = 0;
  bool error = false;
  bool rate_limited = false;  // the server answered 429 (or equivalent)
};
using usage_event [[deprecated("renamed usage_record")]] = usage_record;

namespace detail {
// One call's line in a usage window, by the rule of the monitor stage and the router alike: every
// call that was sent is a request, with the tokens its limits were settled to; a failure the
// provider answered is an error (a 429 is one, counted apart as well); a call with no answer
// (cancelled, or cut short by its caller's deadline) is no error.
inline usage_record usage_record_of(bool answered, verdict judged, std::uint64_t tokens) {
  const bool failed = answered && judged != verdict::success;
  return {.requests = 1,
          .tokens = tokens,
          .error = failed,
          .rate_limited = failed && judged == verdict::rate_limited};
}
}  // namespace detail

struct usage_totals {
  std::uint64_t requests = 0;
  std::uint64_t tokens = 0;
  std::uint64_t errors = 0;
  std::uint64_t rate_limited = 0;

  friend bool operator==(const usage_totals&, const usage_totals&) = default;
};

// Counts events in the current bucket and the buckets-1 before it. Copies share the same window.
// Each counter carries its bucket's epoch in its top bits, so a bucket is reused without a reset
// step that could race with writers: a stale counter is simply seen as zero.
template <class Clock>
class usage_monitor_stage;

template <class Clock = std::chrono::steady_clock>
class usage_monitor {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;

  // Throws weir::exception(invalid_argument) for a window ≤ 0, zero buckets, a window shorter than
  // its bucket count in nanoseconds, limits ≤ 0, or a threshold outside [0, 1).
  explicit usage_monitor(usage_monitor_options options = {})
      : state_(std::make_shared<state>(options)) {}

  void record(const usage_record& e, time_point now = Clock::now()) {
    state_->record(e, detail::to_nanos(now));
  }

  usage_totals totals(time_point now = Clock::now()) const {
    return state_->totals(detail::to_nanos(now));
  }

  // Events per minute over the window.
  double requests_per_minute(time_point now = Clock::now()) const {
    return per_minute(static_cast<double>(totals(now).requests));
  }
  double tokens_per_minute(time_point now = Clock::now()) const {
    return per_minute(static_cast<double>(totals(now).tokens));
  }

  // The larger of requests and tokens used over the window against the configured limits
  // (0 when no limit is configured); 1.0 means the window used the whole quota.
  double utilization(time_point now = Clock::now()) const { return utilization_of(totals(now)); }

  // Pre-emptive slow-down: how long to wait before the next request. Zero below
  // `slow_down_above`; then growing smoothly (quadratically) to one request's interval of the
  // binding limit at full utilization; and once another request would cross a limit, exactly
  // until enough of the window has slid out for it to fit.
  std::chrono::nanoseconds pacing_delay(time_point now = Clock::now()) const {
    const auto& o = state_->options;
    const auto at = detail::to_nanos(now);
    const auto t = state_->totals(at);
    const double u = utilization_of(t);
    if (u <= o.slow_down_above) return std::chrono::nanoseconds(0);

    const double window_s = static_cast<double>(o.window.count()) / 1e9;
    const double tokens_per_request =
        t.requests ? static_cast<double>(t.tokens) / static_cast<double>(t.requests) : 0;
    detail::nanos until_room = 0;
    double interval_ns = 0;  // one request's share of the binding limit
    if (o.requests_limit) {
      const auto allowed = static_cast<std::uint64_t>(o.requests_limit->per_second * window_s);
      if (t.requests + 1 > allowed)
        until_room = state_->time_until_expired(at, 0, t.requests + 1 - allowed);
      interval_ns = 1e9 / o.requests_limit->per_second;
    }
    if (o.tokens_limit) {
      const auto allowed = static_cast<std::uint64_t>(o.tokens_limit->per_second * window_s);
      const auto next = t.tokens + static_cast<std::uint64_t>(tokens_per_request);
      if (next > allowed)
        until_room = std::max(until_room, state_->time_until_expired(at, 1, next - allowed));
      interval_ns = std::max(interval_ns, tokens_per_request * 1e9 / o.tokens_limit->per_second);
    }
    if (until_room > 0) return std::chrono::nanoseconds(until_room);
    const double f = std::min(1.0, (u - o.slow_down_above) / (1.0 - o.slow_down_above));
    return std::chrono::nanoseconds(static_cast<std::int64_t>(f * f * interval_ns));
  }

  const usage_monitor_options& options() const noexcept { return state_->options; }

  // The monitor as a pipeline stage: one record per call (per attempt, inside a retry).
  usage_monitor_stage<Clock> stage() const { return usage_monitor_stage<Clock>(*this); }

 private:
  double per_minute(double count) const {
    return count * 60e9 / static_cast<double>(state_->options.window.count());
  }

  double utilization_of(const usage_totals& t) const {
    const auto& o = state_->options;
    const double window_s = static_cast<double>(o.window.count()) / 1e9;
    double u = 0;
    if (o.requests_limit)
      u = std::max(u, static_cast<double>(t.requests) / (o.requests_limit->per_second * window_s));
    if (o.tokens_limit)
      u = std::max(u, static_cast<double>(t.tokens) / (o.tokens_limit->per_second * window_s));
    return u;
  }

  struct state {
    static constexpr int tag_bits = 24;  // a bucket idle for 2^24 bucket lengths could alias
    static constexpr int count_bits = 64 - tag_bits;
    static constexpr std::uint64_t count_mask = (std::uint64_t{1} << count_bits) - 1;

    struct bucket {
      std::atomic<std::uint64_t> counters[4] = {0, 0, 0, 0};  // requests, tokens, errors, 429s
    };

    explicit state(const usage_monitor_options& o)
        : options(o), bucket_ns(o.buckets ? o.window.count() / o.buckets : 0) {
      constexpr const char* who = "usage_monitor";
      if (o.window.count() <= 0) detail::invalid_option(who, "window", o.window, "be positive");
      if (o.buckets == 0) detail::invalid_option(who, "buckets", o.buckets, "be at least 1");
      if (bucket_ns <= 0)
        detail::invalid_option(
            who, "buckets", o.buckets,
            fmt::format("be at most the window in nanoseconds ({})", o.window.count()));
      if (o.requests_limit && !(o.requests_limit->per_second > 0))
        detail::invalid_option(who, "requests_limit", o.requests_limit->per_second,
                               "be positive (per second)");
      if (o.tokens_limit && !(o.tokens_limit->per_second > 0))
        detail::invalid_option(who, "tokens_limit", o.tokens_limit->per_second,
                               "be positive (per second)");
      if (!(o.slow_down_above >= 0 && o.slow_down_above < 1))
        detail::invalid_option(who, "slow_down_above", o.slow_down_above, "be in [0, 1)");
      // A power-of-two ring, so a slot is a mask, not a division; only the last `buckets` count.
      mask = std::bit_ceil(std::uint64_t{o.buckets}) - 1;
      ring = std::make_unique<bucket[]>(mask + 1);
    }

    static std::uint64_t tag_of(std::uint64_t epoch) {
      return (epoch & ((1u << tag_bits) - 1)) << count_bits;
    }

    // Whether tag `a` is a later epoch than tag `b`, modulo the tag width.
    static bool is_newer(std::uint64_t a, std::uint64_t b) {
      const auto diff = ((a - b) >> count_bits) & ((1u << tag_bits) - 1);
      return diff != 0 && diff < (1u << (tag_bits - 1));
    }

    void add(std::atomic<std::uint64_t>& c, std::uint64_t tag, std::uint64_t n) {
      if (n == 0) return;
      auto v = c.load(std::memory_order_relaxed);
      // Common case: the bucket is current and one fetch_add does it.
      if ((v & ~count_mask) == tag) {
        c.fetch_add(std::min(n, count_mask - (v & count_mask)), std::memory_order_relaxed);
        return;
      }
      std::uint64_t next;
      do {
        if ((v & ~count_mask) == tag) {
          next = v + std::min(n, count_mask - (v & count_mask));
        } else if (is_newer(v & ~count_mask, tag)) {
          return;  // the bucket already holds a later epoch: this event left the window
        } else {
          next = tag | std::min(n, count_mask);
        }
      } while (!c.compare_exchange_weak(v, next, std::memory_order_relaxed));
    }

    void record(const usage_record& e, detail::nanos now) {
      const auto epoch = epoch_of(now);
      auto& b = ring[epoch & mask];
      const auto tag = tag_of(epoch);
      add(b.counters[0], tag, e.requests);
      add(b.counters[1], tag, e.tokens);
      add(b.counters[2], tag, e.error ? 1 : 0);
      add(b.counters[3], tag, e.rate_limited ? 1 : 0);
    }

    usage_totals totals(detail::nanos now) const {
      const auto current = static_cast<std::uint64_t>(now / bucket_ns);
      std::uint64_t sum[4] = {0, 0, 0, 0};
      for (std::uint64_t age = 0; age < options.buckets && age <= current; ++age) {
        const auto epoch = current - age;
        const auto tag = tag_of(epoch);
        const auto& b = ring[epoch & mask];
        for (int k = 0; k < 4; ++k) {
          const auto v = b.counters[k].load(std::memory_order_relaxed);
          if ((v & ~count_mask) == tag) sum[k] += v & count_mask;
        }
      }
      return {sum[0], sum[1], sum[2], sum[3]};
    }

    // How long until at least `amount` of counter `k` has slid out of the window.
    detail::nanos time_until_expired(detail::nanos now, int k, std::uint64_t amount) const {
      const auto current = static_cast<std::uint64_t>(now / bucket_ns);
      std::uint64_t expired = 0;
      for (std::uint64_t age = options.buckets; age-- > 0;) {
        if (age > current) continue;
        const auto epoch = current - age;
        const auto v = ring[epoch & mask].counters[k].load(std::memory_order_relaxed);
        if ((v & ~count_mask) == tag_of(epoch)) expired += v & count_mask;
        if (expired >= amount)
          return static_cast<detail::nanos>(epoch + options.buckets) * bucket_ns - now;
      }
      return options.window.count();  // more than the window holds: wait a whole window
    }

    // now / bucket_ns, without the division while `now` stays in the bucket last computed: a
    // record on the hot path then costs a load and a compare.
    std::uint64_t epoch_of(detail::nanos now) {
      const auto cached = last_epoch.load(std::memory_order_relaxed);
      const auto start = static_cast<detail::nanos>(cached) * bucket_ns;
      if (now >= start && now - start < bucket_ns) return cached;
      const auto epoch = static_cast<std::uint64_t>(now / bucket_ns);
      last_epoch.store(epoch, std::memory_order_relaxed);
      return epoch;
    }

    usage_monitor_options options;
    detail::nanos bucket_ns;
    std::uint64_t mask = 0;
    std::unique_ptr<bucket[]> ring;
    std::atomic<std::uint64_t> last_epoch{0};
  };

  std::shared_ptr<state> state_;
};

// A usage_monitor in a pipeline (see stage.hpp). An attempt is recorded at its start, as a
// provider counts a request when it arrives, judged by the pipeline's classifier, by
// detail::usage_record_of's rule; a call refused on the way in was never sent and is not counted.
template <class Clock>
class usage_monitor_stage {
 public:
  explicit usage_monitor_stage(usage_monitor<Clock> monitor) : monitor_(std::move(monitor)) {}

  struct slot {};
  static constexpr bool values_succeed = true;
  static constexpr bool reads_clock = true;
  static constexpr bool reads_verdict = true;

  bool try_enter(slot&, stage_context<Clock>&) { return true; }

  template <class Outcome>
  stage_action exit(slot&, stage_context<Clock>& context, const Outcome& result) {
    if (result.refused_locally()) return {};
    const auto& call = context.call;
    bool given_up = false;  // sent, then cancelled or cut short by the call's deadline
    if constexpr (!is_plain_success<Outcome>)
      given_up = result.cancelled() || call.cut_by_deadline(result);
    const auto estimate = call.estimated_usage();
    const auto used = detail::settled_usage(
        true, call.reported_usage() ? std::optional(call.actual_usage(estimate)) : std::nullopt,
        context.judged == verdict::success || given_up, estimate);
    monitor_.record(detail::usage_record_of(!given_up, context.judged, used.tokens), context.now);
    return {};
  }

 private:
  usage_monitor<Clock> monitor_;
};

}  // namespace weir
