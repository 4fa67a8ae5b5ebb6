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
//
// The known policies (request_queue, token_bucket, rate_limits, circuit_breaker, retry,
// usage_monitor) run as hooks inside one coroutine: a call through five of them costs one
// coroutine frame, not five. Anything else callable as `policy(op)` — timeout, a nested
// pipeline, your own decorator — wraps the policies after it, as a decorator does.
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

#include <weir/circuit_breaker.hpp>
#include <weir/error.hpp>
#include <weir/events.hpp>
#include <weir/outcome.hpp>
#include <weir/rate_limits.hpp>
#include <weir/request_queue.hpp>
#include <weir/retry.hpp>
#include <weir/token_bucket.hpp>
#include <weir/usage_monitor.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

namespace weir {

// What the policies read about one call.
template <class Clock = std::chrono::steady_clock>
struct basic_call_context {
  std::uint64_t tokens = 0;  // estimated tokens: rate_limits take them, usage_monitor counts them
  // Estimated input and output tokens, for limits on each (Anthropic's); `tokens` is the total
  // and, when left 0, is taken as their sum.
  std::uint64_t input_tokens = 0;
  std::uint64_t output_tokens = 0;
  // The real usage, if the call learns it (e.g. from the response): rate_limits settle the
  // estimate against it and usage_monitor counts it instead.
  std::optional<std::uint64_t> actual_tokens{};
  std::optional<std::uint64_t> actual_input_tokens{};
  std::optional<std::uint64_t> actual_output_tokens{};
  weir::priority priority = weir::priority::normal;  // for request_queue
  // A limiter wait that would end past it fails at once with rate_limited; a queue wait still
  // going on when it passes fails with timeout. Both are local refusals: nothing was sent.
  std::optional<typename Clock::time_point> deadline{};
  std::string_view operation{};  // named in events; never a request body or a key
};
using call_context = basic_call_context<>;

namespace detail {

// What a stage's exit decided.
struct exit_action {
  std::optional<std::chrono::nanoseconds> retry_after{};  // re-run the stages inside this one
  std::exception_ptr replace{};                           // the call now fails with this
};

template <class Clock>
struct stage_env {
  basic_call_context<Clock>& ctx;
  const observer* watch;  // null when nobody listens
  unsigned attempt;
  typename Clock::time_point now{};  // read once per attempt, for the stages that need a clock

  void emit(event e) const {
    if (watch) (*watch)(e);
  }
  std::optional<std::chrono::nanoseconds> max_wait(typename Clock::time_point now) const {
    if (!ctx.deadline) return std::nullopt;
    return std::max<std::chrono::nanoseconds>(std::chrono::nanoseconds(0), *ctx.deadline - now);
  }
};

inline std::optional<error_code> weir_code(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return x.code();
  } catch (...) {
    return std::nullopt;
  }
}

// What the call costs the limiters: the estimate, or (settled) what it really used.
template <class Clock>
usage estimated_usage(const basic_call_context<Clock>& ctx) {
  return {.requests = 1,
          .tokens = ctx.tokens ? ctx.tokens : ctx.input_tokens + ctx.output_tokens,
          .input_tokens = ctx.input_tokens,
          .output_tokens = ctx.output_tokens};
}
template <class Clock>
usage actual_usage(const basic_call_context<Clock>& ctx, const usage& estimate) {
  usage u = estimate;
  if (ctx.actual_input_tokens) u.input_tokens = *ctx.actual_input_tokens;
  if (ctx.actual_output_tokens) u.output_tokens = *ctx.actual_output_tokens;
  if (ctx.actual_tokens)
    u.tokens = *ctx.actual_tokens;
  else if (ctx.actual_input_tokens || ctx.actual_output_tokens)
    u.tokens = u.input_tokens + u.output_tokens;
  return u;
}

// A limiter's refusal on the way in, with words, as a local refusal.
[[noreturn]] inline void refuse(error_code ec, const char* who, std::chrono::nanoseconds waited) {
  if (ec.category() != error_category()) throw boost::system::system_error(ec);
  throw weir::exception::refusal(ec, who,
                                 ec == error::rate_limited ? std::optional(waited) : std::nullopt);
}

inline std::optional<rejection> rejection_of(const error_code& ec) {
  if (ec == error::queue_full) return rejection::queue_full;
  if (ec == error::circuit_open) return rejection::circuit_open;
  if (ec == error::budget_exhausted) return rejection::budget_exhausted;
  if (ec == error::rate_limited) return rejection::rate_limited;
  if (ec == error::shut_down) return rejection::shut_down;
  return std::nullopt;
}

// Handed to the stages' exits instead of an outcome when a call returned a value and the
// pipeline's classifier calls every value a success: nothing to judge, nothing to build.
struct plain_success {
  static constexpr bool has_value() noexcept { return true; }
};
template <class O>
inline constexpr bool is_plain_success = std::is_same_v<O, plain_success>;

// ---- stages: the hooks of each known policy ------------------------------------------------

struct queue_stage {
  request_queue queue;
  struct slot {
    bool held = false;
  };
  static constexpr bool values_succeed = true;

  template <class Clock>
  bool try_enter(slot& s, stage_env<Clock>&) {
    return s.held = queue.try_take();
  }
  template <class Clock>
  boost::asio::awaitable<void> wait_enter(slot& s, stage_env<Clock>& env) {
    namespace asio = boost::asio;
    if (!env.ctx.deadline) {
      auto [ec, p] =
          co_await queue.async_admit(env.ctx.priority, asio::as_tuple(asio::use_awaitable));
      if (ec) refuse(ec, "request_queue", {});
      // The slot now belongs to this call; it goes back in exit(), like a fast-path one.
      p.detach();
      s.held = true;
      co_return;
    }
    if (Clock::now() >= *env.ctx.deadline)
      throw weir::exception::refusal(error::timeout, "request_queue: the deadline has passed");
    asio::basic_waitable_timer<Clock> timer(co_await asio::this_coro::executor, *env.ctx.deadline);
    auto group = asio::experimental::make_parallel_group(
        queue.async_admit(env.ctx.priority, asio::deferred), timer.async_wait(asio::deferred));
    auto [order, ec, p, timer_ec] =
        co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
    if (!ec) {
      p.detach();
      s.held = true;
      co_return;
    }
    if (order[0] == 1 && !timer_ec)
      throw weir::exception::refusal(error::timeout,
                                     "request_queue: the deadline passed before a slot was free");
    refuse(ec, "request_queue", {});
  }
  template <class Clock, class O>
  exit_action exit(slot& s, stage_env<Clock>&, const O&) {
    abandon(s);
    return {};
  }
  void abandon(slot& s) {
    if (std::exchange(s.held, false)) queue.give_back();
  }
};

template <class Clock>
struct bucket_stage {
  token_bucket<Clock> bucket;
  struct slot {};
  static constexpr bool values_succeed = true;

  static constexpr bool reads_clock = true;
  bool try_enter(slot&, stage_env<Clock>& env) { return bucket.try_acquire(1, env.now); }
  boost::asio::awaitable<void> wait_enter(slot&, stage_env<Clock>& env) {
    const auto max_wait = env.max_wait(Clock::now()).value_or(std::chrono::nanoseconds::max());
    auto [ec, waited] = co_await bucket.async_acquire(
        1, max_wait, boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec) refuse(ec, "token_bucket: the wait would pass the deadline", waited);
  }
  template <class O>
  exit_action exit(slot&, stage_env<Clock>&, const O&) {
    return {};
  }
  void abandon(slot&) {}
};

template <class Clock>
struct limits_stage {
  rate_limits<Clock> limits;
  struct slot {
    usage taken{};
  };
  static constexpr bool values_succeed = true;
  static constexpr bool reads_clock = true;

  bool try_enter(slot& s, stage_env<Clock>& env) {
    s.taken = estimated_usage(env.ctx);
    return limits.try_acquire(s.taken, env.now);
  }
  boost::asio::awaitable<void> wait_enter(slot& s, stage_env<Clock>& env) {
    const auto max_wait = env.max_wait(Clock::now()).value_or(std::chrono::nanoseconds::max());
    auto [ec, waited] = co_await limits.async_acquire(
        s.taken, max_wait, boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec) refuse(ec, "rate_limits: the wait would pass the deadline", waited);
  }
  template <class O>
  exit_action exit(slot& s, stage_env<Clock>& env, const O&) {
    const auto used = actual_usage(env.ctx, s.taken);
    if (used != s.taken) limits.settle(s.taken, used);
    return {};
  }
  void abandon(slot&) {}
};

template <class Clock, class Classifier>
struct breaker_stage {
  circuit_breaker<Clock, Classifier> breaker;
  struct slot {
    typename circuit_breaker<Clock, Classifier>::ticket ticket{};
  };
  static constexpr bool values_succeed = every_value_succeeds<Classifier>;

  bool try_enter(slot& s, stage_env<Clock>& env) {
    s.ticket = breaker.try_admit();
    if (s.ticket.admitted) return true;
    env.emit(rejected{env.ctx.operation, rejection::circuit_open, s.ticket.retry_after});
    throw weir::exception::refusal(error::circuit_open, "the provider's circuit is open",
                                   s.ticket.retry_after);
  }
  boost::asio::awaitable<void> wait_enter(slot&, stage_env<Clock>&) { co_return; }
  template <class O>
  exit_action exit(slot& s, stage_env<Clock>& env, const O& o) {
    if constexpr (is_plain_success<O>) {
      breaker.record(s.ticket, false);
      return {};
    } else {
      return judge(s, env, o);
    }
  }
  template <class T>
  exit_action judge(slot& s, stage_env<Clock>& env, const outcome<T>& o) {
    if constexpr (every_value_succeeds<Classifier>) {
      if (o.has_value() && !env.watch) {
        breaker.record(s.ticket, false);
        return {};
      }
    }
    const auto before = breaker.state();
    // A cancelled call, or one refused further in, got no answer: its ticket goes back.
    if (!o.reached_provider())
      breaker.abandon(s.ticket);
    else
      breaker.record(s.ticket, breaker.is_failure(breaker.classifier()(o).kind));
    s.ticket = {};
    if (env.watch) {
      const auto after = breaker.state();
      if (after != before) env.emit(breaker_changed{env.ctx.operation, before, after});
    }
    return {};
  }
  void abandon(slot& s) {
    breaker.abandon(s.ticket);
    s.ticket = {};
  }
};

template <class Clock, class Classifier>
struct retry_stage {
  retry<Clock, Classifier> policy;
  struct slot {
    typename retry<Clock, Classifier>::progress progress{};
    bool begun = false;
  };
  static constexpr bool values_succeed = every_value_succeeds<Classifier>;

  bool try_enter(slot& s, stage_env<Clock>&) {
    if (!s.begun) {
      s.progress = policy.begin();
      s.begun = true;
    }
    return true;
  }
  boost::asio::awaitable<void> wait_enter(slot&, stage_env<Clock>&) { co_return; }
  template <class O>
  exit_action exit(slot& s, stage_env<Clock>& env, const O& o) {
    if constexpr (is_plain_success<O>) {
      return {};
    } else {
      return judge(s, env, o);
    }
  }
  template <class T>
  exit_action judge(slot& s, stage_env<Clock>& env, const outcome<T>& o) {
    if constexpr (every_value_succeeds<Classifier>) {
      if (o.has_value()) return {};
    }
    const classification c = policy.classifier()(o);
    if (c.kind == verdict::success || c.kind == verdict::fatal) return {};
    const unsigned failed_attempt = s.progress.attempt;
    auto d = policy.next(s.progress, c, o.failure());
    if (d.error) {
      if (auto ec = weir_code(d.error); ec && *ec == error::budget_exhausted)
        env.emit(rejected{env.ctx.operation, rejection::budget_exhausted, {}});
      // A failing value goes back to the caller as it is; an error becomes the give-up.
      if (o.has_value()) return {};
      return {std::nullopt, d.error};
    }
    env.emit(retry_scheduled{env.ctx.operation, failed_attempt, d.delay, c.kind});
    return {d.delay, {}};
  }
  void abandon(slot&) {}
};

template <class Clock>
struct monitor_stage {
  usage_monitor<Clock> monitor;
  struct slot {};
  static constexpr bool values_succeed = true;

  bool try_enter(slot&, stage_env<Clock>&) { return true; }
  boost::asio::awaitable<void> wait_enter(slot&, stage_env<Clock>&) { co_return; }
  static constexpr bool reads_clock = true;
  // The verdict comes from the pipeline's classifier, handed in by the driver. An attempt is
  // recorded at its start, as a provider counts a request when it arrives.
  void record(stage_env<Clock>& env, verdict kind) {
    monitor.record({.requests = 1,
                    .tokens = env.ctx.actual_tokens.value_or(env.ctx.tokens),
                    .error = kind != verdict::success,
                    .rate_limited = kind == verdict::rate_limited},
                   env.now);
  }
  template <class O>
  exit_action exit(slot&, stage_env<Clock>&, const O&) {
    return {};
  }
  void abandon(slot&) {}
};

// Anything else with operator()(op): it wraps the stages after it.
template <class Policy>
struct decorator_stage {
  Policy policy;
  struct slot {};
  static constexpr bool values_succeed = true;  // judged by the stages inside it, if any
  void abandon(slot&) {}
};

template <class P>
struct is_monitor : std::false_type {};
template <class C>
struct is_monitor<monitor_stage<C>> : std::true_type {};

template <class P, class = void>
struct reads_clock : std::false_type {};
template <class P>
struct reads_clock<P, std::void_t<decltype(P::reads_clock)>> : std::bool_constant<P::reads_clock> {
};

template <class P>
struct is_decorator : std::false_type {};
template <class P>
struct is_decorator<decorator_stage<P>> : std::true_type {};

inline queue_stage make_stage(const request_queue& q) { return {q}; }
template <class C>
bucket_stage<C> make_stage(const token_bucket<C>& b) {
  return {b};
}
template <class C>
limits_stage<C> make_stage(const rate_limits<C>& l) {
  return {l};
}
template <class C, class K>
breaker_stage<C, K> make_stage(const circuit_breaker<C, K>& b) {
  return {b};
}
template <class C, class K>
retry_stage<C, K> make_stage(const retry<C, K>& r) {
  return {r};
}
template <class C>
monitor_stage<C> make_stage(const usage_monitor<C>& m) {
  return {m};
}
template <class P>
decorator_stage<P> make_stage(const P& p) {
  return {p};
}

}  // namespace detail

// See the top of this header. Build one with weir::pipeline(policies...).
template <class Clock, class Classifier, class... Stages>
class basic_pipeline {
 public:
  using clock_type = Clock;
  using context_type = basic_call_context<Clock>;

  basic_pipeline(Classifier classifier, Stages... stages)
      : shared_(std::make_shared<shared>(std::move(classifier), std::move(stages)...)) {}

  // Runs `op` (a callable returning asio::awaitable<T>) through every policy. `ctx` must live
  // until the call completes; `op` may set ctx.actual_tokens once it knows them. The call shares
  // the pipeline's state, so the pipeline itself may be destroyed while it runs.
  template <class Operation>
  auto operator()(context_type& ctx, Operation op) const {
    using value = awaitable_value_t<std::invoke_result_t<Operation&>>;
    auto* s = shared_.get();
    return run<value, 0>(s, shared_, &ctx, std::move(op), 1);
  }

  // The same with a default context; also what makes a pipeline usable as a policy (it nests).
  template <class Operation>
  auto operator()(Operation op) const {
    using value = awaitable_value_t<std::invoke_result_t<Operation&>>;
    auto* s = shared_.get();
    return run<value, 0>(s, shared_, nullptr, std::move(op), 1);
  }

  // For code not written with coroutines: completes `token` with (exception_ptr, T) — or
  // (exception_ptr) for void — so deferred, use_future and plain callbacks work.
  template <class Operation, class CompletionToken>
  auto async_execute(boost::asio::any_io_executor ex, Operation op, CompletionToken&& token) const {
    return boost::asio::co_spawn(std::move(ex), (*this)(std::move(op)),
                                 std::forward<CompletionToken>(token));
  }

  // Sends every event of every call to `o`; an empty observer turns events off. Set it before
  // calls start: it is read, not locked, on each call.
  void observe(observer o) { shared_->watch = std::move(o); }

 private:
  static constexpr std::size_t stage_count = sizeof...(Stages);
  // No classifier anywhere can fail a value: a value needs no outcome built and no judging.
  static constexpr bool plain_values =
      every_value_succeeds<Classifier> && (Stages::values_succeed && ... && true);
  static constexpr bool is_decorator_at[stage_count + 1] = {detail::is_decorator<Stages>::value...,
                                                            true};

  // The first decorator at or after `begin` (stage_count when there is none).
  static constexpr std::size_t hooks_end(std::size_t begin) {
    while (begin < stage_count && !is_decorator_at[begin]) ++begin;
    return begin;
  }

  struct shared {
    shared(Classifier c, Stages... s) : classify(std::move(c)), stages(std::move(s)...) {}
    Classifier classify;
    std::tuple<Stages...> stages;
    observer watch;
  };

  using slots_type = std::tuple<typename Stages::slot...>;

  template <std::size_t Begin, std::size_t End>
  static constexpr bool reads_clock() {
    return []<std::size_t... I>(std::index_sequence<I...>) {
      return (detail::reads_clock<std::tuple_element_t<Begin + I, std::tuple<Stages...>>>::value ||
              ... || false);
    }
    (std::make_index_sequence<End - Begin>{});
  }

  // Calls f(stage, index) for the stage at run-time index i in [Begin, End): the slow path only.
  template <std::size_t Begin, std::size_t End, class F>
  static void at(shared* s, std::size_t i, F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      ((i == Begin + I
            ? (f(std::get<Begin + I>(s->stages), std::integral_constant<std::size_t, Begin + I>{}),
               0)
            : 0),
       ...);
    }
    (std::make_index_sequence<End - Begin>{});
  }

  // Enters the stages from `depth` on, in order, until one must wait (or throws a refusal);
  // `depth` ends at the first stage not entered. Unrolled at compile time: the fast path.
  template <std::size_t Begin, std::size_t End>
  static void enter(shared* s, slots_type& slots, detail::stage_env<Clock>& env,
                    std::size_t& depth) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      [[maybe_unused]] bool blocked = false;
      (
          [&] {
            constexpr std::size_t at = Begin + I;
            if (blocked || at < depth) return;
            if (std::get<at>(s->stages).try_enter(std::get<at>(slots), env))
              depth = at + 1;
            else
              blocked = true;
          }(),
          ...);
    }
    (std::make_index_sequence<End - Begin>{});
  }

  // Exits the entered stages, innermost first, until a retry stage asks to go again (its wait is
  // returned and `depth` is left at it).
  template <std::size_t Begin, std::size_t End, class T>
  static std::optional<std::chrono::nanoseconds> exit(shared* s, slots_type& slots,
                                                      detail::stage_env<Clock>& env,
                                                      std::optional<outcome<T>>& result,
                                                      std::size_t& depth) {
    std::optional<std::chrono::nanoseconds> again;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            constexpr std::size_t at = End - 1 - I;
            if (again || at >= depth) return;
            depth = at;
            auto& stage = std::get<at>(s->stages);
            using stage_type = std::decay_t<decltype(stage)>;
            if constexpr (detail::is_monitor<stage_type>::value) {
              // A call refused on the way in was never sent: nothing for the monitor to count.
              const bool plain_success = every_value_succeeds<Classifier> && result->has_value();
              if (plain_success)
                stage.record(env, verdict::success);
              else if (!result->refused_locally())
                stage.record(env, s->classify(std::as_const(*result)).kind);
            } else {
              auto action = stage.exit(std::get<at>(slots), env, std::as_const(*result));
              if (action.replace) result.emplace(outcome<T>::from_exception(action.replace));
              again = action.retry_after;
            }
          }(),
          ...);
    }
    (std::make_index_sequence<End - Begin>{});
    return again;
  }

  // Leaves the stages [Begin, depth) without an outcome, innermost first: for a call unwound
  // while it held them (cancelled during a retry's wait, or its coroutine destroyed).
  template <std::size_t Begin, std::size_t End>
  static void abandon(shared* s, slots_type& slots, std::size_t depth) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            constexpr std::size_t at = End - 1 - I;
            if (at < depth) std::get<at>(s->stages).abandon(std::get<at>(slots));
          }(),
          ...);
    }
    (std::make_index_sequence<End - Begin>{});
  }

  template <std::size_t Begin, std::size_t End>
  struct unwind_guard {
    shared* s;
    slots_type& slots;
    const std::size_t& depth;
    ~unwind_guard() {
      if (depth > Begin) abandon<Begin, End>(s, slots, depth);
    }
  };

  // Every stage entered, the call returned a value no classifier can fail: exits them with
  // no outcome to build or judge.
  template <std::size_t Begin, std::size_t End>
  static void exit_plain_success(shared* s, slots_type& slots, detail::stage_env<Clock>& env) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            constexpr std::size_t at = End - 1 - I;
            auto& stage = std::get<at>(s->stages);
            if constexpr (detail::is_monitor<std::decay_t<decltype(stage)>>::value)
              stage.record(env, verdict::success);
            else
              stage.exit(std::get<at>(slots), env, detail::plain_success{});
          }(),
          ...);
    }
    (std::make_index_sequence<End - Begin>{});
  }

  // The driver, one coroutine frame for all hook stages: enters the stages from Begin in order,
  // runs what is inside them (the call, or the next decorator around the rest), then exits them
  // innermost first. A retry stage's exit may send it back, after the wait, to the stages inside.
  // `keep` owns the state for the outermost frame (the inner ones run inside it and pass none).
  template <class T, std::size_t Begin, class Operation>
  static boost::asio::awaitable<T> run(shared* s, [[maybe_unused]] std::shared_ptr<shared> keep,
                                       context_type* given, Operation op, unsigned attempt) {
    constexpr std::size_t End = hooks_end(Begin);
    context_type local;
    context_type& ctx = given ? *given : local;
    slots_type slots{};
    const observer* watch = s->watch ? &s->watch : nullptr;
    detail::stage_env<Clock> env{ctx, watch, attempt};

    std::size_t next = Begin;   // the next stage to enter
    std::size_t depth = Begin;  // stages [Begin, depth) are entered
    const unwind_guard<Begin, End> guard{s, slots, depth};
    for (;;) {
      std::optional<outcome<T>> result;
      depth = next;
      typename Clock::time_point started{};
      if constexpr (reads_clock<Begin, End>()) env.now = Clock::now();
      try {
        for (;;) {
          enter<Begin, End>(s, slots, env, depth);
          if (depth == End) break;
          // The slow path: wait for the queue or a limiter, then go on with the next stage.
          const auto waited_from = Clock::now();
          std::optional<boost::asio::awaitable<void>> wait;
          at<Begin, End>(s, depth, [&](auto& stage, auto index) {
            wait.emplace(stage.wait_enter(std::get<decltype(index)::value>(slots), env));
          });
          co_await std::move(*wait);
          if (watch) env.emit(throttled{ctx.operation, Clock::now() - waited_from});
          ++depth;
        }
        if (watch) {
          started = Clock::now();
          env.emit(attempt_started{ctx.operation, env.attempt});
        }
        if constexpr (End < stage_count) {
          // The next decorator wraps the stages after it.
          auto& decorator = std::get<End>(s->stages).policy;
          auto rest = [s, &ctx, &op, a = env.attempt] {
            return run<T, End + 1>(s, {}, &ctx, op, a);
          };
          if constexpr (std::is_void_v<T>) {
            co_await decorator(rest);
            result.emplace(outcome<T>::from_value({}));
          } else {
            result.emplace(outcome<T>::from_value(co_await decorator(rest)));
          }
        } else if constexpr (std::is_void_v<T>) {
          co_await op();
          result.emplace(outcome<T>::from_value({}));
        } else if constexpr (plain_values) {
          auto value = co_await op();
          if (!watch) {  // the common case: straight back, no outcome built
            exit_plain_success<Begin, End>(s, slots, env);
            depth = Begin;
            co_return value;
          }
          result.emplace(outcome<T>::from_value(std::move(value)));
        } else {
          result.emplace(outcome<T>::from_value(co_await op()));
        }
        if (watch) report(s, env, *result, started);
      } catch (...) {
        auto failure = std::current_exception();
        result.emplace(outcome<T>::from_exception(failure));
        if (watch) {
          if (depth == End) {
            report(s, env, *result, started);
          } else if (auto ec = detail::weir_code(failure)) {
            // Refused on the way in. (The breaker reports its own refusals, with retry_after.)
            if (auto why = detail::rejection_of(*ec); why && *why != rejection::circuit_open)
              env.emit(rejected{ctx.operation, *why, {}});
          }
        }
      }

      const auto again = exit<Begin, End>(s, slots, env, result, depth);
      if (!again) {
        if constexpr (std::is_void_v<T>) {
          std::move(*result).get();
          co_return;
        } else {
          co_return std::move(*result).get();
        }
      }
      boost::asio::basic_waitable_timer<Clock> backoff(co_await boost::asio::this_coro::executor,
                                                       *again);
      co_await backoff.async_wait(boost::asio::use_awaitable);
      next = depth + 1;  // back into the stages inside the retry
      ++env.attempt;
    }
  }

  // Attempt events, when someone listens.
  template <class T>
  static void report(shared* s, detail::stage_env<Clock>& env, const outcome<T>& result,
                     typename Clock::time_point started) {
    const auto c = s->classify(result);
    const auto latency = Clock::now() - started;
    if (c.kind == verdict::success) {
      env.emit(attempt_succeeded{env.ctx.operation, env.attempt, latency});
      return;
    }
    env.emit(attempt_failed{env.ctx.operation, env.attempt, latency, c.kind});
    if (c.kind == verdict::rate_limited && !c.hint.empty())
      env.emit(server_rate_limited{env.ctx.operation, c.hint});
  }

  std::shared_ptr<shared> shared_;
};

namespace detail {
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

// Composes `policies` outermost first; outcomes are judged (for the monitor and events) by
// `classifier`. The clock is the first policy's that has one.
template <class Classifier, class... Policies>
requires classifier_for<Classifier, int>
auto pipeline_with(Classifier classifier, const Policies&... policies) {
  using clock = typename detail::first_clock<Policies...>::type;
  return basic_pipeline<clock, Classifier, decltype(detail::make_stage(policies))...>(
      std::move(classifier), detail::make_stage(policies)...);
}

template <class... Policies>
auto pipeline(const Policies&... policies) {
  return pipeline_with(default_classifier{}, policies...);
}

}  // namespace weir
