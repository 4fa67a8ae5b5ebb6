// Everything a pipeline does, as typed events for one observer. With no observer attached a
// pipeline builds no event and reads no clock for one. Every event has a `trace`: the trace id
// and the attempt's span id of a call that carries a trace context (trace.hpp), zero otherwise.
//
//     auto guarded = weir::pipeline(weir::pipeline_options{
//         .watch = [](const weir::event& e) { fmt::print("{}\n", e); }}, retry, limits);
#pragma once

#include <weir/core/breaker_state.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/trace.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

namespace weir {

// Why a policy refused a call without trying it.
enum class rejection {
  queue_full,
  circuit_open,
  budget_exhausted,
  rate_limited,
  shut_down,
  evicted,
  over_budget
};
inline constexpr std::size_t rejection_kinds = 7;

struct attempt_started {
  std::string_view operation;
  unsigned attempt = 1;
  trace_ids trace{};
};
struct attempt_succeeded {
  std::string_view operation;
  unsigned attempt = 1;
  std::chrono::nanoseconds latency{0};
  trace_ids trace{};
};
struct attempt_failed {
  std::string_view operation;
  unsigned attempt = 1;
  std::chrono::nanoseconds latency{0};
  verdict kind = verdict::retryable;
  trace_ids trace{};
};
struct retry_scheduled {
  std::string_view operation;
  unsigned attempt = 1;  // the attempt that failed
  std::chrono::nanoseconds delay{0};
  verdict cause = verdict::retryable;
  std::string_view policy{};  // the retry's name
  trace_ids trace{};
};
struct throttled {
  std::string_view operation;
  std::chrono::nanoseconds wait{0};  // how long a limiter or the queue held the call
  std::string_view policy{};         // which one: its name
  trace_ids trace{};
};
struct rejected {
  std::string_view operation;
  rejection reason = rejection::queue_full;
  std::optional<std::chrono::nanoseconds> retry_after{};
  std::string_view policy{};  // the name of the policy that refused
  trace_ids trace{};
};
struct server_rate_limited {
  std::string_view operation;
  rate_limit_hint hint{};
  trace_ids trace{};
};
// A breaker's state changed; with from == to, its state when it is first reported (the router
// reports each of its breakers so when it is built).
struct breaker_changed {
  std::string_view operation;
  breaker_state from = breaker_state::closed;
  breaker_state to = breaker_state::open;
  std::string_view policy{};  // the breaker's name
  trace_ids trace{};
};

// The router sent (or is about to send) attempt `attempt` of a request to this model.
struct route_chosen {
  std::string_view operation;
  std::string_view provider;
  std::string_view model;
  unsigned attempt = 1;
  double estimated_cost = 0;  // USD, at the request's token estimates
  trace_ids trace{};
};
// The router stops sending to a model (or, with an empty model, to every model of the provider)
// for `duration`: the server said its quota is exhausted until then.
struct provider_cooling {
  std::string_view operation;
  std::string_view provider;
  std::chrono::nanoseconds duration{0};
  std::string_view model{};
  trace_ids trace{};
};
// The router takes a model (or, with an empty model, every model of the provider) out of its
// routes: the provider said a quota or the account's credit is spent. For `out_for`, the quota's
// reset as the provider's rule says; nullopt: until router::restore(). One to page on.
struct provider_exhausted {
  std::string_view operation;
  std::string_view provider;
  refusal_reason reason{};
  std::optional<std::chrono::nanoseconds> out_for{};
  std::string_view model{};
  trace_ids trace{};
};
// An attempt on this model failed and the router moves on to another candidate.
struct route_fallback {
  std::string_view operation;
  std::string_view provider;
  std::string_view model;
  verdict cause = verdict::retryable;
  bool context_exceeded = false;  // the request did not fit; a larger context window is needed
  bool refused_locally = false;   // the model's own stages had no room (queue full, budget spent)
  trace_ids trace{};
};

// The router lost (or found again) the fleet it shares what it learns with: while it is lost,
// the router routes on what it learned itself.
struct fleet_connection {
  std::string_view operation;
  bool reachable = false;
  trace_ids trace{};
};

// A spend budget's settled spend reached one of its alert thresholds in the current window.
struct budget_alert {
  std::string_view operation;  // empty: a budget's alert belongs to no one call
  std::string_view budget;     // the budget's name
  std::string_view key;        // whose spend: a tenant, a provider, or empty for overall
  double threshold = 1;        // the fraction of the limit crossed (0.5, 0.8, 1, ...)
  double spent = 0;            // USD settled in the window
  double limit = 0;            // USD
  trace_ids trace{};
};

// An adaptive concurrency limit moved (a window's latency against the no-load one, a drop, or a
// probe of the no-load latency starting or ending).
struct concurrency_changed {
  std::string_view operation;
  std::size_t from = 0;
  std::size_t to = 0;
  std::chrono::nanoseconds baseline{0};  // the no-load latency it compares with
  std::string_view policy{};
  trace_ids trace{};
};

// A fallback replaced a failure with its alternative.
struct fallback_used {
  std::string_view operation;
  verdict cause = verdict::retryable;  // the failure as the fallback's classifier judged it
  error_code code{};                   // its code, when it had one
  std::exception_ptr failure{};        // the failure itself; empty when it was a value (a 503)
  std::string_view policy{};
  trace_ids trace{};
};

// A hedge started beside a call's attempts still running.
struct hedge_started {
  std::string_view operation;
  unsigned attempt = 1;               // 1 for the first hedge (0 is the call's first attempt)
  std::chrono::nanoseconds after{0};  // since the call began
  std::string_view policy{};
  trace_ids trace{};
};

// How a stream that left a pipeline or the router ended.
enum class stream_end {
  completed,  // its last chunk came
  broken,     // it failed after its first chunk (reset, stall past the idle timeout, deadline)
  abandoned,  // the caller stopped reading (closed, cancelled or destroyed it) before the end
};
// Where a stream's settled tokens came from.
enum class usage_source {
  reported,   // the stream's final usage chunk
  counted,    // output counted chunk by chunk; input the reported or estimated figure
  estimated,  // nothing was known: the call's estimate
};

// A stream ended and its stages (or route) settled it.
struct stream_ended {
  std::string_view operation;
  stream_end how = stream_end::completed;
  std::uint64_t chunks = 0;
  std::uint64_t tokens = 0;  // what was settled: input + output
  usage_source source = usage_source::estimated;
  std::chrono::nanoseconds time_to_first_token{0};
  trace_ids trace{};
};

// One call of the router to a model ended: a whole answer came (or the call failed), or a
// stream it returned ended. What OpenTelemetry's GenAI client metrics record; weir::metrics
// writes them as gen_ai_client_* series. Not sent for a call the model's own stages refused
// before sending.
struct model_call_ended {
  std::string_view operation;
  std::string_view provider;  // the catalog's name
  std::string_view model;     // the model requested
  // gen_ai.provider.name (provider_spec::gen_ai_name) and gen_ai.operation.name
  // (route_constraints::gen_ai_operation).
  std::string_view gen_ai_provider{};
  std::string_view gen_ai_operation{};
  std::string_view response_model{};     // as the response named it; empty when it did not
  std::string_view error_type{};         // error.type (see docs/metrics.md); empty: no error
  std::chrono::nanoseconds duration{0};  // sent to answered; for a stream, to its end
  std::optional<std::chrono::nanoseconds> time_to_first_chunk{};  // a stream's
  // What the provider reported (a stream's output: reported, else counted); nullopt: unknown.
  // Input counts every input token, those read from and written to the prompt cache among them.
  std::optional<std::uint64_t> input_tokens{};
  std::optional<std::uint64_t> output_tokens{};
  std::uint64_t cache_read_tokens = 0;
  std::uint64_t cache_creation_tokens = 0;
  trace_ids trace{};
};

using event =
    std::variant<attempt_started, attempt_succeeded, attempt_failed, retry_scheduled, throttled,
                 rejected, server_rate_limited, breaker_changed, route_chosen, provider_cooling,
                 route_fallback, fleet_connection, budget_alert, concurrency_changed, fallback_used,
                 hedge_started, stream_ended, provider_exhausted, model_call_ended>;

// Any callable taking the event; empty means nobody is listening.
using observer = std::function<void(const event&)>;

namespace detail {
// `e`, stamped with the ids of the call's trace and attempt unless it carries its own.
inline event with_trace(event e, const trace_ids& ids) {
  std::visit(
      [&](auto& v) {
        if (!v.trace) v.trace = ids;
      },
      e);
  return e;
}
}  // namespace detail

// One observer that hands every event to each of `observers` in turn.
template <class... Observers>
observer fan_out(Observers... observers) {
  return [... o = std::move(observers)](const event& e) { (o(e), ...); };
}

namespace detail {
inline double milliseconds(std::chrono::nanoseconds d) {
  return std::chrono::duration<double, std::milli>(d).count();
}
inline const char* name_of(verdict v) {
  switch (v) {
    case verdict::success: return "success";
    case verdict::retryable: return "retryable";
    case verdict::rate_limited: return "rate-limited";
    case verdict::fatal: return "fatal";
    case verdict::exhausted: return "exhausted";
  }
  return "?";
}
inline const char* name_of(rejection r) {
  switch (r) {
    case rejection::queue_full: return "queue full";
    case rejection::circuit_open: return "circuit open";
    case rejection::budget_exhausted: return "retry budget exhausted";
    case rejection::rate_limited: return "rate limited";
    case rejection::shut_down: return "shut down";
    case rejection::evicted: return "evicted";
    case rejection::over_budget: return "over budget";
  }
  return "?";
}
inline const char* name_of(stream_end e) {
  switch (e) {
    case stream_end::completed: return "completed";
    case stream_end::broken: return "broke";
    case stream_end::abandoned: return "was abandoned";
  }
  return "?";
}
inline const char* name_of(usage_source u) {
  switch (u) {
    case usage_source::reported: return "reported";
    case usage_source::counted: return "counted";
    case usage_source::estimated: return "estimated";
  }
  return "?";
}
inline std::string_view operation_or_call(std::string_view op) { return op.empty() ? "call" : op; }
}  // namespace detail

}  // namespace weir

template <>
struct fmt::formatter<weir::verdict> : fmt::formatter<fmt::string_view> {
  auto format(weir::verdict v, format_context& ctx) const {
    return fmt::formatter<fmt::string_view>::format(weir::detail::name_of(v), ctx);
  }
};

template <>
struct fmt::formatter<weir::rejection> : fmt::formatter<fmt::string_view> {
  auto format(weir::rejection r, format_context& ctx) const {
    return fmt::formatter<fmt::string_view>::format(weir::detail::name_of(r), ctx);
  }
};

// One readable line per event, e.g. "chat: retry 2 scheduled in 1500.0 ms (rate-limited)", and
// for a traced call " trace_id=<32 hex> span_id=<16 hex>" after it, to join other logs on.
template <>
struct fmt::formatter<weir::event> {
  constexpr auto parse(format_parse_context& ctx) { return ctx.begin(); }

  // Templates, so that only a program that formats an event instantiates these.
  template <class FormatContext>
  auto format(const weir::event& e, FormatContext& ctx) const {
    auto out = format_line(e, ctx);
    const auto& ids =
        std::visit([](const auto& v) -> const weir::trace_ids& { return v.trace; }, e);
    if (!ids) return out;
    char text[32 + 16];
    weir::detail::write_hex(ids.trace, text);
    out = fmt::format_to(out, " trace_id={}", std::string_view(text, 32));
    if (ids.span == weir::span_id{}) return out;
    weir::detail::write_hex(ids.span, text + 32);
    return fmt::format_to(out, " span_id={}", std::string_view(text + 32, 16));
  }

  // " by <policy>", when the event names one.
  static std::string by(std::string_view policy) {
    return policy.empty() ? std::string() : fmt::format(" by {}", policy);
  }

  template <class FormatContext>
  auto format_line(const weir::event& e, FormatContext& ctx) const {
    using namespace weir;  // the event types
    return std::visit(
        [&](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          const auto op = weir::detail::operation_or_call(v.operation);
          if constexpr (std::is_same_v<T, attempt_started>) {
            return fmt::format_to(ctx.out(), "{}: attempt {} started", op, v.attempt);
          } else if constexpr (std::is_same_v<T, attempt_succeeded>) {
            return fmt::format_to(ctx.out(), "{}: attempt {} succeeded in {:.1f} ms", op, v.attempt,
                                  weir::detail::milliseconds(v.latency));
          } else if constexpr (std::is_same_v<T, attempt_failed>) {
            return fmt::format_to(ctx.out(), "{}: attempt {} failed ({}) in {:.1f} ms", op,
                                  v.attempt, v.kind, weir::detail::milliseconds(v.latency));
          } else if constexpr (std::is_same_v<T, retry_scheduled>) {
            return fmt::format_to(ctx.out(), "{}: retry {} scheduled in {:.1f} ms ({})", op,
                                  v.attempt + 1, weir::detail::milliseconds(v.delay), v.cause);
          } else if constexpr (std::is_same_v<T, throttled>) {
            return fmt::format_to(ctx.out(), "{}: throttled for {:.1f} ms{}", op,
                                  weir::detail::milliseconds(v.wait), by(v.policy));
          } else if constexpr (std::is_same_v<T, rejected>) {
            if (v.retry_after)
              return fmt::format_to(ctx.out(), "{}: rejected ({}){}, retry after {:.1f} ms", op,
                                    v.reason, by(v.policy),
                                    weir::detail::milliseconds(*v.retry_after));
            return fmt::format_to(ctx.out(), "{}: rejected ({}){}", op, v.reason, by(v.policy));
          } else if constexpr (std::is_same_v<T, server_rate_limited>) {
            if (v.hint.retry_after)
              return fmt::format_to(ctx.out(),
                                    "{}: rate limited by the server, retry after {:.1f} ms", op,
                                    weir::detail::milliseconds(*v.hint.retry_after));
            return fmt::format_to(ctx.out(), "{}: rate limited by the server", op);
          } else if constexpr (std::is_same_v<T, breaker_changed>) {
            if (v.from == v.to)
              return fmt::format_to(
                  ctx.out(), "{}: circuit breaker {}{}", op, v.to,
                  v.policy.empty() ? std::string() : fmt::format(" ({})", v.policy));
            return fmt::format_to(
                ctx.out(), "{}: circuit breaker {} -> {}{}", op, v.from, v.to,
                v.policy.empty() ? std::string() : fmt::format(" ({})", v.policy));
          } else if constexpr (std::is_same_v<T, route_chosen>) {
            return fmt::format_to(ctx.out(), "{}: attempt {} routed to {}/{} (est. ${:.6f})", op,
                                  v.attempt, v.provider, v.model, v.estimated_cost);
          } else if constexpr (std::is_same_v<T, provider_cooling>) {
            if (!v.model.empty())
              return fmt::format_to(ctx.out(), "{}: {}/{} cooling down for {:.1f} ms", op,
                                    v.provider, v.model, weir::detail::milliseconds(v.duration));
            return fmt::format_to(ctx.out(), "{}: provider {} cooling down for {:.1f} ms", op,
                                  v.provider, weir::detail::milliseconds(v.duration));
          } else if constexpr (std::is_same_v<T, provider_exhausted>) {
            const auto who = v.model.empty() ? fmt::format("provider {}", v.provider)
                                             : fmt::format("{}/{}", v.provider, v.model);
            const auto why = fmt::format("{} ({} {})", weir::detail::name_of(v.reason.cause),
                                         weir::detail::name_of(v.reason.shape), v.reason.code);
            if (v.out_for)
              return fmt::format_to(ctx.out(), "{}: {} out for {:.1f} s: {}", op, who,
                                    std::chrono::duration<double>(*v.out_for).count(), why);
            return fmt::format_to(ctx.out(), "{}: {} out until restored: {}", op, who, why);
          } else if constexpr (std::is_same_v<T, concurrency_changed>) {
            return fmt::format_to(ctx.out(), "{}: concurrency limit {} -> {} (no-load {:.1f} ms){}",
                                  op, v.from, v.to, weir::detail::milliseconds(v.baseline),
                                  by(v.policy));
          } else if constexpr (std::is_same_v<T, hedge_started>) {
            return fmt::format_to(ctx.out(), "{}: hedge {} after {:.1f} ms{}", op, v.attempt,
                                  weir::detail::milliseconds(v.after), by(v.policy));
          } else if constexpr (std::is_same_v<T, stream_ended>) {
            return fmt::format_to(
                ctx.out(), "{}: stream {} after {} chunks (first in {:.1f} ms), {} tokens {}", op,
                weir::detail::name_of(v.how), v.chunks,
                weir::detail::milliseconds(v.time_to_first_token), v.tokens,
                weir::detail::name_of(v.source));
          } else if constexpr (std::is_same_v<T, fallback_used>) {
            // The code's message only: an exception's own text may quote a request.
            if (v.code)
              return fmt::format_to(ctx.out(), "{}: {} failure ({}), fallback{}", op, v.cause,
                                    v.code.message(), by(v.policy));
            return fmt::format_to(ctx.out(), "{}: {} failure, fallback{}", op, v.cause,
                                  by(v.policy));
          } else if constexpr (std::is_same_v<T, budget_alert>) {
            return fmt::format_to(ctx.out(), "budget {}{}{}: ${:.4f} of ${:.2f} spent ({:.0f}%)",
                                  v.budget, v.key.empty() ? "" : " for ", v.key, v.spent, v.limit,
                                  v.threshold * 100);
          } else if constexpr (std::is_same_v<T, model_call_ended>) {
            auto out = fmt::format_to(ctx.out(), "{}: {}/{} {} in {:.1f} ms", op, v.provider,
                                      v.model, v.error_type.empty() ? "answered" : v.error_type,
                                      weir::detail::milliseconds(v.duration));
            if (v.input_tokens || v.output_tokens)
              out = fmt::format_to(out, ", {} in + {} out tokens", v.input_tokens.value_or(0),
                                   v.output_tokens.value_or(0));
            return out;
          } else if constexpr (std::is_same_v<T, fleet_connection>) {
            return fmt::format_to(ctx.out(), "{}: {}", op,
                                  v.reachable ? "the fleet is reachable again"
                                              : "the fleet is unreachable: routing on local state");
          } else {
            static_assert(std::is_same_v<T, route_fallback>);
            if (v.context_exceeded)
              return fmt::format_to(ctx.out(),
                                    "{}: {}/{} context window too small, trying a larger one", op,
                                    v.provider, v.model);
            if (v.refused_locally)
              return fmt::format_to(ctx.out(), "{}: {}/{} has no room here, falling back", op,
                                    v.provider, v.model);
            return fmt::format_to(ctx.out(), "{}: {}/{} failed ({}), falling back", op, v.provider,
                                  v.model, v.cause);
          }
        },
        e);
  }
};
