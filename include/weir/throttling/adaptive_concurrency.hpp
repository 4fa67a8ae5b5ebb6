// A concurrency limit found from latency alone, for servers that slow down instead of refusing
// (vLLM, TGI, llama.cpp server, Ollama): too few calls in flight waste the GPU, too many only
// queue at the server. Gradient-style, as Netflix's concurrency-limits and Envoy's adaptive
// concurrency filter: the limit follows the ratio of the no-load latency to the current one,
// plus a small allowance for growth.
//
//     weir::adaptive_concurrency<> self_hosted(ex, {.initial_limit = 4, .max_limit = 256});
//     auto guarded = weir::pipeline(retry, self_hosted, timeout);
//
// Calls over the limit wait in a request_queue (priorities, deadlines, queue_full, fairness
// between tenants), whose max_concurrent the limit moves.
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/stage.hpp>
#include <weir/throttling/request_queue.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace weir {

struct adaptive_concurrency_options {
  std::size_t initial_limit = 4;
  std::size_t min_limit = 1;
  std::size_t max_limit = 256;
  std::size_t max_queued = 1'000;  // calls waiting for the limit; beyond it queue_full
  bool fair_between_tenants = false;
  double smoothing = 0.2;  // the weight of each new estimate
  // Latency samples per estimate: at least this many, and at least twice the limit.
  std::size_t min_window = 16;
  // The no-load latency is the first window's mean, measured afresh every this many windows by a
  // probe at half the limit (as BBR probes its minimum RTT), so that it follows a server that
  // became slower for good but never drifts up with the queue it is there to detect.
  std::size_t probe_every = 30;
  // How much slower than the no-load latency a window's mean may be before the limit comes down
  // (as Envoy's buffer), as a factor: 1 tolerates none; 1.2 lets a fifth of queueing pass.
  double latency_tolerance = 1.0;
  // Calls the estimate adds on top of what the latency ratio allows: how far past the knee it
  // looks (Gradient2's queue size). Small, so that the probe at half the limit stays under the
  // server's own concurrency.
  double headroom = 2;
  // Until the first window whose latency shows a queue (or the first drop), the limit doubles
  // each window, as TCP's slow start: otherwise a limit that starts far below a large server's
  // grows by only smoothing × headroom calls a window.
  bool slow_start = true;
  std::string name = "adaptive_concurrency";
};

namespace detail {

// The limit's arithmetic, apart from any queue: fed one latency (or drop) at a time.
class gradient_estimate {
 public:
  explicit gradient_estimate(const adaptive_concurrency_options& o)
      : options_(o), limit_(static_cast<double>(o.initial_limit)) {}

  // The limit in force: during a probe, half the estimate.
  double limit() const noexcept {
    return probing_ ? std::max(static_cast<double>(options_.min_limit), limit_ / 2) : limit_;
  }
  std::chrono::nanoseconds baseline() const noexcept {
    return std::chrono::nanoseconds(static_cast<std::int64_t>(baseline_));
  }

  // A call is admitted: whether it is one of the probe's (the first 2 × min_window admitted
  // under it; their mean, once every one of them has ended, is the new baseline: a probe that ended
  // at its first completions would keep the short calls and miss the long ones).
  bool admit() {
    if (!probing_ || probe_admitted_ == 2 * options_.min_window) return false;
    ++probe_admitted_;
    return true;
  }

  // A call answered in `latency` with `in_flight` calls out when it started (`probe`: as
  // admit() said). True when the limit in force changed.
  bool sample(std::chrono::nanoseconds latency, std::size_t in_flight, bool probe) {
    if (probing_) return probe && probe_ended(static_cast<double>(latency.count()));
    sum_ += static_cast<double>(latency.count());
    ++count_;
    busiest_ = std::max(busiest_, in_flight);
    if (count_ < std::max(options_.min_window, static_cast<std::size_t>(2 * limit_))) return false;
    const double mean = sum_ / static_cast<double>(count_);
    const bool app_limited = static_cast<double>(busiest_) < limit_ / 2;
    const auto busiest_at_end = busiest_;
    sum_ = 0;
    count_ = 0;
    busiest_ = 0;
    const auto before = static_cast<std::size_t>(limit());
    if (baseline_ == 0) baseline_ = mean;
    // How much faster the no-load latency is than this window's. A window of answers that took
    // no time at all (a cache, a fallback inside this stage) shows no queue: 0 / 0 would make the
    // limit NaN for good, and the queue's max_concurrent 2^63.
    const double speed = mean > 0 ? baseline_ / mean : 1.0;
    if (slow_start_) {
      if (speed >= slow_start_exit) {
        // Only a limit that was reached doubles (as TCP's congestion window validation): one
        // that was not says nothing of what the server takes.
        if (busiest_at_end >= static_cast<std::size_t>(limit_)) set(limit_ * 2);
        return after_window(before);
      }
      slow_start_ = false;  // the queue has shown: from here on the gradient steers
    }
    const double gradient = std::clamp(options_.latency_tolerance * speed, 0.5, 1.0);
    double target = limit_ * gradient + options_.headroom;
    if (app_limited) target = std::min(target, limit_);  // no growth without the load to show it
    set(limit_ * (1 - options_.smoothing) + target * options_.smoothing);
    return after_window(before);
  }

  // A probe call that ended without a latency to count (failed, cancelled, refused).
  bool probe_lost() { return probing_ && probe_ended(-1); }

  // A call that failed in a way worth retrying (a timeout, a 5xx, a reset): back off at once.
  bool drop() {
    slow_start_ = false;
    const auto before = static_cast<std::size_t>(limit());
    set(limit_ * 0.9);
    return static_cast<std::size_t>(limit()) != before;
  }

 private:
  // A window's mean at least this fraction of the baseline's speed is no queue yet: a 16-sample
  // mean of exponential service times strays by a quarter either way.
  static constexpr double slow_start_exit = 0.75;

  // Every probe_every windows a probe begins. True when the limit in force changed.
  bool after_window(std::size_t before) {
    if (++windows_ % options_.probe_every == 0) {
      probing_ = true;
      probe_admitted_ = probe_ended_ = 0;
      probe_sum_ = probe_samples_ = 0;
    }
    return static_cast<std::size_t>(limit()) != before;
  }

  // One of the probe's calls ended (a latency, or -1 for none); when the last has, the probe's
  // mean becomes the baseline and the limit returns.
  bool probe_ended(double latency) {
    if (latency >= 0) {
      probe_sum_ += latency;
      ++probe_samples_;
    }
    if (++probe_ended_ < 2 * options_.min_window) return false;
    probing_ = false;
    // Each probe's mean is noisy (a few dozen service times): the baseline moves half way to it.
    if (probe_samples_ > 0)
      baseline_ = (baseline_ + probe_sum_ / static_cast<double>(probe_samples_)) / 2;
    return true;
  }

  void set(double next) {
    limit_ = std::clamp(next, static_cast<double>(options_.min_limit),
                        static_cast<double>(options_.max_limit));
  }

  adaptive_concurrency_options options_;
  double limit_;
  bool slow_start_ = options_.slow_start;
  double sum_ = 0;
  std::size_t count_ = 0;
  std::size_t busiest_ = 0;
  double baseline_ = 0;  // ns
  std::size_t windows_ = 0;
  bool probing_ = false;
  std::size_t probe_admitted_ = 0, probe_ended_ = 0, probe_samples_ = 0;
  double probe_sum_ = 0;
};

}  // namespace detail

template <class Clock, class Executor>
class adaptive_concurrency_stage;

// Copies share one limit. Safe from any thread.
template <class Clock = std::chrono::steady_clock, class Executor = boost::asio::any_io_executor>
class adaptive_concurrency {
 public:
  using clock_type = Clock;

  // Throws weir::exception(invalid_argument) for limits that are 0 or out of order, or a
  // smoothing outside (0, 1].
  adaptive_concurrency(Executor ex, adaptive_concurrency_options options)
      : state_(std::make_shared<state>(std::move(ex), std::move(options))) {}

  std::size_t limit() const { return state_->queue.max_concurrent(); }
  std::chrono::nanoseconds baseline() const {
    std::lock_guard lock(state_->mutex);
    return state_->estimate.baseline();
  }
  std::size_t in_flight() const { return state_->queue.in_flight(); }
  std::size_t queued() const { return state_->queue.queued(); }
  const std::string& name() const noexcept { return state_->options.name; }

  // A change of the limit in force.
  struct change {
    std::size_t from = 0;
    std::size_t to = 0;
    std::chrono::nanoseconds baseline{0};
  };

  // A call was admitted: true when it is one of a probe's calls (pass it back when it ends).
  bool admitted() {
    std::lock_guard lock(state_->mutex);
    return state_->estimate.admit();
  }
  // What a call taught: its latency (from admission), or that it was dropped (a timeout, an
  // overloaded server), or nothing (cancelled, refused before it was sent). Says how the limit
  // moved, if it did.
  std::optional<change> record(std::chrono::nanoseconds latency, std::size_t in_flight_at_start,
                               bool probe = false) {
    std::lock_guard lock(state_->mutex);
    return state_->apply(state_->estimate.sample(latency, in_flight_at_start, probe));
  }
  std::optional<change> record_drop(bool probe = false) {
    std::lock_guard lock(state_->mutex);
    bool changed = state_->estimate.drop();
    if (probe) changed |= state_->estimate.probe_lost();
    return state_->apply(changed);
  }
  std::optional<change> record_nothing(bool probe) {
    if (!probe) return std::nullopt;
    std::lock_guard lock(state_->mutex);
    return state_->apply(state_->estimate.probe_lost());
  }

  adaptive_concurrency_stage<Clock, Executor> stage() const {
    return adaptive_concurrency_stage<Clock, Executor>(*this);
  }

 private:
  template <class, class>
  friend class adaptive_concurrency_stage;

  struct state {
    state(Executor ex, adaptive_concurrency_options o)
        : options(validated(std::move(o))),
          queue(std::move(ex), {.max_concurrent = options.initial_limit,
                                .max_queued = options.max_queued,
                                .fair_between_tenants = options.fair_between_tenants,
                                .name = options.name}),
          estimate(options) {}

    static adaptive_concurrency_options validated(adaptive_concurrency_options o) {
      if (o.min_limit == 0)
        detail::invalid_option(o.name, "min_limit", o.min_limit, "be at least 1");
      if (o.max_limit < o.min_limit)
        detail::invalid_option(o.name, "max_limit", o.max_limit, "be at least min_limit");
      if (o.initial_limit < o.min_limit || o.initial_limit > o.max_limit)
        detail::invalid_option(o.name, "initial_limit", o.initial_limit,
                               "be within [min_limit, max_limit]");
      if (!(o.smoothing > 0 && o.smoothing <= 1))
        detail::invalid_option(o.name, "smoothing", o.smoothing, "be in (0, 1]");
      return o;
    }

    // Under the mutex: the queue follows the estimate.
    std::optional<change> apply(bool changed) {
      if (!changed) return std::nullopt;
      const auto from = queue.max_concurrent();
      const auto to = static_cast<std::size_t>(estimate.limit());
      if (from == to) return std::nullopt;
      queue.set_max_concurrent(to);
      return change{from, to, estimate.baseline()};
    }

    const adaptive_concurrency_options options;
    basic_request_queue<Executor> queue;
    mutable std::mutex mutex;
    detail::gradient_estimate estimate;
  };

  std::shared_ptr<state> state_;
};

// The limit in a pipeline: a call waits for a slot as in a request_queue; its latency from
// admission to its end, when the server answered, teaches the limit; a failure that says the
// server is overloaded (retryable: a 503, a timeout) is a drop.
template <class Clock, class Executor>
class adaptive_concurrency_stage {
  using queue_stage = basic_request_queue_stage<Executor>;

 public:
  explicit adaptive_concurrency_stage(adaptive_concurrency<Clock, Executor> limit)
      : limit_(std::move(limit)), queue_(limit_.state_->queue.stage()) {}

  std::string_view name() const noexcept { return limit_.name(); }

  struct slot {
    typename queue_stage::slot held;
    typename Clock::time_point admitted{};
    std::size_t in_flight = 0;
    bool probe = false;
  };
  static constexpr bool reads_clock = true;
  static constexpr bool reads_verdict = true;

  bool try_enter(slot& s, stage_context<Clock>& context) {
    if (!queue_.try_enter(s.held, context)) return false;
    s.admitted = context.now;
    s.in_flight = limit_.in_flight();
    s.probe = limit_.admitted();
    return true;
  }

  boost::asio::awaitable<void> wait_enter(slot& s, stage_context<Clock>& context) {
    co_await queue_.wait_enter(s.held, context);
    s.admitted = Clock::now();
    s.in_flight = limit_.in_flight();
    s.probe = limit_.admitted();
  }

  template <class Outcome>
  stage_action exit(slot& s, stage_context<Clock>& context, const Outcome& result) {
    queue_.exit(s.held, context, result);
    std::optional<typename adaptive_concurrency<Clock, Executor>::change> moved;
    if (result.reached_provider() && context.judged == verdict::success)
      moved = limit_.record(Clock::now() - s.admitted, s.in_flight, s.probe);
    else if (result.reached_provider() && context.judged == verdict::retryable)
      moved = limit_.record_drop(s.probe);
    else
      moved = limit_.record_nothing(s.probe);
    if (moved && context.listening())
      context.emit(concurrency_changed{context.call.operation, moved->from, moved->to,
                                       moved->baseline, name()});
    return {};
  }

  void abandon(slot& s) {
    // Only a call that was admitted holds a slot (and may be a probe's).
    if (s.held.held) limit_.record_nothing(s.probe);
    queue_.abandon(s.held);
  }

 private:
  adaptive_concurrency<Clock, Executor> limit_;
  queue_stage queue_;
};

}  // namespace weir
