// The engine of every pipeline and of every weir policy used alone: runs a call through stages
// (see stage.hpp for what a stage provides), outermost first, as hooks inside one coroutine
// frame, so a call through five policies costs one frame, not five. It knows no policy: each
// policy brings its stage. Anything else callable as `policy(op)` — a nested pipeline, your own
// decorator — wraps the stages after it, as a decorator does. A policy used alone (`retry(op)`)
// runs this same driver with one stage; weir::pipeline (pipeline.hpp) composes them.
//
// Whatever way a call ends — value, error, cancellation during any wait, or its coroutine
// destroyed with the io_context — every stage it entered is left: a queue slot is given back, a
// breaker ticket recorded or (with no answer) abandoned.
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/core/trace.hpp>
#include <weir/detail/deadline.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
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

namespace weir::detail {

// Anything else with operator()(op): it wraps the stages after it.
template <class Policy>
struct decorator_stage {
  Policy policy;
  struct slot {};
  static constexpr bool values_succeed = true;  // judged by the stages inside it, if any
};
template <class P>
struct is_decorator : std::false_type {};
template <class P>
struct is_decorator<decorator_stage<P>> : std::true_type {};

// The optional parts of the stage protocol, read at compile time.
template <class S>
consteval bool values_succeed() {
  if constexpr (requires { S::values_succeed; })
    return S::values_succeed;
  else
    return false;
}
template <class S>
consteval bool reads_clock() {
  if constexpr (requires { S::reads_clock; })
    return S::reads_clock;
  else
    return false;
}
template <class S>
consteval bool reads_verdict() {
  if constexpr (requires { S::reads_verdict; })
    return S::reads_verdict;
  else
    return false;
}
template <class S>
concept bounds_inside = requires(const S& s, const typename S::slot& slot) {
  {s.inside_deadline(slot)};
};
template <class S>
concept abandons = requires(S& s, typename S::slot& slot) {
  s.abandon(slot);
};
// A decorator that takes the call (its context and the pipeline's observer) as well.
template <class P, class Clock, class Op>
concept decorates_call = requires(const P& p, const stage_context<Clock>& env, Op op) {
  p(env, std::move(op));
};

inline std::optional<rejection> rejection_of(const error_code& ec) {
  if (ec == error::queue_full) return rejection::queue_full;
  if (ec == error::circuit_open) return rejection::circuit_open;
  if (ec == error::budget_exhausted) return rejection::budget_exhausted;
  if (ec == error::rate_limited) return rejection::rate_limited;
  if (ec == error::shut_down) return rejection::shut_down;
  if (ec == error::evicted) return rejection::evicted;
  if (ec == error::over_budget) return rejection::over_budget;
  return std::nullopt;
}

// A failure as a local refusal, when it is a weir::exception (see exception::as_refusal).
inline std::exception_ptr as_local_refusal(std::exception_ptr failure) {
  try {
    std::rethrow_exception(failure);
  } catch (const weir::exception& x) {
    return std::make_exception_ptr(x.as_refusal());
  } catch (...) {
    return failure;
  }
}

// Calls the operation, with the attempt's trace context when it takes one: op(const
// trace_context&), or op().
template <class Operation>
auto call_operation(Operation& op, const trace_context& attempt) {
  if constexpr (std::is_invocable_v<Operation&, const trace_context&>)
    return op(attempt);
  else
    return op();
}
template <class Operation>
using operation_value_t = awaitable_value_t<decltype(call_operation(
    std::declval<Operation&>(), std::declval<const trace_context&>()))>;

// Runs calls through Stages, outermost first. A pipeline owns one `shared`; a policy used alone
// hands its stage to run_alone, which keeps the `shared` in the call's own frame.
template <class Clock, class Classifier, class... Stages>
struct driver {
  using context_type = basic_call_context<Clock>;
  using time_point = typename Clock::time_point;

  struct shared {
    shared(Classifier c, Stages... s) : classify(std::move(c)), stages(std::move(s)...) {}
    Classifier classify;
    std::tuple<Stages...> stages;
    const observer* watch = nullptr;  // owned by the pipeline; none for a policy used alone
  };
  // A pipeline's state: the shared part and the observer it points to.
  struct owned : shared {
    using shared::shared;
    observer listener;
  };

  template <class Operation>
  static auto run_alone(Stages... stages, Operation op) {
    using value = operation_value_t<Operation>;
    return run<value, 0>(shared(Classifier{}, std::move(stages)...), nullptr, std::move(op), 1);
  }

  static constexpr std::size_t stage_count = sizeof...(Stages);
  // What a call made without a context sees (the stages only read it).
  static constexpr context_type no_context{};
  // No classifier anywhere can fail a value: a value needs no outcome built and no judging.
  static constexpr bool plain_values =
      every_value_succeeds<Classifier> && (detail::values_succeed<Stages>() && ... && true);
  static constexpr bool is_decorator_at[stage_count + 1] = {detail::is_decorator<Stages>::value...,
                                                            true};

  using slots_type = std::tuple<typename Stages::slot...>;
  template <std::size_t I>
  using stage_at = std::tuple_element_t<I, std::tuple<Stages...>>;

  // The first decorator at or after `begin` (stage_count when there is none).
  static constexpr std::size_t hooks_end(std::size_t begin) {
    while (begin < stage_count && !is_decorator_at[begin]) ++begin;
    return begin;
  }

  template <std::size_t Begin, std::size_t End, class F>
  static constexpr bool any_of(F f) {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
      return (f(std::type_identity<stage_at<Begin + I>>{}) || ... || false);
    }
    (std::make_index_sequence<End - Begin>{});
  }
  template <std::size_t Begin, std::size_t End>
  static constexpr bool any_reads_clock = any_of<Begin, End>([]<class S>(std::type_identity<S>) {
    return reads_clock<S>();
  });
  template <std::size_t Begin, std::size_t End>
  static constexpr bool any_bounds = any_of<Begin, End>([]<class S>(std::type_identity<S>) {
    return bounds_inside<S>;
  });

  static shared* address_of(shared* s) { return s; }
  static shared* address_of(std::shared_ptr<owned>& s) { return s.get(); }
  static shared* address_of(shared& s) { return &s; }

  // Calls f(stage, slot, index) for the stage at run-time index i in [Begin, End): slow paths only.
  template <std::size_t Begin, std::size_t End, class F>
  static void at(shared* s, slots_type& slots, std::size_t i, F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      ((i == Begin + I ? (f(std::get<Begin + I>(s->stages), std::get<Begin + I>(slots),
                            std::integral_constant<std::size_t, Begin + I>{}),
                          0)
                       : 0),
       ...);
    }
    (std::make_index_sequence<End - Begin>{});
  }

  // The name of the stage at run-time index i (empty for one without a name): for events.
  template <std::size_t Begin, std::size_t End>
  static std::string_view name_at(shared* s, slots_type& slots, std::size_t i) {
    std::string_view name;
    at<Begin, End>(s, slots, i, [&](auto& stage, auto&, auto) {
      if constexpr (requires { std::string_view(stage.name()); }) name = stage.name();
    });
    return name;
  }

  // Enters the stages [At, End) from `depth` on, in order, until one must wait (or throws a
  // refusal); `depth` ends at the first stage not entered. Unrolled at compile time and inlined
  // whole: the fast path.
  template <std::size_t At, std::size_t End>
  [[gnu::always_inline]] static void enter(shared* s, slots_type& slots, stage_context<Clock>& env,
                                           std::size_t& depth) {
    if constexpr (At < End) {
      if (At >= depth) {
        if (!std::get<At>(s->stages).try_enter(std::get<At>(slots), env)) return;
        depth = At + 1;
      }
      enter<At + 1, End>(s, slots, env, depth);
    }
  }

  // The earliest deadline the entered stages [Begin, depth) put on what is inside them, and the
  // stage that set it (the innermost of equals). A plain value, not an optional: built on every
  // attempt, an optional's flag written alone and read back with the rest was a hot spot in the
  // driver's profile.
  static constexpr std::size_t caller = stage_count;  // the call's own deadline (ctx.deadline)
  struct bound {
    time_point at = time_point::max();  // max: none
    std::size_t owner = caller;
    explicit operator bool() const noexcept { return at != time_point::max(); }
  };
  template <std::size_t At>
  [[gnu::always_inline]] static void tighten(shared* s, const slots_type& slots, std::size_t depth,
                                             bound& earliest) {
    if constexpr (bounds_inside<stage_at<At>>) {
      if (At >= depth) return;
      const std::optional<time_point> d =
          std::get<At>(s->stages).inside_deadline(std::get<At>(slots));
      if (d && *d <= earliest.at) earliest = bound{*d, At};
    }
  }

  template <std::size_t Begin, std::size_t... I>
  [[gnu::always_inline]] static void tighten_all(shared* s, const slots_type& slots,
                                                 std::size_t depth, bound& earliest,
                                                 std::index_sequence<I...>) {
    (tighten<Begin + I>(s, slots, depth, earliest), ...);
  }

  // The earliest deadline on what is inside the entered stages [Begin, depth): theirs, or the
  // call's own.
  template <std::size_t Begin, std::size_t End>
  [[gnu::always_inline]] static bound limit_of(shared* s, const slots_type& slots,
                                               const stage_context<Clock>& env, std::size_t depth) {
    bound earliest;
    if constexpr (any_bounds<Begin, End>)
      tighten_all<Begin>(s, slots, depth, earliest, std::make_index_sequence<End - Begin>{});
    if (const auto& d = env.call.deadline; d && *d < earliest.at) earliest = bound{*d, caller};
    return earliest;
  }

  // The error the stage that set `b` gives for its deadline passing.
  template <std::size_t Begin, std::size_t End>
  static std::exception_ptr deadline_passed(shared* s, slots_type& slots, stage_context<Clock>& env,
                                            const bound& b, std::exception_ptr cause) {
    if (b.owner == caller)
      return std::make_exception_ptr(
          weir::exception(error::timeout, "the call's deadline passed", {}, cause, env.attempt));
    std::exception_ptr e;
    at<Begin, End>(s, slots, b.owner, [&](auto& stage, auto& slot, auto) {
      if constexpr (bounds_inside<std::decay_t<decltype(stage)>>)
        e = stage.deadline_passed(slot, env, cause);
    });
    return e;
  }

  // Exits the entered stages, innermost first, until one asks to run the inside again (its wait
  // is returned and `depth` is left at it).
  template <std::size_t Begin, std::size_t End, class T>
  static std::optional<std::chrono::nanoseconds> exit(shared* s, slots_type& slots,
                                                      stage_context<Clock>& env,
                                                      std::optional<outcome<T>>& result,
                                                      std::size_t& depth) {
    std::optional<std::chrono::nanoseconds> again;
    [[maybe_unused]] bool judged = false;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            constexpr std::size_t at = End - 1 - I;
            if (again || at >= depth) return;
            depth = at;
            if constexpr (reads_verdict<stage_at<at>>()) {
              if (!judged) {
                env.judged = s->classify(std::as_const(*result)).kind;
                judged = true;
              }
            }
            auto action =
                std::get<at>(s->stages).exit(std::get<at>(slots), env, std::as_const(*result));
            if (action.replace) {
              result.emplace(outcome<T>::from_exception(action.replace));
              judged = false;
            }
            again = action.retry_after;
          }(),
          ...);
    }
    (std::make_index_sequence<End - Begin>{});
    return again;
  }

  // Every stage entered, the call returned a value no classifier can fail: exits them, innermost
  // first, with no outcome to build or judge.
  template <std::size_t Begin, std::size_t End>
  [[gnu::always_inline]] static void exit_plain_success(shared* s, slots_type& slots,
                                                        stage_context<Clock>& env) {
    if constexpr (End > Begin) {
      (void)std::get<End - 1>(s->stages).exit(std::get<End - 1>(slots), env, plain_success{});
      exit_plain_success<Begin, End - 1>(s, slots, env);
    }
  }

  // Leaves the stages [Begin, depth) without an outcome, innermost first: for a call unwound
  // while it held them (cancelled during a wait, or its coroutine destroyed).
  template <std::size_t Begin, std::size_t End>
  static void abandon(shared* s, slots_type& slots, std::size_t depth) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            constexpr std::size_t at = End - 1 - I;
            if constexpr (abandons<stage_at<at>>)
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

  // The stage at `depth` asked to wait: waits, bounded by the deadlines of the stages outside it.
  // A deadline that passes during the wait throws its error (a local refusal: nothing was sent),
  // except when the stage admitted the call at that very instant: then the error is returned, and
  // the caller counts the stage entered before failing, so its exit gives back what it took.
  template <std::size_t Begin, std::size_t End>
  static boost::asio::awaitable<std::exception_ptr> wait_at(shared* s, slots_type& slots,
                                                            stage_context<Clock>& env,
                                                            std::size_t depth) {
    std::optional<boost::asio::awaitable<void>> wait;
    at<Begin, End>(s, slots, depth, [&](auto& stage, auto& slot, auto) {
      if constexpr (requires { stage.wait_enter(slot, env); })
        wait.emplace(stage.wait_enter(slot, env));
      else
        throw weir::exception(error::invalid_argument,
                              "pipeline: a stage without wait_enter declined to enter");
    });
    if (const auto b = limit_of<Begin, End>(s, slots, env, depth)) {
      auto waiting = [&] { return std::move(*wait); };
      auto bounded = co_await detail::run_until<Clock, void>(b.at, waiting);
      if (bounded.deadline_passed) {
        auto failure = as_local_refusal(
            deadline_passed<Begin, End>(s, slots, env, b, bounded.result.failure()));
        if (bounded.result.has_value()) co_return failure;
        std::rethrow_exception(failure);
      }
      std::move(bounded.result).get();
      co_return nullptr;
    }
    co_await std::move(*wait);
    co_return nullptr;
  }

  // What is inside the stages [Begin, End): the call, or the next decorator around the rest.
  template <class T, std::size_t End, class Operation>
  static auto inside(shared* s, const stage_context<Clock>& env, Operation& op) {
    if constexpr (End < stage_count) {
      auto& decorator = std::get<End>(s->stages).policy;
      auto rest = [s, &ctx = env.call, &op, attempt = env.attempt] {
        return run<T, End + 1>(s, &ctx, std::ref(op), attempt);
      };
      if constexpr (decorates_call<std::decay_t<decltype(decorator)>, Clock, decltype(rest)>)
        return decorator(env, std::move(rest));
      else
        return decorator(std::move(rest));
    } else {
      return call_operation(op, env.trace ? env.call.trace.child(env.trace.span) : trace_context{});
    }
  }

  // What is inside [Begin, End), raced against the deadline `limit` of a stage there.
  template <class T, std::size_t Begin, std::size_t End, class Operation>
  static boost::asio::awaitable<outcome<T>> run_bounded(shared* s, slots_type& slots,
                                                        stage_context<Clock>& env, bound limit,
                                                        Operation& op) {
    auto call = [&] { return inside<T, End>(s, env, op); };
    auto bounded = co_await detail::run_until<Clock, T>(limit.at, call);
    if (!bounded.deadline_passed) co_return std::move(bounded.result);
    co_return outcome<T>::from_exception(
        deadline_passed<Begin, End>(s, slots, env, limit, bounded.result.failure()));
  }

  // The driver, one coroutine frame for all hook stages: enters the stages from Begin in order,
  // runs what is inside them, then exits them innermost first. A stage's exit may send it back,
  // after a wait, to the stages inside that one (a retry). `keep` owns the state for the
  // outermost frame (a shared_ptr for a pipeline, the state itself for a policy used alone); the
  // frames inside decorators get a plain pointer.
  template <class T, std::size_t Begin, class Keep, class Operation>
  static boost::asio::awaitable<T> run(Keep keep, const context_type* given, Operation op,
                                       unsigned attempt) {
    constexpr std::size_t End = hooks_end(Begin);
    shared* s = address_of(keep);
    const context_type& ctx = given ? *given : no_context;
    slots_type slots{};
    const observer* watch = s->watch;
    stage_context<Clock> env{ctx, watch, attempt};
    // A traced call: each attempt that sends (its stages' inside is the call, not a decorator
    // whose frames mint their own) is a new span of the caller's trace.
    const bool traced = ctx.trace.valid();
    if (traced) env.trace.trace = ctx.trace.trace_id;

    std::size_t next = Begin;   // the next stage to enter
    std::size_t depth = Begin;  // stages [Begin, depth) are entered
    const unwind_guard<Begin, End> guard{s, slots, depth};
    std::optional<outcome<T>> result;
    for (;;) {
      result.reset();
      depth = next;
      time_point started{};
      bool called = false;  // every stage admitted the call and it was made
      if constexpr (End == stage_count)
        if (traced) env.trace.span = new_span_id();
      if constexpr (any_reads_clock<Begin, End>) env.now = Clock::now();
      try {
        if (ctx.deadline && Clock::now() >= *ctx.deadline)
          throw weir::exception::refusal(error::timeout, "the call's deadline has passed");
        while (enter<Begin, End>(s, slots, env, depth), depth != End) {
          // The slow path: wait for the queue or a limiter, then go on with the next stage.
          const auto waited_from = Clock::now();
          if (auto admitted_too_late = co_await wait_at<Begin, End>(s, slots, env, depth)) {
            ++depth;
            std::rethrow_exception(admitted_too_late);
          }
          if (watch)
            env.emit(throttled{ctx.operation, Clock::now() - waited_from,
                               name_at<Begin, End>(s, slots, depth)});
          ++depth;
          // The stages after a wait decide at the time they are entered: a limiter or a budget
          // deciding at the attempt's start would admit into the past (or an earlier window).
          if constexpr (any_reads_clock<Begin, End>) env.now = Clock::now();
        }
        called = true;
        if (watch) {
          started = Clock::now();
          env.emit(attempt_started{ctx.operation, env.attempt});
        }
        if (const auto limit = limit_of<Begin, End>(s, slots, env, End)) {
          result.emplace(co_await run_bounded<T, Begin, End>(s, slots, env, limit, op));
        } else if constexpr (std::is_void_v<T>) {
          co_await inside<T, End>(s, env, op);
          result.emplace(outcome<T>::from_value({}));
        } else if constexpr (plain_values && !detail::settles_at_stream_end<T> &&
                             !carries_judgement<T>) {
          auto value = co_await inside<T, End>(s, env, op);
          if (!watch) {  // the common case: straight back, no outcome built
            env.judged = verdict::success;
            exit_plain_success<Begin, End>(s, slots, env);
            depth = Begin;
            co_return value;
          }
          result.emplace(outcome<T>::from_value(std::move(value)));
        } else {
          result.emplace(outcome<T>::from_value(co_await inside<T, End>(s, env, op)));
        }
        if (watch) report(s, env, *result, started);
      } catch (...) {
        auto failure = std::current_exception();
        result.emplace(outcome<T>::from_exception(failure));
        if (watch) {
          if (called) {
            report(s, env, *result, started);
          } else if (auto ec = detail::weir_code(failure)) {
            // Refused on the way in. (The breaker reports its own refusals, with retry_after.)
            if (auto why = detail::rejection_of(*ec); why && *why != rejection::circuit_open)
              env.emit(rejected{ctx.operation, *why, {}, name_at<Begin, End>(s, slots, depth)});
          }
        }
      }

      // A stream came back with its first chunk: the stages stay entered until it ends, and
      // their exits run then (see stream.hpp).
      if constexpr (detail::settles_at_stream_end<T>) {
        if (result->has_value()) {
          T value = std::move(*result).get();
          value.on_end(std::make_unique<settle_at_end<T, Begin, End, Keep>>(std::move(keep),
                                                                            std::move(slots), env));
          depth = Begin;
          co_return value;
        }
      }

      // Leave the stages, innermost first, until one asks to run the inside again after a wait.
      std::optional<std::chrono::nanoseconds> again;
      for (;;) {
        again = exit<Begin, End>(s, slots, env, result, depth);
        if (!again) break;
        const auto limit = limit_of<Begin, End>(s, slots, env, depth);
        // A deadline outside the stage that asked cuts its wait short; the deadline's error then
        // leaves the stages outside. Nothing can be sent past the call's own deadline, so a wait
        // that reaches it is not waited at all.
        const bool cut = limit && Clock::now() + *again >= limit.at;
        if (cut && limit.owner == caller) {
          result.emplace(outcome<T>::from_exception(
              deadline_passed<Begin, End>(s, slots, env, limit, result->failure())));
          continue;
        }
        boost::asio::basic_waitable_timer<Clock> backoff(co_await boost::asio::this_coro::executor);
        if (cut)
          backoff.expires_at(limit.at);
        else
          backoff.expires_after(*again);
        co_await backoff.async_wait(boost::asio::use_awaitable);
        if (!cut) break;
        result.emplace(outcome<T>::from_exception(
            deadline_passed<Begin, End>(s, slots, env, limit, result->failure())));
      }
      if (!again) {
        depth = Begin;
        if constexpr (std::is_void_v<T>) {
          std::move(*result).get();
          co_return;
        } else {
          co_return std::move(*result).get();
        }
      }
      next = depth + 1;  // back into the stages inside the one that asked
      ++env.attempt;
    }
  }

  // The exits of the stages [Begin, End) a stream carried out of its call: run when it ends, with
  // the tokens it produced (the success of a stream that completed or that the caller stopped
  // reading; its failure if it broke). Holds the pipeline's state until then.
  template <class T, std::size_t Begin, std::size_t End, class Keep>
  struct settle_at_end final : stream_settler {
    settle_at_end(Keep k, slots_type&& held, const stage_context<Clock>& env)
        : keep(std::move(k)),
          slots(std::move(held)),
          call(env.call),
          watch(env.watch),
          attempt(env.attempt),
          now(env.now),
          trace(env.trace) {}

    void settle(stream_end how, const std::exception_ptr& failure, const stream_tally& tally,
                std::chrono::nanoseconds time_to_first_token) noexcept override {
      try {
        shared* s = address_of(keep);
        tally.settle_into(call);
        stage_context<Clock> env{call, watch, attempt, now};
        env.delivered = true;
        env.trace = trace;
        const stream_settled ending{how, tally, time_to_first_token};
        env.stream = &ending;
        std::optional<outcome<T>> result;
        if (how == stream_end::broken)
          result.emplace(outcome<T>::from_exception(failure));
        else
          result.emplace(outcome<T>::from_value(T{}));
        std::size_t depth = End;
        while (depth > Begin) exit<Begin, End>(s, slots, env, result, depth);
        if (watch && Begin == 0)  // once per pipeline, from its outermost frame
          env.emit(stream_ended{call.operation, how, tally.chunks,
                                call.actual_tokens.value_or(call.estimated_usage().tokens),
                                tally.source(), time_to_first_token});
      } catch (...) {  // an observer threw: the stream's end must not
      }
    }

    Keep keep;
    slots_type slots;
    context_type call;  // a copy: the caller's context may be gone when the stream ends
    const observer* watch;
    unsigned attempt;
    time_point now;
    trace_ids trace;
  };

  // Attempt events, when someone listens.
  template <class T>
  static void report(shared* s, stage_context<Clock>& env, const outcome<T>& result,
                     time_point started) {
    const auto c = s->classify(result);
    const auto latency = Clock::now() - started;
    if (c.kind == verdict::success) {
      env.emit(attempt_succeeded{env.call.operation, env.attempt, latency});
      return;
    }
    env.emit(attempt_failed{env.call.operation, env.attempt, latency, c.kind});
    if (c.kind == verdict::rate_limited && !c.hint.empty())
      env.emit(server_rate_limited{env.call.operation, c.hint});
  }
};

}  // namespace weir::detail
