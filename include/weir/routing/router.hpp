// Sends each request to the best model that can serve it now: capable enough, big enough, within
// price, with room in its limits, its provider's circuit closed and not cooling down. On a 429 it
// falls back; a model whose quota the server says is spent cools down exactly as long as the
// server said. When nothing has room it waits for the first model that will (within the deadline)
// or says when that will be.
//
//     weir::routing::router<my_request, my_response> router(io.get_executor(), catalog);
//     router.connect("openai", [&](const weir::routing::model_spec& m, const my_request& r) {
//       return openai_client.complete(m.id, r);  // an asio::awaitable<my_response>
//     });
//     auto [response, route] = co_await router.route(
//         request, {.input_tokens = 900, .output_tokens = 300, .min_capability = 7});
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/deadline.hpp>
#include <weir/detail/driver.hpp>
#include <weir/detail/session_caches.hpp>
#include <weir/detail/small_buffer.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/failure/hedging.hpp>
#include <weir/failure/retry_budget.hpp>
#include <weir/http/adaptation.hpp>
#include <weir/routing/catalog.hpp>
#include <weir/routing/route_machine.hpp>
#include <weir/routing/selection.hpp>
#include <weir/routing/strategy.hpp>
#include <weir/routing/types.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <fmt/format.h>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace weir::routing {

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
  using options_type = basic_router_options<Response, Clock, Classifier>;
  // Sends `request` to `model` (of this provider) and returns the response.
  using provider_call =
      std::function<boost::asio::awaitable<Response>(const model_spec&, const Request&)>;
  // The same, given the attempt's trace context to send with it (see weir/core/trace.hpp; empty
  // when the route has none).
  using traced_provider_call = std::function<boost::asio::awaitable<Response>(
      const model_spec&, const Request&, const trace_context&)>;

  // Throws weir::exception(invalid_argument) for an empty catalog or bad options.
  router(executor_type ex, catalog models, options_type options = {})
      : state_(std::make_shared<state>(std::move(ex), std::move(models), std::move(options))) {}

  // The callable that sends requests to one of the catalog's providers.
  void connect(std::string_view provider, provider_call call) {
    connect(provider, traced_provider_call(
                          [call = std::move(call)](const model_spec& m, const Request& r,
                                                   const trace_context&) { return call(m, r); }));
  }
  // The same for a callable that sends each attempt's trace context (constraints::trace).
  void connect(std::string_view provider, traced_provider_call call) {
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
  // constructor (`chat_request("hi")`, not `chat_request{"hi"}`);
  // tests/reliability/correctness_test.cpp runs those spellings under ASan.
  boost::asio::awaitable<routed<Response>> route(Request request, constraints c) {
    return run(state_, std::move(request), std::move(c));
  }

  // Routes `request` with hedging (weir/failure/hedging.hpp: its delay, fixed or a percentile of
  // the first attempts' latencies, and its bounds: hedges per call, in flight, and a retry budget's
  // share of calls). When the route has no answer after the delay — for a stream, no first token
  // — a hedge routes it again, on the next-best model of another provider than those the route
  // has chosen so far, within `max_hedge_cost` (USD at the estimates) when given. The first
  // answer wins; the others are cancelled and waited for, their reservations returned. The
  // route record lists the attempts of every route, the losers' included (a cancelled one as
  // fatal), in the order they ended. The hedge's events go to the router's observer, when it
  // has one.
  boost::asio::awaitable<routed<Response>> route_hedged(Request request, constraints c,
                                                        weir::hedging<Clock> hedge,
                                                        std::optional<double> max_hedge_cost = {}) {
    auto race = std::make_shared<hedge_race>();
    auto attempt = [s = state_, race, request = std::move(request), c, max_hedge_cost](unsigned n) {
      constraints mine = c;
      if (n > 0) {
        race->exclude_chosen(mine.excluded_providers);
        if (max_hedge_cost)
          mine.max_cost =
              mine.max_cost ? std::min(*mine.max_cost, *max_hedge_cost) : *max_hedge_cost;
      }
      return run(s, request, std::move(mine), race);
    };
    const basic_call_context<Clock> call{.operation = c.operation};
    const observer* watch = state_->options.watch ? &state_->options.watch : nullptr;
    auto hedged = hedge(stage_context<Clock>{call, watch}, std::move(attempt));
    auto answer = co_await std::move(hedged);
    answer.route.steps = race->steps();
    answer.route.attempts = static_cast<unsigned>(answer.route.steps.size());
    co_return answer;
  }

  // Which model route() would choose now, without reserving anything (nullopt: none has room).
  std::optional<std::size_t> select(const constraints& c, time_point now = Clock::now()) const {
    const auto n = state_->models.size();
    weir::detail::small_buffer<char, 32> tried(n, 0);
    weir::detail::small_buffer<std::int64_t, 32> not_before(n, 0);
    ranking r(n);
    return state_->pick(r, c, fitting_context(c), tried.span(), not_before.span(), now, false);
  }

  const catalog& models() const noexcept { return state_->catalog_; }

  // Brings back the models with this id (of `provider` only, when given) that the router took out
  // because a quota or the account's credit was spent, and their providers for the credit: once
  // the bill is paid, say. Returns how many models it found.
  std::size_t restore(std::string_view model, std::string_view provider = {}) {
    std::size_t found = 0;
    for (auto& m : state_->models) {
      if (m->spec->id != model || (!provider.empty() && m->spec->provider != provider)) continue;
      m->exhausted.clear();
      state_->providers[m->provider]->exhausted.clear();
      ++found;
    }
    return found;
  }

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
      s.cooling = std::max({std::chrono::nanoseconds::zero(), p.cooldown.left(now),
                            m->cooldown.left(now), p.exhausted.left(now), m->exhausted.left(now)});
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

  // Until when the server said a quota is exhausted; only ever moves later, but for clear().
  struct cooldown {
    static constexpr std::int64_t until_cleared = std::numeric_limits<std::int64_t>::max();

    // nanos::max() while it lasts until cleared.
    nanos left(time_point now) const {
      const auto until = until_ns.load(std::memory_order_acquire);
      if (until == until_cleared) return nanos::max();
      return nanos(until) - std::chrono::duration_cast<nanos>(now.time_since_epoch());
    }
    void extend_to(time_point until) {
      extend_to_ns(std::chrono::duration_cast<nanos>(until.time_since_epoch()).count());
    }
    void hold_until_cleared() { extend_to_ns(until_cleared); }
    void clear() { until_ns.store(0, std::memory_order_release); }
    void extend_to_ns(std::int64_t ns) {
      auto seen = until_ns.load(std::memory_order_relaxed);
      while (ns > seen && !until_ns.compare_exchange_weak(seen, ns, std::memory_order_acq_rel)) {
      }
    }

    std::atomic<std::int64_t> until_ns{0};  // clock epoch: long past
  };

  struct provider_entry {
    provider_entry(const provider_spec& s, circuit_breaker_options breaker_options)
        : spec(&s),
          breaker(std::move(breaker_options)),
          cache_ttl(
              std::chrono::duration_cast<typename Clock::duration>(s.cache_or_documented().ttl)) {}

    const provider_spec* spec;
    circuit_breaker<Clock> breaker;
    struct cooldown cooldown;   // for providers whose limits are per account
    struct cooldown exhausted;  // the account's credit is spent (router::restore clears it)
    typename Clock::duration cache_ttl;  // how long its prompt cache lives after a use
    traced_provider_call call;
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
      if (o.adaptation) {
        adapt.emplace(*limits, *o.adaptation);
        adapt->engage();  // every call to the model is paced by it, the first one included
      }
    }

    model_view<Clock> view() const {
      return {.spec = spec,
              .max_request_tokens = max_request_tokens,
              .latency = nanos(latency_ns.load(std::memory_order_relaxed)),
              .monitor = &monitor};
    }

    // A charge taken by selection goes back: the request is not sent to this model now.
    void unreserve(const usage& estimate, time_point now) {
      if (limits) limits->settle(estimate, usage{.requests = 0}, now);
    }

    const model_spec* spec;
    std::size_t provider;
    std::optional<rate_limits<Clock>> limits;
    std::optional<http::server_adaptation<Clock>> adapt;
    usage_monitor<Clock> monitor;
    std::uint64_t max_request_tokens = std::numeric_limits<std::uint64_t>::max();
    std::atomic<std::int64_t> latency_ns{0};
    struct cooldown cooldown;
    struct cooldown exhausted;            // a quota is spent (router::restore clears it)
    std::atomic<double> shared_limit{0};  // the request limit last told to the fleet
  };

  struct state : std::enable_shared_from_this<state> {
    state(executor_type ex, catalog c, options_type o)
        : executor(std::move(ex)), catalog_(std::move(c)), options(std::move(o)) {
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
        breaker_options.on_state_change =
            [this, name = std::string_view(p.name), user = p.breaker.on_state_change,
             index = providers.size()](breaker_state from, breaker_state to) {
              if (user) user(from, to);
              emit(breaker_changed{name, from, to, name});
              if (to == breaker_state::open || to == breaker_state::isolated) share_break(index);
            };
        providers.push_back(std::make_unique<provider_entry>(p, std::move(breaker_options)));
      }
      // Each breaker's state once, from the start (from == to), so that a watcher (metrics' state
      // set) knows every breaker before any changes.
      for (const auto& p : providers) {
        const auto now = p->breaker.state();
        emit(breaker_changed{p->spec->name, now, now, p->spec->name});
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
    // With the ids of the route's trace (and of its attempt).
    template <class Event>
    void emit(Event e, const trace_ids& ids) const {
      if (!options.watch) return;
      e.trace = ids;
      options.watch(event(e));
    }

    // The longest a cooldown or an isolation is shared for: the fleet's state expires by itself.
    static constexpr nanos longest_shared = std::chrono::hours(1);

    // Provider `index`'s breaker opened (or was isolated): the fleet stays away for the break.
    // Posted: the breaker calls this under its own lock, and its time left needs that lock.
    void share_break(std::size_t index) {
      if (!options.fleet) return;
      boost::asio::post(executor, [weak = this->weak_from_this(), index] {
        const auto self = weak.lock();
        if (!self) return;
        const auto& p = *self->providers[index];
        const auto left = std::min(p.breaker.time_until_admit(), longest_shared);
        if (left > nanos::zero()) self->options.fleet->publish_cooldown(p.spec->name, {}, left);
      });
    }

    // What the fleet learned since this router last looked: its cooldowns and limits join ours.
    void hear(const fleet_news& news, time_point now) {
      const auto until = [&](nanos left) {
        return now +
               std::chrono::duration_cast<typename Clock::duration>(std::min(left, longest_shared));
      };
      for (const auto& cool : news.cooldowns)
        for (const auto& m : models) {
          auto& p = *providers[m->provider];
          if (p.spec->name != cool.provider) continue;
          if (cool.model.empty()) {
            p.cooldown.extend_to(until(cool.left));
            break;
          }
          if (m->spec->id == cool.model) m->cooldown.extend_to(until(cool.left));
        }
      for (const auto& l : news.limits)
        for (const auto& m : models)
          if (m->adapt && m->spec->provider == l.provider && m->spec->id == l.model &&
              !m->adapt->state().known && l.requests_per_second > 0)
            m->adapt->learn_request_limit(weir::per_second(l.requests_per_second), now);
    }

    // How long before model m may be tried, its limits aside (see blocked_for).
    nanos blocked(const model_entry& m, const constraints& c, time_point now) const {
      const auto& p = *providers[m.provider];
      return blocked_for(std::max(p.cooldown.left(now), p.exhausted.left(now)),
                         std::max(m.cooldown.left(now), m.exhausted.left(now)),
                         p.breaker.state() != breaker_state::closed
                             ? std::optional(p.breaker.time_until_admit(now))
                             : std::nullopt,
                         c.priority == weir::priority::batch
                             ? std::optional(m.monitor.pacing_delay(now))
                             : std::nullopt);
    }

    // The best model with room now, ranked into `r`; with `reserve`, its limits are charged for
    // the request. `not_before` holds, per model, when this request may try it again.
    std::optional<std::size_t> pick(ranking& r, const constraints& c, std::uint64_t min_context,
                                    std::span<const char> tried,
                                    std::span<const std::int64_t> not_before, time_point now,
                                    bool reserve) {
      weir::detail::small_buffer<std::uint64_t, 32> cached(models.size(), 0);
      const bool warm = !c.session.empty() && caches.read(c.session, now, cached.span());
      rank<Clock>(
          r,
          [&](std::size_t i) {
            auto view = models[i]->view();
            if (warm) view.cached_input_tokens = cached.span()[i];
            return view;
          },
          c, min_context, tried, not_before, now, options.strategy,
          [&](std::size_t i) { return blocked(*models[i], c, now); });
      const auto cost = cost_of(c);
      return choose(r, [&](std::size_t i) {
        auto& limits = models[i]->limits;
        if (!limits) return nanos::zero();
        if (reserve ? limits->try_acquire(cost, now)
                    : limits->time_until(cost, now) == nanos::zero())
          return nanos::zero();
        return std::max(nanos(1), limits->time_until(cost, now));  // refused: a wait, never zero
      });
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
    std::vector<std::unique_ptr<provider_entry>> providers;
    std::vector<std::unique_ptr<model_entry>> models;
    // Where each session's prompt is cached, for cache_affinity.
    weir::detail::session_caches<Clock> caches;
    mutable std::atomic<std::uint32_t> route_seeds{1};  // each route's backoff jitter
    std::atomic<bool> fleet_reachable{true};
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

  using ticket_type = typename circuit_breaker<Clock>::ticket;

  // What events of the route as a whole carry: its trace id, no attempt's span.
  static trace_ids route_ids(const constraints& c) { return {c.trace.trace_id, {}}; }

  // Models a route may not try because of a budget, and the budget that said so.
  struct priced_out_models {
    explicit priced_out_models(std::size_t models) : skip(models, 0) {}
    weir::detail::small_buffer<char, 32> skip;  // tried, or priced out
    std::string budget;
    std::string key;
    std::optional<nanos> room;  // until the budget that said so has room (the soonest)
  };

  [[noreturn]] static void refuse_over_budget(const state& s, const constraints& c,
                                              const priced_out_models& out) {
    s.emit(rejected{c.operation, rejection::over_budget, out.room, "router"}, route_ids(c));
    throw weir::exception::refusal(
        error::over_budget,
        fmt::format("router: every model that fits the request would pass budget {}{}{}{}",
                    out.budget, out.key.empty() ? "" : " for ", out.key,
                    out.room ? fmt::format("; room again in {:.0f} s",
                                           std::chrono::duration<double>(*out.room).count())
                             : std::string("; no room before calls in flight settle, if ever")),
        out.room);
  }

  // What the routes of one hedged request share: the providers chosen so far (a hedge avoids
  // them) and every attempt's step.
  struct hedge_race {
    void chose(const std::string& provider) {
      std::lock_guard lock(mutex);
      if (std::find(providers.begin(), providers.end(), provider) == providers.end())
        providers.push_back(provider);
    }
    void ended(const route_step& step) {
      std::lock_guard lock(mutex);
      all_steps.push_back(step);
    }
    // Adds the chosen providers to `excluded` (views of strings that live as long as the race).
    void exclude_chosen(std::vector<std::string_view>& excluded) {
      std::lock_guard lock(mutex);
      excluded.insert(excluded.end(), providers.begin(), providers.end());
    }
    std::vector<route_step> steps() {
      std::lock_guard lock(mutex);
      return all_steps;
    }

    std::mutex mutex;
    std::deque<std::string> providers;  // a deque: the views handed out stay valid
    std::vector<route_step> all_steps;
  };

  // One route's progress: its decisions (route_machine.hpp), what it will report, and whose it is.
  struct route_progress {
    route_progress(const state& s, const constraints& c)
        : machine(s.models.size(), fitting_context(c), settings_of(s, c),
                  s.route_seeds.fetch_add(1, std::memory_order_relaxed)),
          estimate(cost_of(c)) {
      record.estimated_tokens = estimate.tokens;
    }

    static route_machine::settings settings_of(const state& s, const constraints& c) {
      return {.max_attempts = s.options.max_attempts,
              .retry_backoff = s.options.retry_backoff,
              .exhausted_for = s.options.exhausted_for,
              .wait_for_capacity = c.wait_for_capacity,
              .deadline_ns =
                  c.deadline ? std::optional(weir::detail::to_nanos(*c.deadline)) : std::nullopt};
    }

    route_machine machine;
    usage estimate;
    route_record record;
    std::shared_ptr<hedge_race> race{};  // when the route is one of a hedged request's
    trace_ids ids{};                     // the route's trace id and the current attempt's span id
  };

  // Marks in `out` the models this request may not try: those it tried, and those whose
  // estimated cost would pass a budget (noting the budget that said so, the soonest to have
  // room). False when no model is priced out.
  static bool price_out(const state& s, const constraints& c, const route_progress& route,
                        time_point now, priced_out_models& out) {
    const auto tried = route.machine.tried();
    std::copy(tried.begin(), tried.end(), out.skip.span().begin());
    out.budget.clear();
    out.key.clear();
    out.room.reset();
    bool any = false;
    for (std::size_t i = 0; i < s.models.size(); ++i) {
      // A model that could never take the request is not "over budget": with no model that
      // could, the request is no provider's, whatever the budgets.
      if (tried[i] || !fits(s.models[i]->view(), c, route.machine.min_context())) continue;
      const auto& spec = *s.models[i]->spec;
      const double cost = spec.most_cost(c.input_tokens, c.output_tokens);
      for (const auto& b : s.options.budgets) {
        const auto key = b.key_for(c.tenant, spec.provider);
        if (b.fits(key, cost, now)) continue;
        out.skip.span()[i] = 1;
        const auto room = b.room_in(key, cost, now);
        if (!any || (room && (!out.room || *room < *out.room))) {
          out.budget = b.name();
          out.key = std::string(key);
          out.room = room;
        }
        any = true;
        break;
      }
    }
    return any;
  }

  // Model i was picked: its estimated cost is held in every budget, or nothing is held and
  // nullopt says one has no room (another request took it since selection).
  static std::optional<std::vector<typename spend_budget<Clock>::reservation>> charge_budgets(
      state& s, const constraints& c, std::size_t i, time_point now) {
    std::vector<typename spend_budget<Clock>::reservation> held;
    const auto& spec = *s.models[i]->spec;
    const double cost = spec.most_cost(c.input_tokens, c.output_tokens);
    for (auto& b : s.options.budgets) {
      auto r = b.try_reserve(b.key_for(c.tenant, spec.provider), cost, now);
      if (!r) {
        for (auto& h : held) h.release();
        return std::nullopt;
      }
      held.push_back(std::move(*r));
    }
    return held;
  }

  // The route ends without an answer, as its machine decided: the error (and event) saying why.
  [[noreturn]] static void give_up(const state& s, const constraints& c,
                                   const route_progress& route, const route_decision& d,
                                   const std::optional<priced_out_models>& priced) {
    const auto& cause = route.machine.last_failure();
    const auto attempts = route.record.attempts;
    switch (d.reason) {
      case give_up_reason::deadline_passed: {
        // Nothing is sent past the deadline; with nothing sent at all, it is a local refusal.
        weir::exception passed(error::timeout, "router: the deadline passed", {}, cause, attempts);
        if (d.refused_before_sending) throw passed.as_refusal();
        throw passed;
      }
      case give_up_reason::attempts_exhausted:
        throw weir::exception(error::retries_exhausted,
                              fmt::format("router: {} attempts failed", attempts), {}, cause,
                              attempts);
      case give_up_reason::over_budget: refuse_over_budget(s, c, *priced);
      case give_up_reason::no_capable_model:
        throw weir::exception(error::no_provider_available,
                              "router: no model meets the request's constraints");
      case give_up_reason::every_model_failed:
        throw weir::exception(error::retries_exhausted,
                              "router: every capable model failed this request", {}, cause,
                              attempts);
      case give_up_reason::no_room: break;
    }
    s.emit(rejected{c.operation, rejection::rate_limited, d.retry_after, "router"}, route_ids(c));
    throw weir::exception(error::no_provider_available,
                          d.retry_after ? "router: no capable model has room before the deadline"
                                        : "router: every capable provider is isolated",
                          d.retry_after, cause, attempts);
  }

  // Model i was picked and its limits charged: the breaker's ticket to send with, or nullopt
  // when another request took the last half-open probe (the model is then skipped). Throws
  // when the route ends here; either way without sending, the charge goes back.
  static std::optional<ticket_type> admit(state& s, const constraints& c, std::size_t i,
                                          const route_progress& route, time_point now) {
    auto& m = *s.models[i];
    auto& p = *s.providers[m.provider];
    if (!p.call) {
      m.unreserve(route.estimate, now);
      throw weir::exception(error::invalid_argument,
                            fmt::format("router: provider {} is not connected", m.spec->provider));
    }
    const auto& budget = s.options.fallback_budget;
    if (route.record.attempts > 0 && budget && !budget->try_withdraw()) {
      m.unreserve(route.estimate, now);
      s.emit(rejected{c.operation, rejection::budget_exhausted, {}, "router"}, route_ids(c));
      throw weir::exception(error::budget_exhausted, "router: the fallback budget is spent", {},
                            route.machine.last_failure(), route.record.attempts);
    }
    auto ticket = p.breaker.try_admit();
    if (!ticket.admitted) {
      m.unreserve(route.estimate, now);
      return std::nullopt;
    }
    return ticket;
  }

  // What one answer of model i taught the route.
  struct lesson {
    bool settled = false;  // by the attempt's stage (not yet for a stream's first chunk)
    classification judged{};
    std::optional<token_usage> used{};  // what the response reported
    std::uint64_t tokens = 0;           // settled: reported, or the estimate
    time_point finished{};
  };
  // A stream (see weir/composition/stream.hpp) is judged at its first chunk and settled at its end.
  static constexpr bool streamed = weir::detail::settles_at_stream_end<Response>;

  // What an answer of model i teaches before anything is settled: the pacing (and through it the
  // fleet), the route's steps and the latency estimate. A stream's latency is its time to first
  // token. A cancelled call, or one the provider's own code refused before sending, is no answer:
  // the pacing learns nothing from it.
  static void observe(state& s, std::size_t i, const classification& judged, bool answered,
                      time_point started, time_point finished, route_progress& route) {
    auto& m = *s.models[i];
    const auto latency = std::chrono::duration_cast<nanos>(finished - started);
    if (m.adapt && answered) {
      m.adapt->observe(judged, started, finished);
      if (s.options.fleet)
        if (const auto known = m.adapt->state().known;
            known && m.shared_limit.exchange(known->per_second) != known->per_second)
          s.options.fleet->publish_limit(m.spec->provider, m.spec->id, known->per_second);
    }
    route.record.steps.push_back({m.spec->provider, m.spec->id, judged.kind, latency});
    if (route.race) route.race->ended(route.record.steps.back());
    if (judged.is_success()) s.note_latency(m, latency);
    if (answered && judged.kind == verdict::retryable) s.note_failure_latency(m, latency);
  }

  // error.type of a call that failed (empty for a success): docs/metrics.md lists the values.
  static std::string_view error_type_of(const outcome<Response>& result, verdict kind) {
    if (kind == verdict::success) return {};
    if (result.cancelled()) return "cancelled";
    if (result.code() == error::timeout) return "timeout";
    switch (kind) {
      case verdict::rate_limited: return "rate_limited";
      case verdict::exhausted: return "exhausted";
      case verdict::retryable: return "retryable";
      default: return "fatal";
    }
  }

  using charges_type = std::vector<typename spend_budget<Clock>::reservation>;

  // A route's attempt on model i, run by the pipeline's driver (weir/detail/driver.hpp) as its
  // one stage. Its exit settles what the attempt holds (the provider's breaker ticket, the
  // model's limits and usage window, the spend budgets) when the call ends, by one rule for both
  // shapes: at once for a whole answer, at its end for a stream, whose exit the driver carries
  // out with it (with the tokens its chunks told, see stage.hpp's stream_tally). A stream that
  // broke is a failure of the model, one abandoned by the caller is not. Never entered (the
  // deadline passed first), it gives everything back.
  struct attempt_stage {
    struct slot {};

    attempt_stage(std::shared_ptr<state> st, std::size_t i, ticket_type t, charges_type held,
                  const constraints& c, route_progress& r, lesson& l, time_point at,
                  std::shared_ptr<std::string> answered)
        : s(std::move(st)),
          model(i),
          ticket(t),
          charges(std::move(held)),
          estimate(r.estimate),
          ids(r.ids),
          started(at),
          whole{&c, &r, &l},
          answered_by(std::move(answered)) {
      if constexpr (streamed) {  // the route's views may be gone when the stream ends
        operation = c.operation;
        gen_ai_operation = c.gen_ai_operation;
      }
    }
    attempt_stage(attempt_stage&&) noexcept = default;
    attempt_stage& operator=(attempt_stage&&) = delete;
    ~attempt_stage() {
      if (s && !entered) give_back();
    }

    bool try_enter(slot&, stage_context<Clock>&) { return entered = true; }

    stage_action exit(slot&, stage_context<Clock>& env, const outcome<Response>& result) {
      if (env.stream)
        settle_stream(*env.stream, env.call, result);
      else
        settle_whole(result);
      return {};
    }

   private:
    // A call that ended with no stream to follow: settled now, and the lesson the route reads.
    void settle_whole(const outcome<Response>& result) {
      auto& l = *whole.learned;
      const auto& c = *whole.asked;
      l.settled = true;
      l.judged = s->options.classifier(result);
      l.finished = Clock::now();
      const bool answered = result.reached_provider();
      observe(*s, model, l.judged, answered, started, l.finished, *whole.progress);
      if constexpr (!streamed)
        if (l.judged.is_success() && s->options.usage_of)
          l.used = s->options.usage_of(result.value());
      // A success or a cancelled call may have produced tokens; a failure that says nothing, or
      // a call the provider's code refused before sending, did not.
      l.tokens =
          settle(answered, l.judged.kind, l.used, l.judged.is_success() || result.cancelled());
      if (!s->options.watch || !(answered || result.cancelled())) return;
      auto ended = call_ended(c.operation, c.gen_ai_operation, l.finished);
      ended.error_type = error_type_of(result, l.judged.kind);
      std::string response_model;
      if (s->options.response_model_of && result.has_value())
        response_model = s->options.response_model_of(result.value());
      ended.response_model = response_model;
      if (l.used) {
        ended.input_tokens = l.used->input_tokens;
        ended.output_tokens = l.used->output_tokens;
        ended.cache_read_tokens = l.used->cache_read_tokens;
        ended.cache_creation_tokens = l.used->cache_write_tokens;
      }
      s->emit(ended, ids);
    }

    // A stream that ended (`result`: a value unless it broke), `told` holding the tokens its
    // chunks told.
    void settle_stream(const stream_settled& ending, const basic_call_context<Clock>& told,
                       const outcome<Response>& result) noexcept {
      try {
        const auto kind =
            result.has_value() ? verdict::success : s->options.classifier(result).kind;
        const auto& tally = ending.tally;
        std::optional<token_usage> used;
        if (told.actual_output_tokens)
          used = token_usage{.input_tokens = *told.actual_input_tokens,
                             .output_tokens = *told.actual_output_tokens,
                             .cache_read_tokens = told.actual_cache_read_tokens.value_or(0),
                             .cache_write_tokens = told.actual_cache_write_tokens.value_or(0)};
        const auto ended_at = Clock::now();
        // A stream began: it may have produced tokens however it ended.
        const auto tokens = settle(true, kind, used, true);
        s->emit(stream_ended{operation, ending.how, tally.chunks, tokens, tally.source(),
                             ending.time_to_first_token},
                ids);
        if (!s->options.watch) return;
        auto ended = call_ended(operation, gen_ai_operation, ended_at);
        if (ending.how == stream_end::broken) ended.error_type = "stream_broken";
        ended.response_model = answered_by ? std::string_view(*answered_by) : std::string_view();
        ended.time_to_first_chunk = ending.time_to_first_token;
        // What the stream told, never the estimate.
        ended.input_tokens = tally.reported_input_tokens;
        ended.output_tokens = tally.reported_output_tokens;
        if (!ended.output_tokens && tally.counted_output_tokens > 0)
          ended.output_tokens = tally.counted_output_tokens;
        ended.cache_read_tokens = tally.reported_cache_read_tokens.value_or(0);
        ended.cache_creation_tokens = tally.reported_cache_write_tokens.value_or(0);
        s->emit(ended, ids);
      } catch (...) {  // an observer threw: the stream's end must not
      }
    }

    // What the end of an answer teaches, for both shapes: the breaker (its ticket), the usage
    // window, the limits settled to what the provider counts of `used` (the estimate for a
    // success that did not say), and the budgets charged `used`, else the estimate when the call
    // may have produced tokens. Returns the tokens used: reported, or the estimate. A 429 is the
    // cooldown's business, not the breaker's (circuit_breaker_options says why).
    std::uint64_t settle(bool answered, verdict kind, const std::optional<token_usage>& used,
                         bool maybe_billed) {
      auto& m = *s->models[model];
      s->providers[m.provider]->breaker.settle(ticket, answered, kind);
      // What the provider counts: at Anthropic, say, not the input read from its cache.
      const usage spent = used ? m.spec->limited_usage(*used)
                               : (kind == verdict::success ? estimate : usage{.requests = 1});
      if (answered)
        m.monitor.record({.requests = 1,
                          .tokens = spent.tokens,
                          .error = kind == verdict::retryable,
                          .rate_limited = kind == verdict::rate_limited},
                         started);
      if (m.limits) m.limits->settle(estimate, spent, started);
      const double cost = used ? m.spec->cost(*used)
                          : maybe_billed
                              ? m.spec->cost(estimate.input_tokens, estimate.output_tokens)
                              : 0.0;
      for (auto& r : charges) r.settle(cost);
      return used ? weir::detail::saturating_add(used->input_tokens, used->output_tokens)
                  : spent.tokens;
    }

    // The event of this call's end, but for its outcome's fields.
    model_call_ended call_ended(std::string_view op, std::string_view gen_ai_op,
                                time_point ended_at) const {
      const auto& m = *s->models[model];
      return {.operation = op,
              .provider = m.spec->provider,
              .model = m.spec->id,
              .gen_ai_provider = s->providers[m.provider]->spec->gen_ai_name_or_well_known(),
              .gen_ai_operation = gen_ai_op,
              .duration = std::chrono::duration_cast<nanos>(ended_at - started)};
    }

    // Nothing was sent: the limits' charge, the budgets and the breaker's ticket go back.
    void give_back() noexcept {
      try {
        auto& m = *s->models[model];
        m.unreserve(estimate, Clock::now());
        for (auto& r : charges) r.release();
        s->providers[m.provider]->breaker.abandon(ticket);
      } catch (...) {
      }
    }

    std::shared_ptr<state> s;
    std::size_t model;
    ticket_type ticket;
    charges_type charges;
    usage estimate;
    trace_ids ids;  // the route's trace and this attempt's span
    time_point started;
    // The route's, read while the call has not returned (never at a stream's end).
    struct {
      const constraints* asked;
      route_progress* progress;
      lesson* learned;
    } whole;
    std::shared_ptr<std::string> answered_by;  // a stream's response model, read when returned
    std::string operation, gen_ai_operation;   // a stream's, kept until its end
    bool entered = false;
  };
  using attempt_driver = weir::detail::driver<Clock, default_classifier, attempt_stage>;

  // After an answer of model i that is not a success: false when it is the route's answer (a
  // fatal one); else the route falls back, and what the failure means for the model (a cooldown,
  // a spent quota) holds for every route.
  static bool fall_back(state& s, const constraints& c, std::size_t i,
                        const outcome<Response>& result, const classification& judged,
                        time_point finished, route_progress& route) {
    auto& m = *s.models[i];
    auto& p = *s.providers[m.provider];
    const auto& spec = *m.spec;
    if (judged.kind == verdict::rate_limited)
      s.emit(server_rate_limited{c.operation, judged.hint}, route.ids);
    const bool fatal = judged.kind == verdict::fatal;
    const auto ended = route.machine.ended(
        {.model = i,
         .judged = judged,
         .refused_locally = fatal && result.refused_locally(),
         .cancelled = fatal && result.cancelled(),
         .context_exceeded = fatal && !result.refused_locally() && !result.cancelled() &&
                             s.options.context_exceeded && s.options.context_exceeded(result),
         .finished_ns = weir::detail::to_nanos(finished),
         .failure = judged.is_success() ? std::exception_ptr{} : failure_of(result, spec, judged),
         .context_window = spec.context_window,
         .limits_per_provider = p.spec->cooldown_scope == cooldown_scope::provider,
         .default_cooldown = p.spec->default_cooldown});
    if (ended.answer) return false;
    if (const auto& hold = ended.hold) hold_model(s, c, i, *hold, judged, finished, route);
    s.emit(route_fallback{c.operation, spec.provider, spec.id, judged.kind, ended.context_exceeded,
                          ended.refused_locally},
           route.ids);
    return true;
  }

  // Nobody sends to model i (or its whole provider) for a while: its quota is spent.
  static void hold_model(state& s, const constraints& c, std::size_t i, const model_hold& hold,
                         const classification& judged, time_point finished,
                         const route_progress& route) {
    auto& m = *s.models[i];
    auto& p = *s.providers[m.provider];
    const auto& spec = *m.spec;
    const auto model_id = hold.whole_provider ? std::string_view{} : std::string_view(spec.id);
    const auto until = [&] {
      return finished + std::chrono::duration_cast<typename Clock::duration>(*hold.length);
    };
    if (hold.why == model_hold::kind::cooling) {
      (hold.whole_provider ? p.cooldown : m.cooldown).extend_to(until());
      if (s.options.fleet)
        s.options.fleet->publish_cooldown(spec.provider, model_id,
                                          std::min<nanos>(*hold.length, state::longest_shared));
      s.emit(provider_cooling{c.operation, spec.provider, *hold.length, model_id}, route.ids);
      return;
    }
    auto& out = hold.whole_provider ? p.exhausted : m.exhausted;
    if (hold.length)
      out.extend_to(until());
    else
      out.hold_until_cleared();
    s.emit(provider_exhausted{c.operation, spec.provider, judged.reason, hold.length, model_id},
           route.ids);
  }

  // Before a selection: what the fleet knows joins what this router knows (one round trip).
  static boost::asio::awaitable<void> hear_from_fleet(std::shared_ptr<state> s,
                                                      const constraints& c) {
    auto news = co_await s->options.fleet->read();
    const bool reachable = news.has_value();
    if (s->fleet_reachable.exchange(reachable) != reachable)
      s->emit(fleet_connection{c.operation, reachable}, route_ids(c));
    if (news) s->hear(*news, Clock::now());
  }

  // The route loop: pick a model (or wait for one), admit, send, learn, and answer or fall back.
  static boost::asio::awaitable<routed<Response>> run(std::shared_ptr<state> s, Request request,
                                                      constraints c,
                                                      std::shared_ptr<hedge_race> race = {}) {
    route_progress route(*s, c);
    route.race = std::move(race);
    route.ids = route_ids(c);
    std::optional<priced_out_models> priced;
    if (!s->options.budgets.empty()) priced.emplace(s->models.size());
    boost::asio::basic_waitable_timer<Clock> timer(co_await boost::asio::this_coro::executor);
    if (s->options.fallback_budget) s->options.fallback_budget->deposit();

    for (;;) {
      if (s->options.fleet) co_await hear_from_fleet(s, c);
      const auto now = Clock::now();
      const auto now_ns = weir::detail::to_nanos(now);
      if (const auto stop = route.machine.check(now_ns)) give_up(*s, c, route, *stop, priced);
      ranking ranked(s->models.size());
      const bool priced_out = priced && price_out(*s, c, route, now, *priced);
      const auto picked = s->pick(ranked, c, route.machine.min_context(),
                                  priced_out ? priced->skip.span() : route.machine.tried(),
                                  route.machine.not_before(), now, true);
      const auto next = route.machine.selected({.picked = picked,
                                                .any_capable = ranked.any_capable,
                                                .earliest = ranked.earliest,
                                                .priced_out = priced_out},
                                               now_ns);
      if (next.kind == route_step_kind::select_again) continue;
      if (next.kind == route_step_kind::give_up) give_up(*s, c, route, next, priced);
      if (next.kind == route_step_kind::wait) {
        s->emit(throttled{c.operation, next.wait, "router"}, route_ids(c));
        timer.expires_after(std::chrono::duration_cast<typename Clock::duration>(next.wait));
        co_await timer.async_wait(boost::asio::use_awaitable);
        route.record.waited += std::chrono::duration_cast<nanos>(Clock::now() - now);
        continue;
      }
      const auto i = next.model;
      auto charges = charge_budgets(*s, c, i, now);
      if (!charges) {
        s->models[i]->unreserve(route.estimate, now);
        continue;  // another route took the room first: the next selection sees it
      }
      std::optional<ticket_type> ticket;
      try {
        ticket = admit(*s, c, i, route, now);
      } catch (...) {
        for (auto& r : *charges) r.release();
        throw;
      }
      if (!ticket) {
        for (auto& r : *charges) r.release();
        route.machine.passed_over(i);
        continue;
      }

      const auto& spec = *s->models[i]->spec;
      route.machine.sent();
      ++route.record.attempts;
      if (route.race) route.race->chose(spec.provider);
      // A traced route: each attempt is a new span of the caller's trace.
      const trace_context attempt_trace =
          c.trace ? c.trace.child(route.ids.span = new_span_id()) : trace_context{};
      s->emit(route_chosen{c.operation, spec.provider, spec.id, route.record.attempts,
                           spec.cost(c.input_tokens, c.output_tokens)},
              route.ids);
      const auto started = Clock::now();
      // The attempt runs through the pipeline's driver, its deadline the route's.
      const basic_call_context<Clock> call{
          .input_tokens = c.input_tokens, .output_tokens = c.output_tokens, .deadline = c.deadline};
      std::shared_ptr<std::string> answered_by;
      if constexpr (streamed)
        if (s->options.response_model_of) answered_by = std::make_shared<std::string>();
      lesson l;
      auto send = [&provider = *s->providers[s->models[i]->provider], &spec, &request,
                   &attempt_trace] { return provider.call(spec, request, attempt_trace); };
      auto result = co_await capture(attempt_driver::template run<Response, 0>(
          typename attempt_driver::shared(
              default_classifier{},
              attempt_stage(s, i, *ticket, std::move(*charges), c, route, l, started, answered_by)),
          &call, std::move(send), 1));
      if (!l.settled) {
        // A stream's first chunk (its stage settles it at its end), or an attempt never sent.
        l.judged = s->options.classifier(result);
        l.finished = Clock::now();
        l.tokens = route.estimate.tokens;
        if (result.has_value())
          observe(*s, i, l.judged, result.reached_provider(), started, l.finished, route);
      }
      if (l.judged.is_success() && !c.session.empty()) {
        // The provider now holds this prompt: the prefix the session's next request resends.
        const auto prefix = l.used ? l.used->input_tokens : c.input_tokens;
        s->caches.note(c.session, i, prefix, l.finished,
                       s->providers[s->models[i]->provider]->cache_ttl);
      }
      if constexpr (streamed) {
        if (l.judged.is_success()) {
          Response stream = std::move(result).get();
          if (answered_by) *answered_by = s->options.response_model_of(stream);
          route.record.provider = spec.provider;
          route.record.model = spec.id;
          route.record.settled_tokens = l.tokens;  // the estimate: the stream's report has the rest
          route.record.cost = spec.cost(c.input_tokens, c.output_tokens);
          co_return routed<Response>{std::move(stream), std::move(route.record)};
        }
      }

      if (l.judged.kind == verdict::success ||
          !fall_back(*s, c, i, result, l.judged, l.finished, route)) {
        route.record.provider = spec.provider;
        route.record.model = spec.id;
        if (l.judged.kind == verdict::success) {
          route.record.settled_tokens = l.tokens;
          route.record.cost =
              l.used ? spec.cost(*l.used) : spec.cost(c.input_tokens, c.output_tokens);
          if (l.used) {
            route.record.cache_read_tokens = l.used->cache_read_tokens;
            route.record.cache_write_tokens = l.used->cache_write_tokens;
          }
        }
        co_return routed<Response>{std::move(result).get(), std::move(route.record)};
      }
    }
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir::routing
