// The stage protocol: how a policy takes part in a weir::pipeline. Every weir policy has a stage
// (its `stage()`), and a class of your own that follows the protocol is a stage too; the
// pipeline runs all of them as hooks inside one coroutine frame, outermost first:
//
//     struct my_stage {
//       struct slot { /* what one call holds between entering and leaving */ };
//       bool try_enter(slot&, weir::stage_context<>&);                 // required
//       asio::awaitable<void> wait_enter(slot&, weir::stage_context<>&);
//       template <class Outcome>
//       weir::stage_action exit(slot&, weir::stage_context<>&, const Outcome&);  // required
//       void abandon(slot&);
//     };
//
//   try_enter    admits the call without waiting: true to go on, false to wait (then wait_enter
//                is awaited and must admit or throw), or throw a refusal (a weir::exception made
//                with exception::refusal: nothing was sent).
//   exit         the call (or what is inside this stage) ended with the outcome: an outcome<T>,
//                or, for a stage that declares `values_succeed`, weir::plain_success when the
//                call returned a value nobody needs to judge. The action may ask to run the
//                inside again after a wait (a retry) or replace the outcome with an error;
//                not when context.delivered is set (a stream settling at its end, see
//                stream.hpp: its value already reached the caller).
//   abandon      the call was unwound while this stage held it, with no outcome (cancelled in a
//                wait further out, or its coroutine destroyed): give back what it took.
//
// Optional declarations, each read at compile time:
//   static constexpr bool values_succeed   this stage never judges a value a failure, so a value
//                                          may pass as plain_success (the pipeline's fast path)
//   static constexpr bool reads_clock      set context.now at the attempt's start, and again
//                                          after each wait on the way in, for this stage
//   static constexpr bool reads_verdict    set context.verdict (the pipeline's classifier on
//                                          the outcome) before exit
//   std::optional<time_point> inside_deadline(const slot&)
//   std::exception_ptr deadline_passed(slot&, stage_context&, std::exception_ptr cause)
//                                          bound what is inside this stage (its waits, the call,
//                                          a retry's backoff) by a deadline; when it passes the
//                                          inside is cancelled and the call fails with the
//                                          error deadline_passed returns
//   std::string_view name() const          who held the call (throttled) or refused it
//                                          (rejected), in the pipeline's events; weir's stages
//                                          give their options' `name`
//
// A policy with no stage is a decorator: the pipeline calls it as `policy(op)`, `op` running the
// stages after it. One that also takes the call, `policy(const stage_context<Clock>&, op)`, is
// called so instead: it sees the call's context and the pipeline's observer, where its events
// go (weir::hedging and weir::fallback do).
#pragma once

#include <weir/core/call_context.hpp>
#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/trace.hpp>

#include <boost/asio/awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>

namespace weir {

// What a stream's chunks said about its tokens, gathered as they passed (see stream.hpp).
struct stream_tally {
  std::uint64_t chunks = 0;
  std::uint64_t counted_output_tokens = 0;                // output counted chunk by chunk
  std::optional<std::uint64_t> reported_input_tokens{};   // e.g. Anthropic's message_start
  std::optional<std::uint64_t> reported_output_tokens{};  // the final usage chunk
  // Of the reported input, read from and written to the prompt cache.
  std::optional<std::uint64_t> reported_cache_read_tokens{};
  std::optional<std::uint64_t> reported_cache_write_tokens{};

  usage_source source() const noexcept {
    if (reported_output_tokens) return usage_source::reported;
    if (counted_output_tokens > 0) return usage_source::counted;
    return usage_source::estimated;
  }

  // Sets `call`'s actual tokens from what the stream told; where it told nothing the estimate
  // stays. Input nobody reported is the estimate's (all of `tokens` when the estimate has no
  // split): a broken stream is charged no less than what its prompt cost.
  template <class Clock>
  void settle_into(basic_call_context<Clock>& call) const {
    const auto output =
        reported_output_tokens
            ? *reported_output_tokens
            : (counted_output_tokens > 0 ? std::optional(counted_output_tokens) : std::nullopt);
    if (!output) return;
    const std::uint64_t estimated_input =
        call.input_tokens ? call.input_tokens
                          : call.tokens - std::min(call.tokens, call.output_tokens);
    call.actual_input_tokens = reported_input_tokens.value_or(estimated_input);
    call.actual_output_tokens = *output;
    call.actual_tokens = detail::saturating_add(*call.actual_input_tokens, *output);
    if (reported_input_tokens) {
      call.actual_cache_read_tokens = reported_cache_read_tokens;
      call.actual_cache_write_tokens = reported_cache_write_tokens;
    }
  }

  // Sets the reported input, cache counts included, from a usage the stream carried.
  void report_input(const token_usage& used) noexcept {
    reported_input_tokens = used.input_tokens;
    reported_cache_read_tokens = used.cache_read_tokens;
    reported_cache_write_tokens = used.cache_write_tokens;
  }
};

// How a stream ended, for the stages settling it (stage_context::stream).
struct stream_settled {
  stream_end how;
  const stream_tally& tally;
  std::chrono::nanoseconds time_to_first_token;
};

namespace detail {
// What a stream runs when it ends: the exits of the stages it carries out of the pipeline (or
// the route's attempt) that opened it, so a slot is held for the whole stream and tokens
// settle to what it produced.
struct stream_settler {
  virtual ~stream_settler() = default;
  virtual void settle(stream_end how, const std::exception_ptr& failure, const stream_tally& tally,
                      std::chrono::nanoseconds time_to_first_token) noexcept = 0;
};
// A value that settles its stages when it ends, not when the call returns it: weir::stream.
template <class T>
concept settles_at_stream_end = requires(T& t, std::unique_ptr<stream_settler> p) {
  t.on_end(std::move(p));
};
}  // namespace detail

// What a stage's exit decided.
struct stage_action {
  std::optional<std::chrono::nanoseconds> retry_after{};  // run the inside again after this wait
  std::exception_ptr replace{};                           // the call now fails with this
};

// Handed to the exits of stages that declare `values_succeed` instead of an outcome, when the
// call returned a value and nothing in the pipeline can judge a value a failure.
struct plain_success {
  static constexpr bool has_value() noexcept { return true; }
  static constexpr bool reached_provider() noexcept { return true; }
  static constexpr bool refused_locally() noexcept { return false; }
};
template <class O>
inline constexpr bool is_plain_success = std::is_same_v<O, plain_success>;

// What a stage sees of one call, one attempt at a time.
template <class Clock = std::chrono::steady_clock>
struct stage_context {
  using time_point = typename Clock::time_point;

  const basic_call_context<Clock>& call;
  const observer* watch = nullptr;  // null when nobody listens
  unsigned attempt = 1;
  time_point now{};  // when the stage is entered (the attempt's start, or the end of the last
                     // wait before it), for stages that declare reads_clock
  verdict judged = verdict::success;  // for stages that declare reads_verdict, before exit
  // The call's value already went to the caller: a stream settling at its end (see stream.hpp).
  // Nothing can run it again, so no stage may ask to.
  bool delivered = false;
  // Of a stream settling at its end: how it ended and what its chunks told (its tokens are in
  // `call`'s actual ones already). Null otherwise.
  const stream_settled* stream = nullptr;
  // The call's trace id and this attempt's span id (zero without a trace context): every event
  // emitted here carries them.
  trace_ids trace{};

  bool listening() const noexcept { return watch != nullptr; }
  void emit(const event& e) const {
    if (!watch) return;
    if (trace)
      (*watch)(detail::with_trace(e, trace));
    else
      (*watch)(e);
  }
  // How long a wait may last before it would pass the call's deadline (nullopt: no deadline).
  std::optional<std::chrono::nanoseconds> max_wait(time_point at) const {
    if (!call.deadline) return std::nullopt;
    return std::max<std::chrono::nanoseconds>(std::chrono::nanoseconds(0), *call.deadline - at);
  }
};

// What every stage provides (see the top of this header for the optional parts).
template <class S, class Clock = std::chrono::steady_clock>
concept stage = std::copy_constructible<S> && std::default_initializable<typename S::slot> &&
    requires(S& s, typename S::slot& slot, stage_context<Clock>& context,
             const outcome<int>& result) {
  { s.try_enter(slot, context) } -> std::convertible_to<bool>;
  { s.exit(slot, context, result) } -> std::same_as<stage_action>;
};

// A policy that has a stage: `pipeline(policy)` uses `policy.stage()`.
template <class P>
concept has_stage = requires(const P& p) {
  p.stage();
};

namespace detail {
// The error code a failure carries, if it is a system_error (weir's exceptions are).
inline std::optional<error_code> weir_code(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return x.code();
  } catch (...) {
    return std::nullopt;
  }
}
}  // namespace detail

// A limiter's refusal on the way in, with words, as a local refusal.
[[noreturn]] inline void throw_refusal(error_code ec, const char* who,
                                       std::optional<std::chrono::nanoseconds> retry_after = {}) {
  if (ec.category() != error_category()) throw boost::system::system_error(ec);
  throw weir::exception::refusal(ec, who, ec == error::rate_limited ? retry_after : std::nullopt);
}

}  // namespace weir
