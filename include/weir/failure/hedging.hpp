// Hedging, as Polly v8 has it: when a call has not answered after a delay, a second attempt
// starts beside it (on another model, if the operation takes the attempt's number), and the first
// success wins; the others are cancelled and waited for, so whatever they hold (a queue slot, a
// reservation) is given back before the call returns. It trades a little extra load for the
// tail: a call stuck behind a slow generation is answered by the hedge.
//
//     weir::hedging<> hedge({.delay_percentile = 0.95, .max_in_flight = 8,
//                            .budget = weir::retry_budget({.ratio = 0.1})});
//     auto reply = co_await hedge([&](unsigned attempt) {   // 0, then 1 for the hedge
//       return guarded(ctx, [&, attempt] { return send(attempt == 0 ? big : small, request); });
//     });
//
// In a pipeline it is a decorator: weir::pipeline(hedge, queue, retry) runs the policies after it
// once per attempt (each hedge takes its own queue slot), calling the operation as op(), and the
// pipeline keeps the call's deadline. Used alone, it takes the caller's context as a pipeline
// does, for its deadline: hedge(ctx, op).
//
// The delay is fixed, or a percentile of the first attempts' latencies it has seen. Hedges are
// bounded: at most `max_hedges` per call, `max_in_flight` at once across calls, and, with a
// `budget`, a share of the calls (each call deposits `ratio` of a hedge, each hedge withdraws
// one); a hedge refused by a bound is not tried again for that call. A failure with no other
// attempt running starts the next hedge at once (if allowed); with others running it waits for
// them. When every attempt has failed, the call fails as the last one did. Each hedge is a
// `hedge_started` event, sent to the observer of the pipeline (or router) the hedge runs in, or,
// used alone or where nobody listens, to its own `watch`. The cost of a hedge is the router's to
// weigh; this policy counts calls.
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/failure/retry_budget.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace weir {

// Classifier: what judges each attempt's outcome (outcome.hpp): the first success wins.
template <class Classifier = default_classifier>
struct basic_hedging_options {
  // The wait before a hedge: fixed, or (with delay_percentile) that percentile of the recent
  // latencies of first attempts, once `min_samples` are known (`delay` until then). Keep it
  // under 1 − the share of slow calls: a percentile that falls in the tail hedges too late.
  std::chrono::nanoseconds delay = std::chrono::seconds(2);
  std::optional<double> delay_percentile{};  // in (0, 1): 0.95 hedges the slowest 5%
  std::size_t min_samples = 20;
  std::size_t max_hedges = 1;      // extra attempts per call
  std::size_t max_in_flight = 16;  // hedges running at once, across calls
  std::optional<retry_budget> budget{};
  std::string name = "hedging";
  std::string operation{};  // named in its events, when the call names none
  // hedge_started events, when the hedge is used alone or its pipeline has no observer.
  observer watch{};
  Classifier classifier{};
};
using hedging_options = basic_hedging_options<>;

template <class Clock = std::chrono::steady_clock, class Classifier = default_classifier>
class hedging {
 public:
  using clock_type = Clock;
  using options_type = basic_hedging_options<Classifier>;

  // Throws weir::exception(invalid_argument) for a negative delay, a percentile outside (0, 1)
  // or max_in_flight of 0.
  explicit hedging(options_type options)
      : state_(std::make_shared<state>(validated(std::move(options)))) {}

  // Runs `op` — callable as op(attempt) with the attempt's number (0 first), or as op() — with
  // hedges as the options allow.
  template <class Op>
  auto operator()(Op op) const {
    using T = awaitable_value_t<decltype(invoke(op, 0u))>;
    return run<T>(state_, std::move(op), std::nullopt, {});
  }

  // The same within the caller's deadline (ctx.deadline; the rest of ctx is not read, nor kept):
  // no attempt starts at or after it, and when it passes the call fails with timeout (the last
  // failure, if any, its cause), the attempts still running cancelled and waited for. A deadline
  // already passed sends nothing: timeout, a local refusal.
  template <class Op>
  auto operator()(const basic_call_context<Clock>& ctx, Op op) const {
    using T = awaitable_value_t<decltype(invoke(op, 0u))>;
    return run<T>(state_, std::move(op), ctx.deadline, {});
  }

  // The same in a pipeline (or the router), which calls it with the call and its observer: the
  // events go to that observer, when there is one, named for the call's operation.
  template <class Op>
  auto operator()(const stage_context<Clock>& call, Op op) const {
    using T = awaitable_value_t<decltype(invoke(op, 0u))>;
    return run<T>(state_, std::move(op), call.call.deadline, {call.call.operation, call.watch});
  }

  // The wait before a hedge now.
  std::chrono::nanoseconds current_delay() const { return state_->delay(); }
  // Hedges running now, across calls.
  std::size_t hedges_in_flight() const { return state_->hedges.load(); }
  const std::string& name() const noexcept { return state_->options.name; }

 private:
  struct state {
    explicit state(options_type o) : options(std::move(o)) {}

    const options_type options;
    std::atomic<std::size_t> hedges{0};
    mutable std::mutex mutex;
    std::deque<std::int64_t> latencies;  // ns, the most recent successes

    static constexpr std::size_t kept = 256;

    void note(std::chrono::nanoseconds latency) {
      if (!options.delay_percentile) return;
      std::lock_guard lock(mutex);
      latencies.push_back(latency.count());
      if (latencies.size() > kept) latencies.pop_front();
    }
    std::chrono::nanoseconds delay() const {
      if (!options.delay_percentile) return options.delay;
      std::vector<std::int64_t> seen;
      {
        std::lock_guard lock(mutex);
        if (latencies.size() < options.min_samples) return options.delay;
        seen.assign(latencies.begin(), latencies.end());
      }
      const auto at = static_cast<std::size_t>(*options.delay_percentile *
                                               static_cast<double>(seen.size() - 1));
      std::nth_element(seen.begin(), seen.begin() + static_cast<std::ptrdiff_t>(at), seen.end());
      return std::chrono::nanoseconds(seen[at]);
    }
    // A hedge may start now: under max_in_flight and within the budget. Takes both.
    bool take_hedge() {
      auto n = hedges.load();
      do {
        if (n >= options.max_in_flight) return false;
      } while (!hedges.compare_exchange_weak(n, n + 1));
      if (options.budget && !options.budget->try_withdraw(since_epoch())) {
        --hedges;
        return false;
      }
      return true;
    }
    static std::chrono::nanoseconds since_epoch() {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch());
    }
  };

  static options_type validated(options_type o) {
    if (o.delay.count() < 0) detail::invalid_option(o.name, "delay", o.delay.count(), "be ≥ 0");
    if (o.delay_percentile && !(*o.delay_percentile > 0 && *o.delay_percentile < 1))
      detail::invalid_option(o.name, "delay_percentile", *o.delay_percentile, "be in (0, 1)");
    if (o.max_in_flight == 0)
      detail::invalid_option(o.name, "max_in_flight", o.max_in_flight, "be at least 1");
    return o;
  }

  template <class Op>
  static auto invoke(Op& op, unsigned attempt) {
    if constexpr (std::is_invocable_v<Op&, unsigned>)
      return op(attempt);
    else
      return op();
  }

  // One call's race, on one strand: the attempts' outcomes as they come.
  template <class T>
  struct race {
    explicit race(const boost::asio::strand<boost::asio::any_io_executor>& s)
        : wake(s, Clock::time_point::max()) {}
    boost::asio::basic_waitable_timer<Clock> wake;  // cancelled when an attempt ends
    std::vector<std::unique_ptr<boost::asio::cancellation_signal>> stops;  // one per attempt
    std::vector<bool> done;                                                // one per attempt
    std::deque<std::pair<unsigned, outcome<T>>> ended;  // (attempt, outcome), not yet read
    std::size_t running = 0;
    // Attempts whose co_spawn has not completed yet: until it has, it uses the cancellation slot
    // of the attempt's signal, so the race (which owns the signals) must wait for them too.
    std::size_t spawned = 0;
    std::size_t hedges_held = 0;  // this call's share of state::hedges
  };

  using deadline_type = std::optional<typename Clock::time_point>;

  // Who hears of one call's hedges: the pipeline's observer, else the hedge's own.
  struct audience {
    std::string_view operation;
    const observer* pipeline = nullptr;

    const observer* watch(const state& s) const {
      if (pipeline) return pipeline;
      return s.options.watch ? &s.options.watch : nullptr;
    }
    std::string_view named(const state& s) const {
      return operation.empty() ? std::string_view(s.options.operation) : operation;
    }
  };

  template <class T, class Op>
  static boost::asio::awaitable<T> run(std::shared_ptr<state> s, Op op, deadline_type deadline,
                                       audience told) {
    namespace asio = boost::asio;
    if (deadline && Clock::now() >= *deadline)
      throw weir::exception::refusal(error::timeout,
                                     s->options.name + ": the call's deadline has passed");
    auto strand = asio::make_strand(co_await asio::this_coro::executor);
    // The race runs on a strand of the caller's executor; the caller's cancellation reaches it.
    co_return co_await asio::co_spawn(
        strand, coordinate<T>(s, std::move(op), strand, deadline, told), asio::use_awaitable);
  }

  // One attempt, recorded in the race when it ends, whatever way.
  template <class T>
  static boost::asio::awaitable<void> attempt_into(race<T>& r, unsigned attempt,
                                                   boost::asio::awaitable<T> call) {
    auto result = co_await capture(std::move(call));
    r.ended.emplace_back(attempt, std::move(result));
    r.done[attempt] = true;
    --r.running;
    r.wake.cancel();
  }

  template <class T, class Op>
  static boost::asio::awaitable<T> coordinate(
      std::shared_ptr<state> s, Op op, boost::asio::strand<boost::asio::any_io_executor> strand,
      deadline_type deadline, audience told) {
    namespace asio = boost::asio;
    // Cancellation is read, not thrown: the attempts must be waited for whatever happens.
    co_await asio::this_coro::throw_if_cancelled(false);
    if (s->options.budget) s->options.budget->deposit(state::since_epoch());
    race<T> r(strand);
    const auto started = Clock::now();
    const auto launch = [&](unsigned attempt) {
      r.stops.push_back(std::make_unique<asio::cancellation_signal>());
      r.done.push_back(false);
      try {
        auto call = invoke(op, attempt);
        asio::co_spawn(
            strand, attempt_into<T>(r, attempt, std::move(call)),
            asio::bind_cancellation_slot(r.stops.back()->slot(), [&r](std::exception_ptr) {
              --r.spawned;
              r.wake.cancel();
            }));
        ++r.running;
        ++r.spawned;
      } catch (...) {  // the operation threw before it could start
        r.ended.emplace_back(attempt, outcome<T>::from_exception(std::current_exception()));
        r.done[attempt] = true;
      }
    };
    launch(0);
    unsigned attempts = 1;
    auto hedge_at = started + std::chrono::duration_cast<typename Clock::duration>(s->delay());
    std::optional<outcome<T>> won, last_failure;
    bool caller_cancelled = false, deadline_passed = false;
    const auto past_deadline = [&] { return deadline && Clock::now() >= *deadline; };

    const auto try_hedge = [&] {
      if (attempts > s->options.max_hedges) return false;
      if (past_deadline()) {  // nothing starts at or after it
        deadline_passed = true;
        return false;
      }
      if (!s->take_hedge()) return false;
      ++r.hedges_held;
      if (const observer* watch = told.watch(*s)) {
        const hedge_started e{
            told.named(*s), attempts,
            std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started),
            s->options.name};
        (*watch)(e);
      }
      launch(attempts++);
      return true;
    };

    while (!won && (r.running > 0 || !r.ended.empty())) {
      if (r.ended.empty()) {
        const bool can_hedge = attempts <= s->options.max_hedges;
        const auto until = can_hedge ? hedge_at : Clock::time_point::max();
        r.wake.expires_at(deadline ? std::min(until, *deadline) : until);
        auto [ec] = co_await r.wake.async_wait(asio::as_tuple(asio::use_awaitable));
        const asio::cancellation_state cancel = co_await asio::this_coro::cancellation_state;
        if (cancel.cancelled() != asio::cancellation_type::none) {
          caller_cancelled = true;
          break;
        }
        if (r.ended.empty() && past_deadline()) {  // an attempt that ended then is read first
          deadline_passed = true;
          break;
        }
        if (!ec && can_hedge && Clock::now() >= hedge_at) {
          if (!try_hedge())
            hedge_at = Clock::time_point::max();  // no room: no more hedges
          else
            hedge_at =
                Clock::now() + std::chrono::duration_cast<typename Clock::duration>(s->delay());
        }
        continue;
      }
      auto next = std::move(r.ended.front());
      r.ended.pop_front();
      if (s->options.classifier(next.second).kind == verdict::success) {
        // The first attempt's latency: its own when it won; when a hedge won while it still ran,
        // the time so far (it would have taken at least that). Not the call's latency: hedged
        // calls would pull the percentile up after them, and the delay with it.
        if (next.first == 0 || !r.done[0])
          s->note(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started));
        won.emplace(std::move(next.second));
      } else {
        last_failure.emplace(std::move(next.second));
        if (r.running == 0 && r.ended.empty()) try_hedge();  // nothing else out: hedge now
      }
    }

    // The others are cancelled and waited for: nothing outlives the call.
    for (std::size_t i = 0; i < r.stops.size(); ++i)
      if (!r.done[i]) r.stops[i]->emit(asio::cancellation_type::terminal);
    if (caller_cancelled)
      co_await asio::this_coro::reset_cancellation_state(asio::disable_cancellation());
    while (r.running > 0 || r.spawned > 0) {
      r.wake.expires_at(Clock::time_point::max());
      co_await r.wake.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    s->hedges -= r.hedges_held;
    if (caller_cancelled) throw boost::system::system_error(boost::asio::error::operation_aborted);
    if (deadline_passed && !won)
      throw weir::exception(error::timeout, s->options.name + ": the call's deadline passed", {},
                            last_failure ? last_failure->failure() : nullptr, attempts);
    auto& ending = won ? *won : *last_failure;
    if constexpr (std::is_void_v<T>) {
      std::move(ending).get();
    } else {
      co_return std::move(ending).get();
    }
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir
