// The router's vocabulary: what a caller asks of a route, what it gets back, the router's
// options and the state it reports.
#pragma once

#include <weir/core/call_context.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/trace.hpp>
#include <weir/failure/backoff.hpp>
#include <weir/failure/retry_budget.hpp>
#include <weir/http/adaptation.hpp>
#include <weir/routing/catalog.hpp>
#include <weir/routing/fleet.hpp>
#include <weir/routing/strategy.hpp>
#include <weir/throttling/spend_budget.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace weir::routing {

// What the caller asks of a route. Token counts are estimates; the router settles them against
// the real usage when the response tells it (router_options::usage_of).
template <class Clock = std::chrono::steady_clock>
struct basic_route_constraints {
  std::uint64_t input_tokens = 0;
  std::uint64_t output_tokens = 0;  // e.g. max_tokens
  double min_capability = 0;
  std::uint64_t min_context = 0;  // context window needed; at least input + output tokens
  std::vector<std::string_view> allowed_providers{};  // empty: any
  std::vector<std::string_view> excluded_providers{};
  std::optional<double> max_cost{};  // USD for this request at the estimates
  // batch requests also hold back near a model's limit (usage_monitor::pacing_delay), leaving
  // the last of the quota to interactive and normal ones.
  weir::priority priority = weir::priority::normal;
  std::optional<typename Clock::time_point> deadline{};  // no wait may end past it
  bool wait_for_capacity = true;  // false: fail at once when no model has room now
  std::string_view operation{};   // named in events; never a request body or a key
  std::string_view tenant{};      // whose request: the key of per-tenant spend budgets
  // The conversation (or agent) this request continues, whose earlier requests the providers
  // may have cached: the router remembers where each session went, for cache_affinity. Empty:
  // none. Never put a secret here.
  std::string_view session{};
  // gen_ai.operation.name in the GenAI metrics: a well-known value of the conventions ("chat",
  // "text_completion", "embeddings", "generate_content") where one applies.
  std::string_view gen_ai_operation = "chat";
  // The caller's trace (weir/core/trace.hpp): each attempt is a new span of it, whose context a
  // provider connected with a traced_provider_call sends, and whose ids the route's events
  // carry. The default: none, nothing is sent.
  trace_context trace{};
  // Only models with one of these ids (of any provider); empty: any. A gateway's client names
  // the model it wants.
  std::vector<std::string_view> allowed_models{};
};
using route_constraints = basic_route_constraints<>;

// One attempt of a route.
struct route_step {
  std::string provider;
  std::string model;
  verdict result = verdict::success;
  std::chrono::nanoseconds latency{0};
};

// How a request was served.
struct route_record {
  std::string provider;  // the model that answered
  std::string model;
  unsigned attempts = 0;
  std::vector<route_step> steps;       // every attempt, in order
  std::chrono::nanoseconds waited{0};  // time spent waiting for a model to have room
  std::uint64_t estimated_tokens = 0;
  std::uint64_t settled_tokens = 0;  // what the response reported, or the estimate
  // Of the input the response reported, read from and written to the provider's prompt cache
  // (a stream's are in its tally, at its end).
  std::uint64_t cache_read_tokens = 0;
  std::uint64_t cache_write_tokens = 0;
  double cost = 0;  // USD at the settled tokens, cached ones at the cache's prices
};

template <class Response>
struct routed {
  Response response;
  route_record route;
};

// Classifier: what judges the providers' responses (weir::http::response_classifier for Beast).
template <class Response, class Clock = std::chrono::steady_clock,
          class Classifier = default_classifier>
struct basic_router_options {
  basic_strategy<Clock> strategy = strategies::cheapest<Clock>();
  unsigned max_attempts = 4;  // attempts per request, over all models
  // The wait before a model that failed retryably (a 5xx, a reset, a timeout) is tried again for
  // the same request, once no other capable model is left to try.
  weir::backoff retry_backoff =
      weir::backoff::exponential(std::chrono::milliseconds(200), 2.0, std::chrono::seconds(5))
          .with(weir::jitter::full);
  observer watch{};  // router and breaker events; empty: none built
  // The tokens a response reports; without it the estimates are kept.
  std::function<std::optional<token_usage>(const Response&)> usage_of{};
  // The model a response says answered (gen_ai.response.model in the GenAI metrics:
  // "gpt-4o-2024-08-06" for "gpt-4o"); for a stream, read when it is returned. Empty, or an empty
  // answer: not known.
  std::function<std::string(const Response&)> response_model_of{};
  // Whether a fatal outcome means "the request does not fit this model's context": such a
  // request is retried on a model with a larger context window instead of failing.
  std::function<bool(const outcome<Response>&)> context_exceeded{};
  // Shared across routes (and routers, if you like): every route deposits, every attempt after
  // a route's first withdraws; an empty budget ends the route with budget_exhausted. Bounds what
  // fallbacks add when everything fails.
  std::optional<retry_budget> fallback_budget{};
  double latency_smoothing = 0.2;  // weight of the newest sample in the latency average
  std::chrono::nanoseconds usage_window = std::chrono::minutes(1);
  double slow_down_above = 0.8;  // utilization where batch requests start to hold back
  // How each model's limits follow what its server reports, and find a request limit the catalog
  // leaves out (slow start from adaptation_options::initial_rate). nullopt: the limits stay as
  // the catalog gives them, and a model without limits is not paced at all.
  std::optional<http::adaptation_options> adaptation = http::adaptation_options{};
  Classifier classifier{};
  // Shares cooldowns, breaker openings and learned limits with the other routers of a fleet,
  // and reads theirs before each selection (one round trip). Unreachable, the router goes on
  // with its own state and says so (fleet_connection events). Empty: this process alone.
  std::shared_ptr<routing::fleet> fleet{};
  // Spend budgets every route is charged to, each keyed by the route's tenant, the model's
  // provider or nothing, as its scope says. A model whose estimated cost would pass one is
  // skipped for one that fits (the strategy still orders those); when none fits, the route fails
  // at once with over_budget, retry_after saying when the first has room. What is charged: the
  // reported usage, else the estimate for a success or a cancelled call, nothing for a failure
  // that reports none (providers do not bill those) or a call never sent.
  std::vector<spend_budget<Clock>> budgets{};
  // How long a model stays out once its provider said a quota or the account's credit is spent
  // and did not say when it comes back (OpenAI insufficient_quota, a 402). nullopt: until
  // router::restore().
  std::optional<std::chrono::nanoseconds> exhausted_for{};
};
template <class Response>
using router_options = basic_router_options<Response>;

// A model's state as the router sees it now, for dashboards.
struct model_status {
  std::string_view provider;
  std::string_view model;
  double requests_per_minute = 0;  // in the last usage window
  double tokens_per_minute = 0;
  double utilization = 0;  // of the model's own limits, 0..1+
  std::uint64_t rate_limited = 0;
  std::uint64_t errors = 0;
  breaker_state breaker = breaker_state::closed;
  // Left of the model's (or its provider's) cooldown, or of its time out for a spent quota
  // (nanoseconds::max(): until router::restore()).
  std::chrono::nanoseconds cooling{0};
  std::chrono::nanoseconds latency{0};
  // The limits in force, per minute: given in the catalog, reported by the server, or (for
  // requests, while no one said) where discovery found refusals begin. nullopt: unknown.
  std::optional<double> requests_limit{};
  std::optional<double> tokens_limit{};
  bool discovering = false;  // slow start: no refusal seen and no limit known yet
};

}  // namespace weir::routing
