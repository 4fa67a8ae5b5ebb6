// Several limits at once — requests/min and tokens/min, and separate input/output token limits
// as Anthropic has — reserved together or not at all.
//
//     weir::rate_limits<> limits(ex, {.requests = weir::limit::per_minute(500),
//                                     .tokens = weir::limit::per_minute(30'000)});
//     weir::usage estimate{.requests = 1, .tokens = 1200};
//     co_await limits.async_acquire(estimate, asio::use_awaitable);
//     auto reply = co_await call();
//     limits.settle(estimate, {.requests = 1, .tokens = reply.usage.total});  // refund or charge
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/rate.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/detail/limiter_stage.hpp>
#include <weir/detail/pending_acquire.hpp>
#include <weir/detail/shutdown.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace weir {

// One limit: a sustained rate and how much of it may be used at once.
struct limit {
  weir::rate rate{};
  std::uint64_t burst = 1;

  // n per minute, one at a time: a strict server refuses any burst (nginx's limit_req with no
  // burst answers 429 to the second of two requests 1 ms apart), and a client that is busy sends
  // at the rate whatever its burst. Give a burst explicitly where the server allows one.
  static limit per_minute(double n) { return {weir::per_minute(n), 1}; }
  static limit per_minute(double n, std::uint64_t burst) { return {weir::per_minute(n), burst}; }
};

// Absent limits are not enforced.
struct rate_limits_options {
  std::optional<limit> requests{};
  std::optional<limit> tokens{};
  std::optional<limit> input_tokens{};
  std::optional<limit> output_tokens{};
  std::string name = "rate_limits";  // in events (throttled, rejected), metrics and refusals
};

enum class dimension : std::size_t { requests, tokens, input_tokens, output_tokens };

// What set_limit does with the part of a burst already spent that the new limit's burst cannot
// hold (a smaller burst, or the same one at a faster rate).
enum class spent_burst {
  owed,      // paid back at the new rate before anything more goes, as a debt is
  forgiven,  // the limit is as spent as its new burst allows, no more: the server's own bucket,
             // which the old burst stood for, was at most empty
};

// Copies share the same limits. Every operation takes one short mutex: the dimensions must move
// together, which one atomic cannot do. The executor type gives async_acquire its default
// completion token, as token_bucket's does.
template <class Clock = std::chrono::steady_clock, class Executor = boost::asio::any_io_executor>
class rate_limits {
 public:
  static constexpr std::size_t dims = 4;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using executor_type = Executor;
  using acquire_signature = void(error_code, std::chrono::nanoseconds);
  using cost_type = usage;
  static const usage& cost_of(const usage& u) noexcept { return u; }

  // Throws weir::exception(invalid_argument) for a limit with rate ≤ 0 or burst 0.
  rate_limits(executor_type ex, rate_limits_options options)
      : executor_(ex),
        state_(std::make_shared<shared_state>(std::move(ex), std::move(options.name))) {
    state_->waiters.attach(state_);
    detail::track_shutdown(state_->executor, state_);
    const std::optional<limit>* given[dims] = {&options.requests, &options.tokens,
                                               &options.input_tokens, &options.output_tokens};
    for (std::size_t d = 0; d < dims; ++d)
      if (*given[d]) state_->configure(d, **given[d]);
  }

  // Takes `cost` on every dimension if all have room now; otherwise takes nothing.
  bool try_acquire(const usage& cost, time_point now = Clock::now()) {
    return state_->try_acquire(cost, detail::to_nanos(now));
  }

  // How long until `cost` fits on every dimension.
  std::chrono::nanoseconds time_until(const usage& cost, time_point now = Clock::now()) const {
    return std::chrono::nanoseconds(state_->time_until(cost, detail::to_nanos(now)));
  }

  // Waits until `cost` fits on every dimension and takes it, in FIFO order. A cost above a
  // dimension's burst waits until that dimension is empty and then takes it all at once (the
  // limiter goes into debt). A cost so large it would overflow throws invalid_argument here,
  // before starting, with the dimension and the number.
  //
  // Completion signature: void(error_code ec, std::chrono::nanoseconds waited)
  //   ec empty          `cost` is taken on every dimension; `waited` is how long it took
  //   rate_limited      the wait would exceed max_wait; nothing is taken, and `waited` is the
  //                     wait that was refused
  //   operation_aborted cancelled
  // Per-operation cancellation: terminal, partial and total alike complete the wait at once
  // with operation_aborted and give every dimension back to the waiters behind it.
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(
      const usage& cost, std::chrono::nanoseconds max_wait,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    state_->validate(cost);
    return boost::asio::async_initiate<CompletionToken, acquire_signature>(
        initiate_async_acquire{state_}, token, cost, max_wait);
  }

  // The same with no limit on the wait.
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(
      const usage& cost,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_acquire(cost, std::chrono::nanoseconds::max(),
                         std::forward<CompletionToken>(token));
  }

  // The coroutine form, for `co_await limits.acquire(cost)`: no suspension when every dimension
  // has room now; otherwise it waits as async_acquire does. Returns the wait.
  boost::asio::awaitable<std::chrono::nanoseconds> acquire(
      usage cost, std::chrono::nanoseconds max_wait = std::chrono::nanoseconds::max()) {
    return detail::acquire_now_or_wait(this, cost, max_wait);
  }

  // After the response: charges what was used beyond the estimate and refunds what was not, so
  // estimates never drift the budget. Refunds go to waiters first. `spent_at` is when the call
  // was let through: its units were spent then, and a charge counts from there, so a limit idle
  // since has refilled meanwhile, as the server's has (a pipeline's limits stage passes it).
  void settle(const usage& estimated, const usage& actual, time_point spent_at = Clock::now()) {
    state_->settle(estimated, actual, detail::to_nanos(spent_at));
  }

  // Returns `units` of dimension `d` taken for a call sent at `sent` that the server did not
  // count (a gateway in front of its limit failed it), if nothing was let through since: the
  // next waiter may go at once, though not before `now` nor into a pause (pause_until), and what
  // follows is paced from it.
  // Had anything gone since, the next waiter would come too soon after it for a strict limit,
  // which counts the gap between two requests: nothing is given back then. Returns whether the
  // next call may go sooner than before.
  bool give_back(dimension d, std::uint64_t units, time_point sent, time_point now = Clock::now()) {
    return state_->give_back(static_cast<std::size_t>(d), units, detail::to_nanos(sent),
                             detail::to_nanos(now));
  }

  // Re-sizes one dimension at run time, or enables it if it was absent. The next unit is due one
  // *new* interval after the last, so slowing down takes effect with the very next request.
  void set_limit(dimension d, limit l, time_point now = Clock::now(),
                 spent_burst spent = spent_burst::owed) {
    std::lock_guard lock(state_->mutex);
    state_->reconfigure(static_cast<std::size_t>(d), l, detail::to_nanos(now), spent);
  }

  std::optional<limit> get_limit(dimension d) const {
    std::lock_guard lock(state_->mutex);
    return state_->limits[static_cast<std::size_t>(d)];
  }

  // Holds a dimension empty until `until` (the server said it has nothing left before then),
  // for the waiters already queued too; cancelling one later does not shorten the pause.
  void pause_until(dimension d, time_point until) {
    state_->pause_until(static_cast<std::size_t>(d), detail::to_nanos(until));
  }

  const executor_type& get_executor() const noexcept { return executor_; }

  // The same limits with another executor type (copies share the state): what Asio's
  // as_default_on makes, e.g. `asio::use_awaitable.as_default_on(x)`, whose operations then
  // default to that completion token.
  template <class Executor1>
  struct rebind_executor {
    using other = rate_limits<Clock, Executor1>;
  };
  template <class Executor1>
  requires(!std::is_same_v<Executor1, Executor> &&
           std::is_constructible_v<
               Executor,
               const Executor1&>) explicit rate_limits(const rate_limits<Clock, Executor1>& other)
      : executor_(other.executor_), state_(other.state_) {}

  // The limits as a pipeline stage: each call (attempt, inside a retry) takes the context's
  // estimate, settled against ctx.actual_* when the call sets them.
  detail::limiter_stage<rate_limits> stage() const { return {*this}; }
  const std::string& name() const noexcept { return state_->name; }

 private:
  template <class, class>
  friend class rate_limits;
  struct state;
  // One state type whatever the executor type, so that rebound copies share it: it keeps the
  // executor as an any_io_executor, the limits the type its user named.
  using shared_state = typename rate_limits<Clock, boost::asio::any_io_executor>::state;

  // The initiation object of async_acquire, named as Asio names its own.
  struct initiate_async_acquire {
    std::shared_ptr<shared_state> s;
    template <class Handler>
    void operator()(Handler&& handler, const usage& cost, std::chrono::nanoseconds max_wait) const {
      s->initiate_acquire(s, std::forward<Handler>(handler), cost, max_wait);
    }
  };

  struct state final : detail::shutdown_hook {
    using executor_type = boost::asio::any_io_executor;
    using reservation_type = detail::reservation<dims>;
    using waiter_type = detail::waiter<reservation_type>;

    state(executor_type ex, std::string n)
        : executor(std::move(ex)), waiters(executor, mutex), name(std::move(n)) {}

    static std::array<std::uint64_t, dims> units(const usage& u) {
      return {u.requests, u.tokens, u.input_tokens, u.output_tokens};
    }

    void configure(std::size_t d, limit l) {
      const auto i = detail::emission_interval(l.rate);
      tolerance[d] = detail::tolerance(i, l.burst);
      interval[d] = i;
      limits[d] = l;
    }

    // The next unit is due one new interval after the last one admitted; a spent burst is owed
    // or forgiven as `spent` says. A pause or a debt further ahead than the old burst is left as
    // it is: the server or the usage set it. Waiters already queued keep their units and are
    // re-priced at the new rate, in order, so a lower rate holds them back at once and a higher
    // one brings them forward.
    void reconfigure(std::size_t d, limit l, detail::nanos now, spent_burst spent) {
      const auto before = limits[d] ? interval[d] : 0;
      const auto before_tolerance = tolerance[d];
      configure(d, l);
      auto* head = waiters.front();
      // What is already admitted ends here: at the head waiter's start, or at TAT.
      auto admitted = head ? head->reservation.end[d] - head->reservation.increment[d] : tat[d];
      if (before != 0 && admitted - now <= before_tolerance) {
        const auto delta = interval[d] - before;
        if (delta > 0 || admitted > now) admitted += delta;
        if (spent == spent_burst::forgiven) admitted = std::min(admitted, now + tolerance[d]);
      }
      if (!head) {
        tat[d] = admitted;
        return;
      }
      std::array<detail::nanos, dims> before_head;
      for (std::size_t i = 0; i < dims; ++i)
        before_head[i] = head->reservation.end[i] - head->reservation.increment[i];
      before_head[d] = admitted;
      // (Bounded as cost_increment bounds a cost: a rate cut cannot overflow the arithmetic.)
      const auto largest_cost = std::numeric_limits<detail::nanos>::max() / 4 / interval[d];
      for (auto* w = head; w; w = w->next) {
        auto& increment = w->reservation.increment[d];
        if (before != 0) increment = std::min(increment / before, largest_cost) * interval[d];
      }
      const auto shift = detail::restack(head, before_head, tolerance);
      for (std::size_t i = 0; i < dims; ++i) tat[i] -= shift[i];
      waiters.arm();
    }

    static constexpr const char* names[dims] = {"requests", "tokens", "input_tokens",
                                                "output_tokens"};

    // What reserving `cost` now would do, without doing it. A cost above a burst waits for an
    // empty limiter (see detail::reserve); one that would overflow throws invalid_argument.
    // A dimension the cost does not use must not be in debt (its TAT more than the burst ahead):
    // a call estimated at zero tokens is settled at what it used, so it waits for the debt too.
    std::pair<reservation_type, detail::nanos> plan(const usage& cost, detail::nanos now) const {
      reservation_type r{{}, tat, now};
      detail::nanos wait = 0;
      const auto n = with_typical_units(units(cost));
      for (std::size_t d = 0; d < dims; ++d) {
        if (!limits[d]) continue;
        if (n[d] == 0) {
          wait = std::max(wait, tat[d] - tolerance[d] - now);
          continue;
        }
        r.increment[d] = detail::cost_increment(n[d], interval[d], names[d]);
        const auto t = detail::reserve(tat[d], now, r.increment[d], tolerance[d]);
        r.end[d] = t.new_tat;
        wait = std::max(wait, t.wait);
      }
      return {r, wait};
    }

    void validate(const usage& cost) const {
      std::lock_guard lock(mutex);
      const auto n = units(cost);
      for (std::size_t d = 0; d < dims; ++d)
        if (limits[d] && n[d] != 0) detail::cost_increment(n[d], interval[d], names[d]);
    }

    bool try_acquire(const usage& cost, detail::nanos now) {
      std::lock_guard lock(mutex);
      auto [r, wait] = plan(cost, now);
      if (wait > 0) return false;
      tat = r.end;
      return true;
    }

    detail::nanos time_until(const usage& cost, detail::nanos now) const {
      std::lock_guard lock(mutex);
      return plan(cost, now).second;
    }

    template <class Handler>
    void initiate_acquire(const std::shared_ptr<state>& self, Handler handler, const usage& cost,
                          std::chrono::nanoseconds max_wait) {
      const auto now = detail::to_nanos(Clock::now());
      std::unique_lock lock(mutex);
      reservation_type r;
      detail::nanos wait;
      try {
        std::tie(r, wait) = plan(cost, now);
      } catch (const weir::exception& e) {
        lock.unlock();
        detail::post_completion(executor, std::move(handler), e.code(), {});
        return;
      }
      if (wait > max_wait.count()) {
        lock.unlock();
        detail::post_completion(executor, std::move(handler), error::rate_limited,
                                std::chrono::nanoseconds(wait));
        return;
      }
      tat = r.end;
      // Free now, and nobody reserved before it still waits for its wake-up: completes at once.
      // Behind such a waiter it joins the queue, already due, so that it cannot overtake it.
      if (wait <= 0 && waiters.empty()) {
        lock.unlock();
        detail::post_completion(executor, std::move(handler), {}, {});
        return;
      }
      if (waiters.shut_down()) {
        lock.unlock();
        detail::post_completion(executor, std::move(handler), error::shut_down, {});
        return;
      }
      auto op = std::make_shared<detail::pending_acquire<Clock, state, Handler>>(
          self, std::move(handler), now);
      op->reservation = r;
      op->ready_at = now + std::max<detail::nanos>(wait, 0);
      op->start();
    }

    void withdraw(waiter_type& w) {
      const auto shift = detail::withdraw(waiters.list(), w, tolerance);
      for (std::size_t d = 0; d < dims; ++d) tat[d] -= shift[d];
      waiters.arm();
    }

    void shutdown() override { waiters.shutdown(); }

    // A dimension estimated at zero is taken as the mean of what settled calls used on it: an
    // estimate of nothing means "unknown" (every model call uses tokens), and reserving nothing
    // would let a thousand such calls through at once, each charged later. Settling one
    // substitutes the same way, so the estimate and its settlement agree (up to the mean moving
    // in between).
    std::array<std::uint64_t, dims> with_typical_units(std::array<std::uint64_t, dims> n) const {
      for (std::size_t d = 0; d < dims; ++d)
        if (n[d] == 0 && limits[d]) n[d] = static_cast<std::uint64_t>(std::llround(typical[d]));
      return n;
    }

    void settle(const usage& estimated, const usage& actual, detail::nanos spent_at) {
      const auto got = units(actual);
      std::lock_guard lock(mutex);
      const auto est = with_typical_units(units(estimated));
      // What is learnt and charged is bounded (most_units); a refund never exceeds what was
      // taken.
      for (std::size_t d = 0; d < dims; ++d) {
        if (!limits[d]) continue;
        const auto sample = static_cast<double>(std::min(got[d], most_units(d)));
        typical[d] = typical[d] == 0 ? sample : typical[d] + (sample - typical[d]) / 8;
      }
      std::array<detail::nanos, dims> charge{}, refund{};
      bool any = false;
      for (std::size_t d = 0; d < dims; ++d) {
        if (!limits[d] || est[d] == got[d]) continue;
        const auto most = most_units(d);
        // Charged even past the burst: the server counted it, so the limiter must too.
        if (got[d] > est[d])
          charge[d] = interval[d] * static_cast<detail::nanos>(std::min(got[d] - est[d], most));
        else
          refund[d] = interval[d] * static_cast<detail::nanos>(std::min(est[d] - got[d], most));
        any = true;
      }
      if (!any) return;
      // A charge counts from when the units were spent, not from the settlement: charged from
      // the settlement, a limit with a small burst (one token, say) lost the refill of the whole
      // call's duration to every call estimated too low.
      move_schedule([&](std::size_t d, detail::nanos end) {
        return charge[d] ? std::max(end, spent_at) + charge[d] : end - refund[d];
      });
    }

    bool give_back(std::size_t d, std::uint64_t n, detail::nanos sent, detail::nanos now) {
      std::lock_guard lock(mutex);
      if (!limits[d] || n == 0) return false;
      const auto amount = interval[d] * static_cast<detail::nanos>(std::min(n, most_units(d)));
      const auto* head = waiters.front();
      const auto end = head ? head->reservation.end[d] - head->reservation.increment[d] : tat[d];
      // Nothing let through since it was sent, and no room already: from now, never into a pause.
      const auto floor = std::max(now, paused_tat[d]);
      if (end - amount > sent || end <= floor) return false;
      move_schedule(
          [&](std::size_t i, detail::nanos e) { return i == d ? std::max(e - amount, floor) : e; });
      return true;
    }

    // A server may report any number: what is learnt, charged or given back is bounded (a day of
    // the limit) so that the clock arithmetic cannot overflow.
    std::uint64_t most_units(std::size_t d) const {
      constexpr std::uint64_t day_ns = 86'400'000'000'000;
      return std::max<std::uint64_t>(1, day_ns / static_cast<std::uint64_t>(interval[d]));
    }

    // Under the mutex: what is admitted ends at `moved(d, end)` instead of `end`, per dimension:
    // TAT, or with waiters queued, the end of what stands before the first of them, who are
    // re-stacked as if it had found that much more (a refund) or less (a charge: a debt is paid
    // before anyone queued behind it) room when it arrived.
    template <class Moved>
    void move_schedule(Moved moved) {
      auto* head = waiters.front();
      if (!head) {
        for (std::size_t d = 0; d < dims; ++d) tat[d] = moved(d, tat[d]);
        return;
      }
      std::array<detail::nanos, dims> before_head;
      for (std::size_t d = 0; d < dims; ++d)
        before_head[d] = moved(d, head->reservation.end[d] - head->reservation.increment[d]);
      const auto shift = detail::restack(head, before_head, tolerance);
      for (std::size_t d = 0; d < dims; ++d) tat[d] -= shift[d];
      waiters.arm();
    }

    // Waiters already queued move behind the pause too: their timers must not fire into it.
    void pause_until(std::size_t d, detail::nanos until) {
      std::lock_guard lock(mutex);
      if (!limits[d]) return;
      const auto target = detail::tat_paused_until(until, interval[d], tolerance[d]);
      if (auto* head = waiters.front()) {
        const auto& r = head->reservation;
        std::array<detail::nanos, dims> start;
        for (std::size_t i = 0; i < dims; ++i) start[i] = r.end[i] - r.increment[i];
        start[d] = std::max(start[d], target);
        const auto shift = detail::restack(head, start, tolerance);
        for (std::size_t i = 0; i < dims; ++i) tat[i] -= shift[i];
        waiters.arm();
      }
      tat[d] = std::max(tat[d], target);
      paused_tat[d] = std::max(paused_tat[d], target);
    }

    executor_type executor;
    mutable std::mutex mutex;
    detail::waiter_queue<Clock, waiter_type> waiters;
    const std::string name;
    std::array<std::optional<limit>, dims> limits{};
    std::array<detail::nanos, dims> interval{};
    std::array<detail::nanos, dims> tolerance{};
    std::array<detail::nanos, dims> tat{};
    std::array<detail::nanos, dims> paused_tat{};  // the last pause's end, as a TAT
    std::array<double, dims> typical{};            // mean units per settled call, per dimension
  };

  executor_type executor_;
  std::shared_ptr<shared_state> state_;
};

}  // namespace weir
