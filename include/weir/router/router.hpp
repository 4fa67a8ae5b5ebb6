// Sends each request to the best model that can serve it now: capable enough, big enough, within
// price, with room in its limits, its provider's circuit closed and not cooling down. On a 429 it
// falls back; a model whose quota the server says is spent cools down exactly as long as the
// server said. When nothing has room it waits for the first model that will (within the deadline)
// or says when that will be.
//
//     weir::router<my_request, my_response> router(io.get_executor(), catalog);
//     router.connect("openai", [&](const weir::model_spec& m, const my_request& r) {
//       return openai_client.complete(m.id, r);  // an asio::awaitable<my_response>
//     });
//     auto [response, route] = co_await router.route(
//         request, {.input_tokens = 900, .output_tokens = 300, .min_capability = 7});
#pragma once

#include <weir/circuit_breaker.hpp>
#include <weir/error.hpp>
#include <weir/events.hpp>
#include <weir/http/adaptation.hpp>
#include <weir/outcome.hpp>
#include <weir/rate_limits.hpp>
#include <weir/request_queue.hpp>
#include <weir/retry_budget.hpp>
#include <weir/router/catalog.hpp>
#include <weir/router/strategy.hpp>
#include <weir/usage_monitor.hpp>

#include <fmt/format.h>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace weir {

namespace detail {
// N elements inline, more on the heap: selection among a usual catalog allocates nothing.
template <class T, std::size_t N>
class small_buffer {
 public:
  small_buffer(std::size_t n, T value) {
    if (n <= N) {
      std::fill_n(inline_.begin(), n, value);
      view_ = {inline_.data(), n};
    } else {
      heap_.assign(n, value);
      view_ = heap_;
    }
  }
  small_buffer(const small_buffer&) = delete;
  small_buffer& operator=(const small_buffer&) = delete;

  std::span<T> span() const noexcept { return view_; }

 private:
  std::array<T, N> inline_;
  std::vector<T> heap_;
  std::span<T> view_;
};
}  // namespace detail

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
  double cost = 0;                   // USD at the settled tokens
};

template <class Response>
struct routed {
  Response response;
  route_record route;
};

template <class Response, class Clock = std::chrono::steady_clock>
struct basic_router_options {
  basic_strategy<Clock> strategy = strategies::cheapest<Clock>();
  unsigned max_attempts = 4;  // attempts per request, over all models
  observer watch{};           // router and breaker events; empty: none built
  // The tokens a response reports; without it the estimates are kept.
  std::function<std::optional<token_usage>(const Response&)> usage_of{};
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
  std::chrono::nanoseconds cooling{0};  // left of the model's (or its provider's) cooldown
  std::chrono::nanoseconds latency{0};
  // The limits in force, per minute: given in the catalog, reported by the server, or (for
  // requests, while no one said) where discovery found refusals begin. nullopt: unknown.
  std::optional<double> requests_limit{};
  std::optional<double> tokens_limit{};
  bool discovering = false;  // slow start: no refusal seen and no limit known yet
};

// Copies share one router. The router must outlive the routes it runs (as an Asio I/O object).
// Classifier judges the providers' responses (weir::http::response_classifier for Beast).
template <class Request, class Response, class Clock = std::chrono::steady_clock,
          class Classifier = default_classifier>
class router {
  static_assert(!std::is_void_v<Response>, "a router returns the provider's response");

 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using executor_type = boost::asio::any_io_executor;
  using constraints = basic_route_constraints<Clock>;
  using options_type = basic_router_options<Response, Clock>;
  // Sends `request` to `model` (of this provider) and returns the response.
  using provider_call =
      std::function<boost::asio::awaitable<Response>(const model_spec&, const Request&)>;

  // Throws weir::exception(invalid_argument) for an empty catalog or bad options.
  router(executor_type ex, catalog models, options_type options = {}, Classifier classify = {})
      : state_(std::make_shared<state>(std::move(ex), std::move(models), std::move(options),
                                       std::move(classify))) {}

  // The callable that sends requests to one of the catalog's providers.
  void connect(std::string_view provider, provider_call call) {
    for (auto& p : state_->providers)
      if (p->spec->name == provider) {
        p->call = std::move(call);
        return;
      }
    throw weir::exception(error::invalid_argument,
                          fmt::format("router: no provider {} in the catalog", provider));
  }

  // Routes one request. Returns the response with its route record; a fatal response (e.g. an
  // HTTP 400 that is not a context overflow) is returned as it is. Throws weir::exception:
  //  - no_provider_available when no model meets the constraints, or none has room and waiting
  //    is not allowed or would pass the deadline; retry_after says when the first one frees up;
  //  - retries_exhausted when every attempt failed (cause: the last failure);
  //  - invalid_argument when the chosen provider was never connected;
  // and rethrows a fatal failure (cancellation among them) as it is.
  //
  //
  // g++ 12 relocates an *aggregate* temporary that sits inside a co_await expression bitwise after
  // building it, in any coroutine and for any callee, so a std::string in it then points into
  // the old place (a crash when it is freed). Nothing the callee does can repair the object it
  // is handed. `co_await router.route(request, {.input_tokens = 900})` is safe: the constraints
  // hold nothing that points into itself. For the request, name it first or give its type a
  // constructor (`chat_request("hi")`, not `chat_request{"hi"}`); tests/correctness_test.cpp
  // runs those spellings under ASan.
  boost::asio::awaitable<routed<Response>> route(Request request, constraints c) {
    return run(state_, std::move(request), std::move(c));
  }

  // Which model route() would choose now, without reserving anything (nullopt: none has room).
  std::optional<std::size_t> select(const constraints& c, time_point now = Clock::now()) const {
    detail::small_buffer<char, 32> tried(state_->models.size(), 0);
    detail::small_buffer<std::int64_t, 32> not_before(state_->models.size(), 0);
    return state_->pick(c, state_->fitting_context(c), tried.span(), not_before.span(), now, false)
        .model;
  }

  const catalog& models() const noexcept { return state_->catalog_; }

  std::vector<model_status> status(time_point now = Clock::now()) const {
    std::vector<model_status> out;
    for (const auto& m : state_->models) {
      const auto& p = *state_->providers[m->provider];
      const auto totals = m->monitor.totals(now);
      model_status s{.provider = m->spec->provider, .model = m->spec->id};
      s.requests_per_minute = m->monitor.requests_per_minute(now);
      s.tokens_per_minute = m->monitor.tokens_per_minute(now);
      s.utilization = m->monitor.utilization(now);
      s.rate_limited = totals.rate_limited;
      s.errors = totals.errors;
      s.breaker = p.breaker.state();
      s.cooling =
          std::max({std::chrono::nanoseconds::zero(), p.cooldown.left(now), m->cooldown.left(now)});
      s.latency = std::chrono::nanoseconds(m->latency_ns.load(std::memory_order_relaxed));
      const auto per_minute = [](weir::rate r) { return r.per_second * 60; };
      if (m->adapt) {
        const auto pacing = m->adapt->state();
        if (auto l = pacing.known ? pacing.known : pacing.ceiling)
          s.requests_limit = per_minute(*l);
        s.discovering = pacing.slow_start;
      } else if (m->limits) {
        if (auto l = m->limits->get_limit(dimension::requests))
          s.requests_limit = per_minute(l->rate);
      }
      if (m->limits)
        if (auto l = m->limits->get_limit(dimension::tokens)) s.tokens_limit = per_minute(l->rate);
      out.push_back(s);
    }
    return out;
  }

 private:
  using nanos = std::chrono::nanoseconds;

  // Until when the server said a quota is exhausted; only ever moves later.
  struct cooldown {
    nanos left(time_point now) const {
      return nanos(until_ns.load(std::memory_order_acquire)) -
             std::chrono::duration_cast<nanos>(now.time_since_epoch());
    }
    void extend_to(time_point until) {
      const auto ns = std::chrono::duration_cast<nanos>(until.time_since_epoch()).count();
      auto seen = until_ns.load(std::memory_order_relaxed);
      while (ns > seen && !until_ns.compare_exchange_weak(seen, ns, std::memory_order_acq_rel)) {
      }
    }

    std::atomic<std::int64_t> until_ns{0};  // clock epoch: long past
  };

  struct provider_entry {
    provider_entry(const provider_spec& s, circuit_breaker_options breaker_options)
        : spec(&s), breaker(std::move(breaker_options)) {}

    const provider_spec* spec;
    circuit_breaker<Clock> breaker;
    struct cooldown cooldown;  // for providers whose limits are per account
    provider_call call;
  };

  struct model_entry {
    model_entry(const model_spec& s, std::size_t p, const executor_type& ex, const options_type& o)
        : spec(&s),
          provider(p),
          monitor(usage_monitor_options{
              .window = o.usage_window,
              .buckets = 60,
              .requests_limit = s.requests_per_minute > 0
                                    ? std::optional(weir::per_minute(s.requests_per_minute))
                                    : std::nullopt,
              .tokens_limit = s.tokens_per_minute > 0
                                  ? std::optional(weir::per_minute(s.tokens_per_minute))
                                  : std::nullopt,
              .slow_down_above = o.slow_down_above}) {
      if (s.requests_per_minute <= 0 && s.tokens_per_minute <= 0 && !o.adaptation) return;
      rate_limits_options lo;
      if (s.requests_per_minute > 0) lo.requests = limit::per_minute(s.requests_per_minute);
      if (s.tokens_per_minute > 0) {
        // Six seconds' worth at once: strict servers refuse a minute-start spike. A larger
        // request waits for an empty limiter (see detail::reserve); one larger than the minute's
        // whole limit can never be served here and is not routed here.
        const auto burst = static_cast<std::uint64_t>(std::max(1.0, s.tokens_per_minute / 10));
        lo.tokens = limit{weir::per_minute(s.tokens_per_minute), burst};
        max_request_tokens = static_cast<std::uint64_t>(s.tokens_per_minute);
      }
      limits.emplace(ex, lo);
      if (o.adaptation) adapt.emplace(*limits, *o.adaptation);
    }

    const model_spec* spec;
    std::size_t provider;
    std::optional<rate_limits<Clock>> limits;
    std::optional<http::server_adaptation<Clock>> adapt;
    usage_monitor<Clock> monitor;
    std::uint64_t max_request_tokens = std::numeric_limits<std::uint64_t>::max();
    std::atomic<std::int64_t> latency_ns{0};
    struct cooldown cooldown;
  };

  struct pick_result {
    std::optional<std::size_t> model;
    nanos earliest = nanos::max();  // when none has room: the shortest wait among the capable
    bool any_capable = false;
  };

  struct state {
    state(executor_type ex, catalog c, options_type o, Classifier cl)
        : executor(std::move(ex)),
          catalog_(std::move(c)),
          options(std::move(o)),
          classify(std::move(cl)) {
      if (catalog_.models().empty())
        throw weir::exception(error::invalid_argument, "router: the catalog has no model");
      if (!options.strategy)
        throw weir::exception(error::invalid_argument, "router: strategy must be set");
      if (options.max_attempts == 0)
        detail::invalid_option("router", "max_attempts", options.max_attempts, "be at least 1");
      if (!(options.latency_smoothing > 0 && options.latency_smoothing <= 1))
        detail::invalid_option("router", "latency_smoothing", options.latency_smoothing,
                               "be in (0, 1]");
      if (options.usage_window.count() <= 0)
        detail::invalid_option("router", "usage_window", options.usage_window, "be positive");
      for (const auto& p : catalog_.providers()) {
        auto breaker_options = p.breaker;
        breaker_options.on_state_change = [this, name = std::string_view(p.name),
                                           user = p.breaker.on_state_change](breaker_state from,
                                                                             breaker_state to) {
          if (user) user(from, to);
          emit(breaker_changed{name, from, to, name});
        };
        providers.push_back(std::make_unique<provider_entry>(p, std::move(breaker_options)));
      }
      for (const auto& m : catalog_.models()) {
        std::size_t p = 0;
        while (providers[p]->spec->name != m.provider) ++p;
        models.push_back(std::make_unique<model_entry>(m, p, executor, options));
      }
    }

    template <class Event>
    void emit(const Event& e) const {
      if (options.watch) options.watch(event(e));
    }

    std::uint64_t fitting_context(const constraints& c) const {
      return std::max(c.min_context, c.input_tokens + c.output_tokens);
    }

    static bool listed(const std::vector<std::string_view>& names, std::string_view name) {
      return std::find(names.begin(), names.end(), name) != names.end();
    }

    // Whether the model could ever take this request, whatever its load.
    bool fits(const model_entry& m, const constraints& c, std::uint64_t min_context) const {
      const auto& s = *m.spec;
      if (s.capability < c.min_capability) return false;
      if (s.context_window != 0 && s.context_window < min_context) return false;
      if (!c.allowed_providers.empty() && !listed(c.allowed_providers, s.provider)) return false;
      if (listed(c.excluded_providers, s.provider)) return false;
      if (c.max_cost && s.cost(c.input_tokens, c.output_tokens) > *c.max_cost) return false;
      return c.input_tokens + c.output_tokens <= m.max_request_tokens;
    }

    // How long before the model may be tried, limits aside: cooldowns, breaker, batch pacing.
    nanos blocked_for(const model_entry& m, const constraints& c, time_point now) const {
      const auto& p = *providers[m.provider];
      nanos wait = std::max({nanos::zero(), p.cooldown.left(now), m.cooldown.left(now)});
      if (p.breaker.state() != breaker_state::closed)
        wait = std::max(wait, p.breaker.time_until_admit(now));
      if (c.priority == weir::priority::batch) wait = std::max(wait, m.monitor.pacing_delay(now));
      return wait;
    }

    static usage cost_of(const constraints& c) {
      return {.requests = 1,
              .tokens = c.input_tokens + c.output_tokens,
              .input_tokens = c.input_tokens,
              .output_tokens = c.output_tokens};
    }

    // The best model with room now; with `reserve`, its limits are charged for the request.
    // `not_before` holds, per model, when this request may try it again (clock nanoseconds).
    pick_result pick(const constraints& c, std::uint64_t min_context, std::span<const char> tried,
                     std::span<const std::int64_t> not_before, time_point now, bool reserve) {
      pick_result r;
      const auto n = models.size();
      constexpr double unranked = std::numeric_limits<double>::infinity();
      detail::small_buffer<double, 32> scores(n, unranked);
      const auto score = scores.span();
      for (std::size_t i = 0; i < n; ++i) {
        const auto& m = *models[i];
        if (tried[i] || !fits(m, c, min_context)) continue;
        r.any_capable = true;
        const auto own = nanos(not_before[i] - detail::to_nanos(now));
        if (auto wait = std::max(own, blocked_for(m, c, now)); wait > nanos::zero()) {
          r.earliest = std::min(r.earliest, wait);
          continue;
        }
        const basic_candidate<Clock> candidate{
            .model = *m.spec,
            .estimated_cost = m.spec->cost(c.input_tokens, c.output_tokens),
            .latency = nanos(m.latency_ns.load(std::memory_order_relaxed)),
            .monitor = &m.monitor,
            .now = now};
        score[i] = options.strategy(candidate);
        if (std::isnan(score[i])) score[i] = unranked;
      }
      const auto cost = cost_of(c);
      for (;;) {
        const auto best = std::min_element(score.begin(), score.end());
        if (best == score.end() || *best == unranked) return r;
        const auto i = static_cast<std::size_t>(best - score.begin());
        auto& m = *models[i];
        if (!m.limits || (reserve ? m.limits->try_acquire(cost, now)
                                  : m.limits->time_until(cost, now) == nanos::zero())) {
          r.model = i;
          return r;
        }
        r.earliest = std::min(r.earliest, m.limits->time_until(cost, now));
        *best = unranked;
      }
    }

    // A failure teaches the strategy too (else a model that always times out would stay
    // "unmeasured" and be tried first): it never makes a model look faster than it was, and it
    // doubles the estimate, so failing models sink in lowest_latency's order.
    void note_failure_latency(model_entry& m, nanos sample) const {
      const auto seen = nanos(m.latency_ns.load(std::memory_order_relaxed));
      note_latency(m, std::max(sample, seen * 2));
    }

    void note_latency(model_entry& m, nanos sample) const {
      auto seen = m.latency_ns.load(std::memory_order_relaxed);
      for (;;) {
        const double next =
            seen == 0 ? static_cast<double>(sample.count())
                      : static_cast<double>(seen) +
                            options.latency_smoothing * static_cast<double>(sample.count() - seen);
        const auto value = std::max<std::int64_t>(1, static_cast<std::int64_t>(next));
        if (m.latency_ns.compare_exchange_weak(seen, value, std::memory_order_relaxed)) return;
      }
    }

    executor_type executor;
    catalog catalog_;
    options_type options;
    Classifier classify;
    std::vector<std::unique_ptr<provider_entry>> providers;
    std::vector<std::unique_ptr<model_entry>> models;
  };

  static std::exception_ptr failure_of(const outcome<Response>& o, const model_spec& m,
                                       const classification& v) {
    if (auto f = o.failure()) return f;
    if (v.kind == verdict::rate_limited)
      return std::make_exception_ptr(weir::exception(
          error::rate_limited, fmt::format("{}/{} refused the request", m.provider, m.id),
          v.hint.retry_after));
    return std::make_exception_ptr(std::runtime_error(
        fmt::format("{}/{} answered with a {} failure", m.provider, m.id, v.kind)));
  }

  static boost::asio::awaitable<routed<Response>> run(std::shared_ptr<state> s, Request request,
                                                      constraints c) {
    const auto n = s->models.size();
    detail::small_buffer<char, 32> flags(n, 0);
    const auto tried = flags.span();
    detail::small_buffer<std::int64_t, 32> retry_times(n, 0);
    const auto not_before = retry_times.span();
    auto min_context = s->fitting_context(c);
    const auto estimate = state::cost_of(c);
    route_record record;
    record.estimated_tokens = estimate.tokens;
    std::exception_ptr last_failure;
    boost::asio::basic_waitable_timer<Clock> timer(co_await boost::asio::this_coro::executor);
    const auto& budget = s->options.fallback_budget;
    if (budget) budget->deposit();

    for (;;) {
      auto now = Clock::now();
      if (record.attempts == s->options.max_attempts)
        throw weir::exception(error::retries_exhausted,
                              fmt::format("router: {} attempts failed", record.attempts), {},
                              last_failure, record.attempts);
      const auto pick = s->pick(c, min_context, tried, not_before, now, true);
      if (!pick.model) {
        if (!pick.any_capable) {
          if (record.attempts == 0 && !last_failure)
            throw weir::exception(error::no_provider_available,
                                  "router: no model meets the request's constraints");
          throw weir::exception(error::retries_exhausted,
                                "router: every capable model failed this request", {}, last_failure,
                                record.attempts);
        }
        const auto wait = pick.earliest;
        const bool never = wait == nanos::max();
        if (never || !c.wait_for_capacity || (c.deadline && now + wait > *c.deadline)) {
          if (s->options.watch)
            s->emit(rejected{c.operation, rejection::rate_limited,
                             never ? std::nullopt : std::optional(wait), "router"});
          throw weir::exception(error::no_provider_available,
                                never ? "router: every capable provider is isolated"
                                      : "router: no capable model has room before the deadline",
                                never ? std::nullopt : std::optional(wait), last_failure,
                                record.attempts);
        }
        s->emit(throttled{c.operation, wait, "router"});
        timer.expires_after(std::chrono::duration_cast<typename Clock::duration>(wait));
        co_await timer.async_wait(boost::asio::use_awaitable);
        record.waited += std::chrono::duration_cast<nanos>(Clock::now() - now);
        continue;
      }

      const auto i = *pick.model;
      auto& m = *s->models[i];
      auto& p = *s->providers[m.provider];
      const auto& spec = *m.spec;
      // The request will not be sent after all: its reservation goes back.
      const auto unreserve = [&] {
        if (m.limits) m.limits->settle(estimate, usage{.requests = 0}, now);
      };
      if (!p.call) {
        unreserve();
        throw weir::exception(error::invalid_argument,
                              fmt::format("router: provider {} is not connected", spec.provider));
      }
      if (record.attempts > 0 && budget && !budget->try_withdraw()) {
        unreserve();
        s->emit(rejected{c.operation, rejection::budget_exhausted, {}, "router"});
        throw weir::exception(error::budget_exhausted, "router: the fallback budget is spent", {},
                              last_failure, record.attempts);
      }
      const auto ticket = p.breaker.try_admit();
      if (!ticket.admitted) {  // another request took the last half-open probe
        unreserve();
        tried[i] = 1;
        continue;
      }

      ++record.attempts;
      s->emit(route_chosen{c.operation, spec.provider, spec.id, record.attempts,
                           spec.cost(c.input_tokens, c.output_tokens)});
      const auto started = Clock::now();
      auto result = co_await capture(p.call(spec, std::as_const(request)));
      const auto finished = Clock::now();
      const auto latency = std::chrono::duration_cast<nanos>(finished - started);
      const auto judged = s->classify(std::as_const(result));
      const bool cancelled = result.cancelled();
      // A cancelled call, or one the provider's own code refused before sending, is no answer:
      // the breaker gets its ticket back (a probe must not close it), the pacing learns nothing.
      // A 429 is the cooldown's business, not the breaker's (circuit_breaker_options says why).
      const bool answered = result.reached_provider();
      p.breaker.settle(ticket, answered, judged.kind);
      if (m.adapt && answered) m.adapt->observe(judged, started, finished);
      record.steps.push_back({spec.provider, spec.id, judged.kind, latency});
      if (answered && judged.kind == verdict::retryable) s->note_failure_latency(m, latency);

      std::optional<token_usage> used;
      if (judged.is_success() && s->options.usage_of) used = s->options.usage_of(result.value());
      const usage spent = used ? usage{.requests = 1,
                                       .tokens = used->input_tokens + used->output_tokens,
                                       .input_tokens = used->input_tokens,
                                       .output_tokens = used->output_tokens}
                               : (judged.is_success() ? estimate : usage{.requests = 1});
      const std::uint64_t tokens_used = spent.tokens;
      if (answered)
        m.monitor.record({.requests = 1,
                          .tokens = tokens_used,
                          .error = judged.kind == verdict::retryable,
                          .rate_limited = judged.kind == verdict::rate_limited},
                         started);
      if (m.limits) m.limits->settle(estimate, spent, finished);

      switch (judged.kind) {
        case verdict::success: {
          s->note_latency(m, latency);
          record.provider = spec.provider;
          record.model = spec.id;
          record.settled_tokens = tokens_used;
          record.cost = used ? spec.cost(used->input_tokens, used->output_tokens)
                             : spec.cost(c.input_tokens, c.output_tokens);
          co_return routed<Response>{std::move(result.value()), std::move(record)};
        }
        case verdict::rate_limited: {
          s->emit(server_rate_limited{c.operation, judged.hint});
          if (const auto cool = judged.hint.exhausted_for()) {
            // The quota is spent until then: nobody sends there before it has room again.
            const bool whole_provider = p.spec->cooldown_scope == cooldown_scope::provider;
            (whole_provider ? p.cooldown : m.cooldown)
                .extend_to(finished + std::chrono::duration_cast<typename Clock::duration>(*cool));
            s->emit(provider_cooling{c.operation, spec.provider, *cool,
                                     whole_provider ? std::string_view{} : spec.id});
          } else {
            // Only this request was refused: it waits as the server said before it tries this
            // model again; the model's pacing has made its one decrease.
            const auto wait = judged.hint.retry_after.value_or(p.spec->default_cooldown);
            not_before[i] = detail::to_nanos(finished) + wait.count();
          }
          s->emit(route_fallback{c.operation, spec.provider, spec.id, judged.kind});
          last_failure = failure_of(result, spec, judged);
          break;
        }
        case verdict::retryable:
          tried[i] = 1;
          s->emit(route_fallback{c.operation, spec.provider, spec.id, judged.kind});
          last_failure = failure_of(result, spec, judged);
          break;
        case verdict::fatal:
          if (!cancelled && s->options.context_exceeded && s->options.context_exceeded(result)) {
            tried[i] = 1;
            if (spec.context_window != 0)
              min_context = std::max(min_context, spec.context_window + 1);
            s->emit(route_fallback{c.operation, spec.provider, spec.id, judged.kind, true});
            last_failure = failure_of(result, spec, judged);
            break;
          }
          record.provider = spec.provider;
          record.model = spec.id;
          co_return routed<Response>{std::move(result).get(), std::move(record)};
      }
    }
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir
