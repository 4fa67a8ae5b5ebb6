// What the copies of one router share: its providers and models, each with its limits, pacing,
// breaker, cooldowns and usage window, and how a model is picked for a request (see router.hpp).
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/trace.hpp>
#include <weir/detail/session_caches.hpp>
#include <weir/detail/small_buffer.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/http/adaptation.hpp>
#include <weir/routing/catalog.hpp>
#include <weir/routing/route_machine.hpp>
#include <weir/routing/selection.hpp>
#include <weir/routing/strategy.hpp>
#include <weir/routing/types.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/spend_budget.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/post.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace weir::detail::router_internals {
using namespace weir::routing;

template <class Request, class Response, class Clock, class Classifier>
struct router_state
    : std::enable_shared_from_this<router_state<Request, Response, Clock, Classifier>> {
  using response_type = Response;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using nanos = std::chrono::nanoseconds;
  using executor_type = boost::asio::any_io_executor;
  using constraints = basic_route_constraints<Clock>;
  using options_type = basic_router_options<Response, Clock, Classifier>;
  // See router::traced_provider_call.
  using provider_call = std::function<boost::asio::awaitable<Response>(
      const model_spec&, const Request&, const trace_context&)>;

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

  router_state(executor_type ex, catalog c, options_type o)
      : executor(std::move(ex)), catalog_(std::move(c)), options(std::move(o)) {
    if (catalog_.models().empty())
      throw weir::exception(error::invalid_argument, "router: the catalog has no model");
    if (!options.strategy)
      throw weir::exception(error::invalid_argument, "router: strategy must be set");
    if (options.max_attempts == 0)
      weir::detail::invalid_option("router", "max_attempts", options.max_attempts, "be at least 1");
    if (!(options.latency_smoothing > 0 && options.latency_smoothing <= 1))
      weir::detail::invalid_option("router", "latency_smoothing", options.latency_smoothing,
                                   "be in (0, 1]");
    if (options.usage_window.count() <= 0)
      weir::detail::invalid_option("router", "usage_window", options.usage_window, "be positive");
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
    return blocked_for(
        std::max(p.cooldown.left(now), p.exhausted.left(now)),
        std::max(m.cooldown.left(now), m.exhausted.left(now)),
        p.breaker.state() != breaker_state::closed ? std::optional(p.breaker.time_until_admit(now))
                                                   : std::nullopt,
        c.priority == weir::priority::batch ? std::optional(m.monitor.pacing_delay(now))
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
      if (reserve ? limits->try_acquire(cost, now) : limits->time_until(cost, now) == nanos::zero())
        return nanos::zero();
      return std::max(nanos(1), limits->time_until(cost, now));  // refused: a wait, never zero
    });
  }

  // Models a route may not try because of a budget, and the budget that said so.
  struct priced_out_models {
    explicit priced_out_models(std::size_t models) : skip(models, 0) {}
    weir::detail::small_buffer<char, 32> skip;  // tried, or priced out
    std::string budget;
    std::string key;
    std::optional<nanos> room;  // until the budget that said so has room (the soonest)
  };

  // Marks in `out` the models this request may not try: those it tried, and those whose
  // estimated cost would pass a budget (noting the budget that said so, the soonest to have
  // room). False when no model is priced out.
  bool price_out(const constraints& c, std::span<const char> tried, std::uint64_t min_context,
                 time_point now, priced_out_models& out) const {
    std::copy(tried.begin(), tried.end(), out.skip.span().begin());
    out.budget.clear();
    out.key.clear();
    out.room.reset();
    bool any = false;
    for (std::size_t i = 0; i < models.size(); ++i) {
      // A model that could never take the request is not "over budget": with no model that
      // could, the request is no provider's, whatever the budgets.
      if (tried[i] || !fits(models[i]->view(), c, min_context)) continue;
      const auto& spec = *models[i]->spec;
      const double cost = spec.most_cost(c.input_tokens, c.output_tokens);
      for (const auto& b : options.budgets) {
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
  std::optional<std::vector<typename spend_budget<Clock>::reservation>> charge_budgets(
      const constraints& c, std::size_t i, time_point now) {
    std::vector<typename spend_budget<Clock>::reservation> held;
    const auto& spec = *models[i]->spec;
    const double cost = spec.most_cost(c.input_tokens, c.output_tokens);
    for (auto& b : options.budgets) {
      auto r = b.try_reserve(b.key_for(c.tenant, spec.provider), cost, now);
      if (!r) {
        for (auto& h : held) h.release();
        return std::nullopt;
      }
      held.push_back(std::move(*r));
    }
    return held;
  }

  // Nobody sends to model i (or its whole provider) for a while: its quota is spent.
  void hold(std::size_t i, const model_hold& hold, refusal_reason reason, time_point finished,
            std::string_view operation, const trace_ids& ids) {
    auto& m = *models[i];
    auto& p = *providers[m.provider];
    const auto& spec = *m.spec;
    const auto model_id = hold.whole_provider ? std::string_view{} : std::string_view(spec.id);
    const auto until = [&] {
      return finished + std::chrono::duration_cast<typename Clock::duration>(*hold.length);
    };
    if (hold.why == model_hold::kind::cooling) {
      (hold.whole_provider ? p.cooldown : m.cooldown).extend_to(until());
      if (options.fleet)
        options.fleet->publish_cooldown(spec.provider, model_id,
                                        std::min<nanos>(*hold.length, longest_shared));
      emit(provider_cooling{operation, spec.provider, *hold.length, model_id}, ids);
      return;
    }
    auto& out = hold.whole_provider ? p.exhausted : m.exhausted;
    if (hold.length)
      out.extend_to(until());
    else
      out.hold_until_cleared();
    emit(provider_exhausted{operation, spec.provider, reason, hold.length, model_id}, ids);
  }

  // What router::status reports of model m.
  model_status status_of(const model_entry& m, time_point now) const {
    const auto& p = *providers[m.provider];
    const auto totals = m.monitor.totals(now);
    model_status s{.provider = m.spec->provider, .model = m.spec->id};
    s.requests_per_minute = m.monitor.requests_per_minute(now);
    s.tokens_per_minute = m.monitor.tokens_per_minute(now);
    s.utilization = m.monitor.utilization(now);
    s.rate_limited = totals.rate_limited;
    s.errors = totals.errors;
    s.breaker = p.breaker.state();
    s.cooling = std::max({std::chrono::nanoseconds::zero(), p.cooldown.left(now),
                          m.cooldown.left(now), p.exhausted.left(now), m.exhausted.left(now)});
    s.latency = std::chrono::nanoseconds(m.latency_ns.load(std::memory_order_relaxed));
    const auto per_minute = [](weir::rate r) { return r.per_second * 60; };
    if (m.adapt) {
      const auto pacing = m.adapt->state();
      if (auto l = pacing.known ? pacing.known : pacing.ceiling) s.requests_limit = per_minute(*l);
      s.discovering = pacing.slow_start;
    } else if (m.limits) {
      if (auto l = m.limits->get_limit(dimension::requests)) s.requests_limit = per_minute(l->rate);
    }
    if (m.limits)
      if (auto l = m.limits->get_limit(dimension::tokens)) s.tokens_limit = per_minute(l->rate);
    return s;
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

}  // namespace weir::detail::router_internals
