// Which model a request goes to: pure functions of what the router knows at one instant, so that
// every rule can be tested without coroutines, servers or a clock. The router reads its live
// state (cooldowns, breakers, limits, latencies) into these and acts on the answer.
#pragma once

#include <weir/detail/small_buffer.hpp>
#include <weir/routing/types.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace weir::routing {

// What a route's constraints cost on each limited dimension.
template <class Clock>
usage cost_of(const basic_route_constraints<Clock>& c) {
  return {.requests = 1,
          .tokens = weir::detail::saturating_add(c.input_tokens, c.output_tokens),
          .input_tokens = c.input_tokens,
          .output_tokens = c.output_tokens};
}

// The context window a request needs: what it asks for, and at least its own tokens.
template <class Clock>
std::uint64_t fitting_context(const basic_route_constraints<Clock>& c) {
  return std::max(c.min_context, weir::detail::saturating_add(c.input_tokens, c.output_tokens));
}

// What selection reads of one model.
template <class Clock = std::chrono::steady_clock>
struct model_view {
  const model_spec* spec = nullptr;
  // The largest request its token limit could ever admit (its limit per minute).
  std::uint64_t max_request_tokens = std::numeric_limits<std::uint64_t>::max();
  std::chrono::nanoseconds latency{0};  // its smoothed latency; zero before the first answer
  const usage_monitor<Clock>* monitor = nullptr;
  std::uint64_t cached_input_tokens = 0;  // of this request's input, in its prompt cache
};

// Whether the model could ever take the request, whatever its load: capable and large enough,
// its provider allowed, within the price, and the request within its token limit.
template <class Clock>
bool fits(const model_view<Clock>& m, const basic_route_constraints<Clock>& c,
          std::uint64_t min_context) {
  const auto listed = [](const std::vector<std::string_view>& names, std::string_view name) {
    return std::find(names.begin(), names.end(), name) != names.end();
  };
  const auto& s = *m.spec;
  if (s.capability < c.min_capability) return false;
  if (s.context_window != 0 && s.context_window < min_context) return false;
  if (!c.allowed_providers.empty() && !listed(c.allowed_providers, s.provider)) return false;
  if (listed(c.excluded_providers, s.provider)) return false;
  if (!c.allowed_models.empty() && !listed(c.allowed_models, s.id)) return false;
  if (c.max_cost && s.cost(c.input_tokens, c.output_tokens) > *c.max_cost) return false;
  return weir::detail::saturating_add(c.input_tokens, c.output_tokens) <= m.max_request_tokens;
}

// How long before a model may be tried, its limits aside: the longest of its provider's and its
// own cooldown, its breaker's time until it admits (nullopt: closed) and, for a batch request,
// its pacing delay (nullopt: not a batch request).
inline std::chrono::nanoseconds blocked_for(std::chrono::nanoseconds provider_cooldown,
                                            std::chrono::nanoseconds model_cooldown,
                                            std::optional<std::chrono::nanoseconds> breaker_wait,
                                            std::optional<std::chrono::nanoseconds> pacing) {
  return std::max({std::chrono::nanoseconds::zero(), provider_cooldown, model_cooldown,
                   breaker_wait.value_or(std::chrono::nanoseconds::zero()),
                   pacing.value_or(std::chrono::nanoseconds::zero())});
}

// Every model of a catalog, ranked for one request at one instant.
struct ranking {
  static constexpr double unranked = std::numeric_limits<double>::infinity();

  explicit ranking(std::size_t models) : scores(models, unranked) {}

  // Per model: its strategy score if it may be tried now (lower is better), else unranked.
  detail::small_buffer<double, 32> scores;
  // Among the capable models not ready now, the shortest wait (max: none will be).
  std::chrono::nanoseconds earliest = std::chrono::nanoseconds::max();
  bool any_capable = false;  // some model fits the request, ready or not
};

// Ranks the models for `c` at `now`; `view_of(i)` gives model i as selection sees it. A model
// is skipped when it was tried (`tried[i]`) or cannot fit; it waits when `not_before[i]` (clock
// nanoseconds: when this request may try it again) or `blocked(i)` is ahead; the others are
// scored by `strategy` (a NaN score ranks last).
template <class Clock, std::invocable<std::size_t> ViewOf, class Blocked>
void rank(ranking& r, ViewOf&& view_of, const basic_route_constraints<Clock>& c,
          std::uint64_t min_context, std::span<const char> tried,
          std::span<const std::int64_t> not_before, typename Clock::time_point now,
          const basic_strategy<Clock>& strategy, Blocked&& blocked) {
  const auto score = r.scores.span();
  const auto now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch());
  for (std::size_t i = 0; i < score.size(); ++i) {
    if (tried[i]) continue;
    const model_view<Clock> m = view_of(i);
    if (!fits(m, c, min_context)) continue;
    r.any_capable = true;
    const auto own = std::chrono::nanoseconds(not_before[i]) - now_ns;
    if (const auto wait = std::max(own, blocked(i)); wait > std::chrono::nanoseconds::zero()) {
      r.earliest = std::min(r.earliest, wait);
      continue;
    }
    const basic_candidate<Clock> candidate{
        .model = *m.spec,
        .estimated_cost = m.spec->cost(c.input_tokens, c.output_tokens),
        .latency = m.latency,
        .monitor = m.monitor,
        .now = now,
        .cached_input_tokens = std::min(m.cached_input_tokens, c.input_tokens)};
    const double s = strategy(candidate);
    score[i] = std::isnan(s) ? ranking::unranked : s;
  }
}

// The same over views held in a span.
template <class Clock, class Blocked>
void rank(ranking& r, std::span<const model_view<Clock>> models,
          const basic_route_constraints<Clock>& c, std::uint64_t min_context,
          std::span<const char> tried, std::span<const std::int64_t> not_before,
          typename Clock::time_point now, const basic_strategy<Clock>& strategy,
          Blocked&& blocked) {
  rank<Clock>(
      r, [&](std::size_t i) { return models[i]; }, c, min_context, tried, not_before, now, strategy,
      std::forward<Blocked>(blocked));
}

// The best-ranked model that takes the request, trying them best first (ties: the first in the
// catalog). `take(i)` answers zero when model i took it (its limits charged), or how long until
// it could; those waits lower `r.earliest`. nullopt: none took it.
template <class Take>
std::optional<std::size_t> choose(ranking& r, Take&& take) {
  const auto score = r.scores.span();
  for (;;) {
    const auto best = std::min_element(score.begin(), score.end());
    if (best == score.end() || *best == ranking::unranked) return std::nullopt;
    const auto i = static_cast<std::size_t>(best - score.begin());
    const std::chrono::nanoseconds wait = take(i);
    if (wait <= std::chrono::nanoseconds::zero()) return i;
    r.earliest = std::min(r.earliest, wait);
    *best = ranking::unranked;
  }
}

}  // namespace weir::routing
