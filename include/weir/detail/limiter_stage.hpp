// A limiter in a pipeline (see stage.hpp): token_bucket, rate_limits and the Redis limiter share
// it, so code moves between them by changing a type. A limiter gives the stage
//   cost_type, static cost_type cost_of(const usage&)      what one call takes from it
//   async_acquire(cost, max_wait, token)                   completes with (error_code, waited)
// and where it can, try_acquire(cost, now) (no wait: admitted at once or not) and settle(estimate,
// actual) or async_settle(estimate, actual, token) (charge or refund the difference).
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/stage.hpp>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <concepts>
#include <optional>
#include <string>
#include <string_view>

namespace weir::detail {

// The coroutine form of a local limiter's acquire: takes the cost at once if it is there, else
// awaits async_acquire. Only a wait holds a copy of the limiter (one reference on its state): the
// limiter is alive until the caller's co_await has begun, which is all the fast path needs.
template <class Limiter, class Cost>
boost::asio::awaitable<std::chrono::nanoseconds> acquire_now_or_wait(
    Limiter* limiter, Cost cost, std::chrono::nanoseconds max_wait) {
  if (limiter->try_acquire(cost)) co_return std::chrono::nanoseconds(0);
  Limiter keep = *limiter;
  co_return co_await keep.async_acquire(cost, max_wait, boost::asio::use_awaitable);
}

template <class Limiter>
class limiter_stage {
 public:
  using clock_type = typename Limiter::clock_type;
  using cost_type = typename Limiter::cost_type;

  limiter_stage(Limiter limiter) : limiter_(std::move(limiter)) {}

  // Says who held or refused a call, in events and refusals.
  std::string_view name() const noexcept { return limiter_.name(); }

  struct slot {
    usage taken{};
    unsigned attempt = 0;  // the attempt that took it
    typename clock_type::time_point admitted{};
  };
  static constexpr bool values_succeed = true;
  static constexpr bool reads_clock = true;
  static constexpr bool reads_verdict = true;  // a failure that says nothing used no tokens

  bool try_enter(slot& s, stage_context<clock_type>& context) {
    s.taken = context.call.estimated_usage();
    s.attempt = context.attempt;
    s.admitted = context.now;
    if constexpr (requires(const cost_type& c) {
                    { limiter_.try_acquire(c, context.now) } -> std::same_as<bool>;
                  })
      return limiter_.try_acquire(Limiter::cost_of(s.taken), context.now);
    else
      return false;  // no synchronous answer (a shared limiter): always wait_enter
  }

  boost::asio::awaitable<void> wait_enter(slot& s, stage_context<clock_type>& context) {
    const auto max_wait =
        context.max_wait(clock_type::now()).value_or(std::chrono::nanoseconds::max());
    auto [ec, waited] = co_await limiter_.async_acquire(
        Limiter::cost_of(s.taken), max_wait, boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec == error::rate_limited)
      throw_refusal(ec, fmt::format("{}: the wait would pass the deadline", name()).c_str(),
                    waited);
    if (ec) throw_refusal(ec, std::string(name()).c_str());  // e.g. a shared limiter unreachable
    s.admitted = clock_type::now();
  }

  // The estimate is settled by settled_usage's rule, against what the call says it used when
  // it says so. A call that was never sent (refused by a stage inside this one, or its deadline
  // passed as it was admitted, with no retry inside having sent an earlier attempt) is given its
  // whole estimate back.
  template <class Outcome>
  stage_action exit(slot& s, stage_context<clock_type>& context, const Outcome& result) {
    if constexpr (settles || settles_async) {
      const auto& call = context.call;
      bool given_up = false;  // sent, then cancelled or cut short by the call's deadline
      if constexpr (!is_plain_success<Outcome>)
        given_up = result.cancelled() || call.cut_by_deadline(result);
      const auto used = settled_usage(
          !(context.attempt == s.attempt && result.refused_locally()),
          call.reported_usage() ? std::optional(call.actual_usage(s.taken)) : std::nullopt,
          context.judged == verdict::success || given_up, s.taken);
      if (used == s.taken) return {};
      if constexpr (settles_from_admission)
        limiter_.settle(Limiter::cost_of(s.taken), Limiter::cost_of(used), s.admitted);
      else if constexpr (settles)
        limiter_.settle(Limiter::cost_of(s.taken), Limiter::cost_of(used));
      else
        limiter_.async_settle(Limiter::cost_of(s.taken), Limiter::cost_of(used),
                              boost::asio::detached);
    }
    return {};
  }

 private:
  static constexpr bool settles = requires(Limiter & l, const cost_type& c) { l.settle(c, c); };
  // rate_limits charges a call's extra units from when it was let through.
  static constexpr bool settles_from_admission =
      std::is_same_v<cost_type, usage> &&
      requires(Limiter & l, const cost_type& c, typename clock_type::time_point t) {
    l.settle(c, c, t);
  };
  static constexpr bool settles_async = requires(Limiter & l, const cost_type& c) {
    l.async_settle(c, c, boost::asio::detached);
  };

  Limiter limiter_;
};

}  // namespace weir::detail
