// A circuit breaker: stops calling a provider that keeps failing, and probes it again after a
// break.
//
//     weir::circuit_breaker<> breaker({.consecutive_failures = 5, .break_duration = 30s});
//     auto reply = co_await breaker([&] { return client.async_post(req, asio::use_awaitable); });
//
// closed ──(failures)──► open ──(break over)──► half-open ──(probes succeed)──► closed
//                          ▲                        │
//                          └────(a probe fails)─────┘
#pragma once

#include <weir/core/breaker_state.hpp>
#include <weir/core/error.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/driver.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <fmt/format.h>
#include <boost/asio/awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace weir {

// Trip on the failure rate over a sliding window instead of on consecutive failures.
struct failure_rate_window {
  double threshold = 0.5;                 // open when failures / calls ≥ this ...
  std::uint32_t minimum_throughput = 10;  // ... over at least this many calls in the window
  std::uint32_t calls = 0;                // count-based: the last `calls` calls; 0: time-based
  std::chrono::nanoseconds duration = std::chrono::seconds(60);  // time-based window
  std::uint32_t buckets = 10;                                    // time-based resolution
};

// Classifier: what judges each call's outcome (outcome.hpp); HTTP-aware ones are in weir/http.
// The router judges with its own and ignores this one.
template <class Classifier = default_classifier>
struct basic_circuit_breaker_options {
  std::uint32_t consecutive_failures = 5;  // used when failure_rate is absent
  std::optional<failure_rate_window> failure_rate{};
  // Calls slower than this count as failures even when they succeed.
  std::optional<std::chrono::nanoseconds> slow_call_threshold{};
  std::chrono::nanoseconds break_duration = std::chrono::seconds(30);
  double break_growth = 1.0;  // each re-open without a close in between multiplies the break
  std::chrono::nanoseconds max_break_duration = std::chrono::minutes(5);
  std::uint32_t half_open_permits = 1;   // probes let through while half-open
  std::uint32_t successes_to_close = 1;  // probe successes that close the breaker
  // A probe that has not answered after this long no longer holds its permit: the next call
  // probes afresh (the late answer is ignored). So a lost probe cannot hold the breaker shut.
  std::chrono::nanoseconds probe_timeout = std::chrono::minutes(2);
  // Resilience4j's maxWaitDurationInHalfOpenState: half-open longer than this without enough
  // answers, the breaker opens again. nullopt: no limit.
  std::optional<std::chrono::nanoseconds> max_wait_in_half_open{};
  // Whether a rate-limited outcome (a 429) counts as a failure. It does not by default: a server
  // that answers 429 is up and saying "later", which is the limiter's and the cooldown's
  // business; counting it would open the circuit on a busy but healthy provider and stall every
  // call for the break. The router uses the same rule.
  bool rate_limited_is_failure = false;
  std::function<void(breaker_state from, breaker_state to)> on_state_change{};
  std::string name = "circuit_breaker";  // in events (breaker_changed, rejected) and metrics
  Classifier classifier{};
};
using circuit_breaker_options = basic_circuit_breaker_options<>;

template <class Clock, class Classifier>
class circuit_breaker_stage;

// Copies share one breaker. The closed-state check is one atomic load; state changes take a mutex.
template <class Clock = std::chrono::steady_clock, class Classifier = default_classifier>
class circuit_breaker {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using options_type = basic_circuit_breaker_options<Classifier>;

  // Admission to one call: whether it may go, and which breaker generation it belongs to, so a
  // late result from before a state change cannot move the new state.
  struct ticket {
    bool admitted = false;
    bool probe = false;
    std::uint64_t generation = 0;
    std::chrono::nanoseconds retry_after{0};  // when rejected: until the breaker half-opens
    time_point started{};                     // when admitted, if slow calls are watched
  };

  // Throws weir::exception(invalid_argument) for zero thresholds, permits, or a negative break.
  explicit circuit_breaker(options_type options = {})
      : state_(std::make_shared<shared>(std::move(options))) {}

  // Runs `op` if the breaker admits it; otherwise throws weir::exception(circuit_open) (a local
  // refusal) with the time until half-open as retry_after. The outcome is judged by the
  // classifier: retryable outcomes (and slow calls; and 429s if rate_limited_is_failure) are
  // failures; fatal ones, like a 400, are not the provider's fault and count as successes. A
  // cancelled call, or one refused locally further in, is no answer: its ticket is given back.
  // The call shares the breaker's state: destroying the breaker does not end it.
  template <class Operation>
  auto operator()(Operation op) const {
    return detail::driver<Clock, default_classifier,
                          circuit_breaker_stage<Clock, Classifier>>::run_alone(stage(),
                                                                               std::move(op));
  }

  // The breaker as a pipeline stage, which is also what operator() runs.
  circuit_breaker_stage<Clock, Classifier> stage() const {
    return circuit_breaker_stage<Clock, Classifier>(*this);
  }

  // The synchronous halves of operator(), for callers that make the call themselves (and for a
  // pipeline running several policies in one coroutine): admit, call, then record the result,
  // or abandon the ticket when the call got no answer (cancelled, or never sent).
  ticket try_admit() { return state_->admit(); }
  const std::string& name() const noexcept { return state_->options.name; }
  void record(const ticket& t, bool failed) { state_->finish(t, failed); }
  void abandon(const ticket& t) { state_->abandon(t); }

  // Settles an admitted call by what it came to: the one rule every caller (the stage, the
  // router) uses. No answer — cancelled, or refused locally further in — gives the ticket back;
  // an answer is a failure when is_failure(kind) says so.
  void settle(const ticket& t, bool answered, verdict kind) {
    if (answered)
      record(t, is_failure(kind));
    else
      abandon(t);
  }
  // The same for an outcome, judged by this breaker's classifier.
  template <class T>
  void settle(const ticket& t, const outcome<T>& o) {
    const bool answered = o.reached_provider();
    settle(t, answered, answered ? state_->options.classifier(o).kind : verdict::success);
  }

  // Whether the outcome `kind` is a failure by this breaker's rules.
  bool is_failure(verdict kind) const noexcept { return state_->failure(kind); }

  const Classifier& classifier() const noexcept { return state_->options.classifier; }

  breaker_state state() const noexcept { return state_->current.load(std::memory_order_acquire); }

  // How long until the breaker lets a call through: zero when closed or half-open, the rest of
  // the break when open, nanoseconds::max() when isolated. Changes no state.
  std::chrono::nanoseconds time_until_admit(time_point now = Clock::now()) const {
    const auto s = state();
    if (s == breaker_state::closed || s == breaker_state::half_open) return {};
    if (s == breaker_state::isolated) return std::chrono::nanoseconds::max();
    std::lock_guard lock(state_->mutex);
    return std::max(std::chrono::nanoseconds::zero(),
                    std::chrono::duration_cast<std::chrono::nanoseconds>(state_->open_until - now));
  }

  // Forces the breaker open until reset(), e.g. for maintenance.
  void isolate() { state_->transition_to(breaker_state::isolated, Clock::now()); }
  // Closes the breaker and forgets every failure.
  void reset() { state_->transition_to(breaker_state::closed, Clock::now()); }

 private:
  struct shared {
    explicit shared(options_type o) : options(std::move(o)) {
      const auto invalid = [](std::string_view field, const auto& value, std::string_view rule) {
        detail::invalid_option("circuit_breaker", field, value, rule);
      };
      const auto& set = options;
      if (set.consecutive_failures == 0)
        invalid("consecutive_failures", set.consecutive_failures, "be at least 1");
      if (set.half_open_permits == 0)
        invalid("half_open_permits", set.half_open_permits, "be at least 1");
      if (set.successes_to_close == 0 || set.successes_to_close > set.half_open_permits)
        invalid("successes_to_close", set.successes_to_close,
                fmt::format("be in [1, half_open_permits = {}]", set.half_open_permits));
      if (set.break_duration.count() < 0)
        invalid("break_duration", set.break_duration, "not be negative");
      if (set.max_break_duration < set.break_duration)
        invalid("max_break_duration", set.max_break_duration,
                fmt::format("be at least break_duration = {}",
                            detail::duration_text(set.break_duration)));
      if (!(set.break_growth >= 1.0) || !std::isfinite(set.break_growth))
        invalid("break_growth", set.break_growth, "be finite and at least 1");
      if (set.probe_timeout.count() <= 0)
        invalid("probe_timeout", set.probe_timeout, "be positive");
      if (set.max_wait_in_half_open && set.max_wait_in_half_open->count() <= 0)
        invalid("max_wait_in_half_open", *set.max_wait_in_half_open, "be positive");
      if (auto& w = options.failure_rate) {
        if (!(w->threshold > 0 && w->threshold <= 1))
          invalid("failure_rate.threshold", w->threshold, "be in (0, 1]");
        if (w->minimum_throughput == 0)
          invalid("failure_rate.minimum_throughput", w->minimum_throughput, "be at least 1");
        if (w->calls > 0)
          recent.assign(w->calls, 0);
        else
          window.emplace(usage_monitor_options{.window = w->duration, .buckets = w->buckets});
      }
      next_break = options.break_duration;
    }

    // The clock is read only when the breaker is not closed.
    ticket admit() {
      if (current.load(std::memory_order_acquire) == breaker_state::closed)
        return {true,
                false,
                generation.load(std::memory_order_acquire),
                {},
                options.slow_call_threshold ? Clock::now() : time_point{}};
      const auto now = Clock::now();
      std::lock_guard lock(mutex);
      const auto s = current.load(std::memory_order_relaxed);
      if (s == breaker_state::closed)
        return {true, false, generation.load(std::memory_order_relaxed), {}, now};
      if (s == breaker_state::isolated) return {false, false, 0, std::chrono::nanoseconds::max()};
      if (s == breaker_state::open) {
        if (now < open_until) return {false, false, 0, open_until - now};
        move_to(breaker_state::half_open, now);
      }
      if (probes_issued == options.half_open_permits) {
        if (options.max_wait_in_half_open &&
            now - half_open_since >= *options.max_wait_in_half_open) {
          open(now);
          return {false, false, 0, open_until - now};
        }
        if (now - last_probe_at >= options.probe_timeout) {
          move_to(breaker_state::half_open, now);  // the probes out are forgotten
        } else {
          // Every probe is out; their results will decide. Come back after a fraction of the
          // break, or when the probes time out.
          const auto until_timeout = std::chrono::duration_cast<std::chrono::nanoseconds>(
              last_probe_at + options.probe_timeout - now);
          return {false, false, 0,
                  std::min(until_timeout,
                           std::max<std::chrono::nanoseconds>(options.break_duration / 10,
                                                              std::chrono::milliseconds(1)))};
        }
      }
      ++probes_issued;
      last_probe_at = now;
      return {true, true, generation.load(std::memory_order_relaxed), {}, now};
    }

    // An admitted call got no answer: a probe's permit goes back to the next caller.
    void abandon(const ticket& t) {
      if (!t.admitted || !t.probe) return;
      std::lock_guard lock(mutex);
      if (t.generation == generation.load(std::memory_order_relaxed) &&
          current.load(std::memory_order_relaxed) == breaker_state::half_open && probes_issued > 0)
        --probes_issued;
    }

    void record(const ticket& t, bool failed, time_point now) {
      if (!t.admitted) return;
      if (!t.probe && current.load(std::memory_order_acquire) == breaker_state::closed &&
          !options.failure_rate) {
        // A result from before a state change says nothing about the state now.
        if (t.generation != generation.load(std::memory_order_acquire)) return;
        // Consecutive-failure mode, closed: a success writes only when there is a streak to end.
        if (!failed) {
          if (consecutive.load(std::memory_order_relaxed) != 0)
            consecutive.store(0, std::memory_order_relaxed);
          return;
        }
        if (consecutive.fetch_add(1, std::memory_order_relaxed) + 1 < options.consecutive_failures)
          return;
      }
      std::lock_guard lock(mutex);
      if (t.generation != generation.load(std::memory_order_relaxed))
        return;  // from before a change
      switch (current.load(std::memory_order_relaxed)) {
        case breaker_state::closed:
          if (trips(failed, now)) open(now);
          break;
        case breaker_state::half_open:
          if (!t.probe) break;
          if (failed) {
            open(now);
          } else if (++probe_successes >= options.successes_to_close) {
            move_to(breaker_state::closed, now);
          }
          break;
        default: break;
      }
    }

    // A call admitted by `t` ended. The clock is read only when something needs it: a slow-call
    // check, a failure, a probe, or a time-based window; a plain success through a closed
    // breaker does not pay for it.
    void finish(const ticket& t, bool failed) {
      if (!failed && !t.probe && plain) {
        // The hot path: a success in consecutive-failure mode writes only to end a streak of
        // this generation.
        if (consecutive.load(std::memory_order_relaxed) != 0 &&
            t.generation == generation.load(std::memory_order_acquire))
          consecutive.store(0, std::memory_order_relaxed);
        return;
      }
      const bool timed = options.slow_call_threshold.has_value();
      const bool needs_now = timed || failed || t.probe || options.failure_rate.has_value();
      const auto now = needs_now ? Clock::now() : time_point{};
      if (timed) failed = failed || now - t.started > *options.slow_call_threshold;
      record(t, failed, now);
    }

    bool failure(verdict kind) const noexcept {
      return kind == verdict::retryable ||
             (kind == verdict::rate_limited && options.rate_limited_is_failure);
    }

    // Under mutex, closed: whether this result trips the breaker.
    bool trips(bool failed, time_point now) {
      if (!options.failure_rate)
        return failed &&
               consecutive.load(std::memory_order_relaxed) >= options.consecutive_failures;
      const auto& w = *options.failure_rate;
      std::uint64_t calls = 0, failures = 0;
      if (window) {
        window->record({.requests = 1, .error = failed}, now);
        const auto t = window->totals(now);
        calls = t.requests;
        failures = t.errors;
      } else {
        recent[recent_next] = failed ? 2 : 1;  // 0: no call yet
        recent_next = (recent_next + 1) % recent.size();
        for (auto r : recent) {
          calls += r != 0;
          failures += r == 2;
        }
      }
      return calls >= w.minimum_throughput &&
             static_cast<double>(failures) >= w.threshold * static_cast<double>(calls);
    }

    // Under mutex.
    void open(time_point now) {
      open_until = now + std::chrono::duration_cast<typename Clock::duration>(next_break);
      const double grown = static_cast<double>(next_break.count()) * options.break_growth;
      next_break = grown >= static_cast<double>(options.max_break_duration.count())
                       ? options.max_break_duration
                       : std::chrono::nanoseconds(static_cast<std::int64_t>(grown));
      move_to(breaker_state::open, now);
    }

    // Under mutex: every change starts a new generation and clears what the old state counted.
    void move_to(breaker_state to, time_point now) {
      if (to == breaker_state::half_open) half_open_since = now;
      const auto from = current.load(std::memory_order_relaxed);
      if (to == breaker_state::closed) {
        next_break = options.break_duration;
        if (window) {
          const auto fresh = window->options();
          window.emplace(fresh);
        }
        std::fill(recent.begin(), recent.end(), 0);
      }
      consecutive.store(0, std::memory_order_relaxed);
      probes_issued = probe_successes = 0;
      generation.fetch_add(1, std::memory_order_acq_rel);
      current.store(to, std::memory_order_release);
      if (from != to && options.on_state_change) options.on_state_change(from, to);
    }

    void transition_to(breaker_state to, time_point now) {
      std::lock_guard lock(mutex);
      move_to(to, now);
    }

    options_type options;
    // Consecutive-failure mode without a slow-call watch: successes need no clock and no lock.
    const bool plain = !options.failure_rate && !options.slow_call_threshold;
    std::atomic<breaker_state> current{breaker_state::closed};
    std::atomic<std::uint64_t> generation{0};
    std::atomic<std::uint32_t> consecutive{0};
    std::mutex mutex;
    time_point open_until{};
    time_point half_open_since{};
    time_point last_probe_at{};
    std::chrono::nanoseconds next_break{};
    std::uint32_t probes_issued = 0;
    std::uint32_t probe_successes = 0;
    std::optional<usage_monitor<Clock>> window;  // time-based failure rate
    std::vector<std::uint8_t> recent;            // count-based failure rate: 0 none, 1 ok, 2 failed
    std::size_t recent_next = 0;
  };

  std::shared_ptr<shared> state_;
};

template <class Classifier>
circuit_breaker(basic_circuit_breaker_options<Classifier>)
    -> circuit_breaker<std::chrono::steady_clock, Classifier>;

// A circuit_breaker in a pipeline (see stage.hpp). An open circuit refuses the call with
// circuit_open (a local refusal) and the time until half-open as retry_after.
template <class Clock, class Classifier>
class circuit_breaker_stage {
 public:
  explicit circuit_breaker_stage(circuit_breaker<Clock, Classifier> breaker)
      : breaker_(std::move(breaker)) {}

  struct slot {
    typename circuit_breaker<Clock, Classifier>::ticket ticket{};
  };
  static constexpr bool values_succeed = every_value_succeeds<Classifier>;

  std::string_view name() const noexcept { return breaker_.name(); }

  bool try_enter(slot& s, stage_context<Clock>& context) {
    s.ticket = breaker_.try_admit();
    if (s.ticket.admitted) [[likely]]
      return true;
    refuse(s, context);
  }

  template <class Outcome>
  stage_action exit(slot& s, stage_context<Clock>& context, const Outcome& result) {
    if constexpr (is_plain_success<Outcome>) {
      breaker_.record(s.ticket, false);
    } else {
      const auto before = breaker_.state();
      if (context.call.cut_by_deadline(result))
        breaker_.abandon(s.ticket);
      else
        breaker_.settle(s.ticket, result);
      if (const auto after = breaker_.state(); after != before)
        context.emit(breaker_changed{context.call.operation, before, after, name()});
    }
    s.ticket = {};
    return {};
  }

  void abandon(slot& s) {
    breaker_.abandon(s.ticket);
    s.ticket = {};
  }

 private:
  // Out of line: the admitted path stays small enough to inline into the driver.
  [[noreturn, gnu::noinline, gnu::cold]] void refuse(const slot& s,
                                                     stage_context<Clock>& context) const {
    context.emit(
        rejected{context.call.operation, rejection::circuit_open, s.ticket.retry_after, name()});
    throw weir::exception::refusal(error::circuit_open, "the provider's circuit is open",
                                   s.ticket.retry_after);
  }

  circuit_breaker<Clock, Classifier> breaker_;
};

}  // namespace weir
