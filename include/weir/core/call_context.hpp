// What the caller tells the policies about one call — its estimated tokens, the real ones once
// known, its priority, deadline, operation and tenant — and what a call costs the limiters:
//
//     weir::call_context ctx{.tokens = 1200, .deadline = clock::now() + 30s, .operation = "chat"};
//     auto reply = co_await guarded(ctx, [&] { return send(request); });
//
// Stages read it through their stage_context (stage.hpp); the router reads its constraints.
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/trace.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string_view>

namespace weir {

// A request_queue admits waiters of a higher priority first; within one priority, in arrival
// order.
enum class priority { interactive = 0, normal = 1, batch = 2 };

namespace detail {
// a + b, or the largest count when that would wrap: two huge estimates must not add up to a
// small one that passes a limit.
constexpr std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) noexcept {
  return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}
}  // namespace detail

// What one call costs (or, after settle, cost) on each dimension.
struct usage {
  std::uint64_t requests = 1;
  std::uint64_t tokens = 0;  // input + output
  std::uint64_t input_tokens = 0;
  std::uint64_t output_tokens = 0;

  friend bool operator==(const usage&, const usage&) = default;
};

namespace detail {
// What a call used, settled: the one rule of the limiter stage, the usage monitor and the router.
// Nothing when it was never sent; what it reported when it said (for the router, as the provider
// counts it); else its estimate when it may have used tokens (it succeeded, or was given up once
// sent: cancelled, or cut short by its deadline), and only the request when it failed without
// saying: a refusal or an error that reports no usage used no tokens.
inline usage settled_usage(bool sent, const std::optional<usage>& reported, bool maybe_used,
                           const usage& estimate) {
  if (!sent) return {.requests = 0};
  if (reported) return *reported;
  return maybe_used ? estimate : usage{.requests = estimate.requests};
}
}  // namespace detail

// Tokens a response says it used. input_tokens counts every input token, those read from or
// written to the provider's prompt cache among them (OpenAI reports it so; Anthropic's
// input_tokens leaves both out, and weir::http::reported_usage adds them back).
struct token_usage {
  std::uint64_t input_tokens = 0;
  std::uint64_t output_tokens = 0;
  std::uint64_t cache_read_tokens = 0;   // of input_tokens: read from the prompt cache
  std::uint64_t cache_write_tokens = 0;  // of input_tokens: written to it
};

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
  // Of the actual input tokens, those read from and written to the provider's prompt cache:
  // spend budgets charge them at their own prices.
  std::optional<std::uint64_t> actual_cache_read_tokens{};
  std::optional<std::uint64_t> actual_cache_write_tokens{};
  weir::priority priority = weir::priority::normal;  // for request_queue
  // The call's deadline, kept by every stage and the router: nothing is sent after it and the
  // call ends by it. A call whose deadline has passed is refused (timeout) before any stage is
  // entered. A limiter wait that would end past it fails at once with rate_limited; a queue wait
  // (or any stage's) still going on when it passes fails with timeout: local refusals, nothing
  // was sent. A retry's backoff that would reach it is not waited: the call fails with timeout,
  // the last failure its cause. The call itself, hedges included, is cancelled when it passes
  // and fails with timeout.
  std::optional<typename Clock::time_point> deadline{};
  std::string_view operation{};  // named in events; never a request body or a key
  // Whose call this is (a tenant, user or API key's name): the key of keyed limits and budgets,
  // and the flow a fair request_queue shares its slots between. Never put a secret here.
  std::string_view tenant{};
  // The caller's trace (trace.hpp): each attempt is a span of it, with a span id of its own that
  // the operation may send (an operation callable as op(const trace_context&) is given the
  // attempt's context) and that the call's events carry. The default: none, nothing is sent.
  trace_context trace{};

  // What the call costs the limiters: the estimate.
  usage estimated_usage() const {
    return {.requests = 1,
            .tokens = tokens ? tokens : detail::saturating_add(input_tokens, output_tokens),
            .input_tokens = input_tokens,
            .output_tokens = output_tokens};
  }
  // Whether the call said what it used (any of its actual counts).
  bool reported_usage() const noexcept {
    return actual_tokens || actual_input_tokens || actual_output_tokens;
  }
  // Whether `result`, a failure, is this call's deadline passing while it ran: the caller
  // stopped waiting, which says nothing of the provider. The breaker and the pacing take it as no
  // answer; a provider's slowness is judged by a timeout of its own (its client's, or a timeout
  // stage's), never by how long each caller is willing to wait.
  template <class Outcome>
  bool cut_by_deadline(const Outcome& result) const {
    return deadline && result.code() == error::timeout && Clock::now() >= *deadline;
  }
  // What it really used, where the call said so; `estimate` elsewhere.
  usage actual_usage(const usage& estimate) const {
    usage u = estimate;
    if (actual_input_tokens) u.input_tokens = *actual_input_tokens;
    if (actual_output_tokens) u.output_tokens = *actual_output_tokens;
    if (actual_tokens)
      u.tokens = *actual_tokens;
    else if (actual_input_tokens || actual_output_tokens)
      u.tokens = detail::saturating_add(u.input_tokens, u.output_tokens);
    return u;
  }
};
using call_context = basic_call_context<>;

}  // namespace weir
