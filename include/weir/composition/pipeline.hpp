// Policies composed around a call, outermost first, in the order written:
//
//     auto guarded = weir::pipeline(retry, breaker, limits, monitor, queue);
//     weir::call_context ctx{.tokens = 1200, .operation = "chat"};
//     auto reply = co_await guarded(ctx, [&] { return client.async_post(req, asio::use_awaitable); });
//
// What the order means:
//   retry outside a limiter or the queue   every attempt waits for (and takes) its own permit
//   retry inside them                      all attempts share the one permit taken first
//   retry outside the breaker              an open circuit is a rate-limited failure: the retry
//                                          waits exactly until half-open (if max_retry_after
//                                          allows)
//   retry inside the breaker               the breaker sees one result per call, after the retries
//   monitor inside the retry               records every attempt; outside, one record per call
//   timeout outside the retry              bounds the whole call, waits included; inside, each
//                                          attempt
//
// This header composes; detail/driver.hpp runs the calls. It knows no policy: each policy
// brings its stage (see stage.hpp, which is also how to write your own), and the driver runs
// every stage as hooks inside one coroutine frame, so a call through five policies costs one
// frame, not five. Anything else callable as `policy(op)` — a nested pipeline, your own
// decorator — wraps the stages after it, as a decorator does. A policy used alone (`retry(op)`)
// runs this same driver with one stage.
//
// Policies are held by copy, and copies of a weir policy share its state: one provider's bucket
// can sit in many pipelines used from many threads. A call shares the pipeline's state too:
// destroying the pipeline (or any of its policies) while calls are in flight ends nothing and
// frees nothing they use; cancel the calls through their cancellation slots if they must stop.
//
// Whatever way a call ends — value, error, cancellation during any wait, or its coroutine
// destroyed with the io_context — every stage it entered is left: a queue slot is given back, a
// breaker ticket recorded or (with no answer) abandoned.
#pragma once

#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/driver.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/co_spawn.hpp>

#include <chrono>
#include <memory>
#include <type_traits>
#include <utility>

namespace weir {

namespace detail {

template <class Clock, class P>
auto as_stage(const P& policy) {
  if constexpr (weir::stage<P, Clock>)
    return policy;
  else if constexpr (has_stage<P>)
    return policy.stage();
  else
    return decorator_stage<P>{policy};
}

template <class P, class = void>
struct clock_of {
  using type = void;
};
template <class P>
struct clock_of<P, std::void_t<typename P::clock_type>> {
  using type = typename P::clock_type;
};
template <class... Ps>
struct first_clock {
  using type = std::chrono::steady_clock;
};
template <class P, class... Ps>
struct first_clock<P, Ps...> {
  using type = std::conditional_t<std::is_void_v<typename clock_of<P>::type>,
                                  typename first_clock<Ps...>::type, typename clock_of<P>::type>;
};
}  // namespace detail

// What a pipeline does besides its stages.
template <class Classifier = default_classifier>
struct basic_pipeline_options {
  observer watch{};  // every event of every call; empty: no event is built
  // Judges outcomes for events and for the stages that read the pipeline's verdict (the usage
  // monitor). Each retry or breaker judges with its own.
  Classifier classifier{};
};
using pipeline_options = basic_pipeline_options<>;

// See the top of this header. Build one with weir::pipeline(policies...).
template <class Clock, class Classifier, class... Stages>
class basic_pipeline {
  using driver = detail::driver<Clock, Classifier, Stages...>;

 public:
  using clock_type = Clock;
  using context_type = basic_call_context<Clock>;

  basic_pipeline(basic_pipeline_options<Classifier> options, Stages... stages)
      : shared_(std::make_shared<typename driver::owned>(std::move(options.classifier),
                                                         std::move(stages)...)) {
    shared_->listener = std::move(options.watch);
    shared_->watch = shared_->listener ? &shared_->listener : nullptr;
  }

  // Runs `op` (a callable returning asio::awaitable<T>) through every policy. `ctx` must live
  // until the call completes; `op` may set ctx.actual_tokens once it knows them. The call shares
  // the pipeline's state, so the pipeline itself may be destroyed while it runs.
  template <class Operation>
  auto operator()(context_type& ctx, Operation op) const {
    using value = detail::operation_value_t<Operation>;
    return driver::template run<value, 0>(shared_, &ctx, std::move(op), 1);
  }

  // The same with a default context; also what makes a pipeline usable as a policy (it nests).
  template <class Operation>
  auto operator()(Operation op) const {
    using value = detail::operation_value_t<Operation>;
    return driver::template run<value, 0>(shared_, nullptr, std::move(op), 1);
  }

  // For code not written with coroutines: completes `token` with (exception_ptr, T) — or
  // (exception_ptr) for void — so deferred, use_future and plain callbacks work.
  template <class Operation, class CompletionToken>
  auto async_execute(boost::asio::any_io_executor ex, Operation op, CompletionToken&& token) const {
    return boost::asio::co_spawn(std::move(ex), (*this)(std::move(op)),
                                 std::forward<CompletionToken>(token));
  }

 private:
  std::shared_ptr<typename driver::owned> shared_;
};

// Composes `policies` (or stages) outermost first, with `options`. The clock is the first
// policy's that has one.
template <class Classifier, class... Policies>
requires classifier_for<Classifier, int>
auto pipeline(basic_pipeline_options<Classifier> options, const Policies&... policies) {
  using clock = typename detail::first_clock<Policies...>::type;
  return basic_pipeline<clock, Classifier, decltype(detail::as_stage<clock>(policies))...>(
      std::move(options), detail::as_stage<clock>(policies)...);
}

template <class... Policies>
auto pipeline(const Policies&... policies) {
  return pipeline(pipeline_options{}, policies...);
}

}  // namespace weir
