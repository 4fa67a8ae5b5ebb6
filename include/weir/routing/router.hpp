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
#include <weir/detail/driver.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/detail/small_buffer.hpp>
#include <weir/failure/hedging.hpp>
#include <weir/routing/catalog.hpp>
#include <weir/routing/detail/route_attempt.hpp>
#include <weir/routing/detail/router_state.hpp>
#include <weir/routing/route_machine.hpp>
#include <weir/routing/selection.hpp>
#include <weir/routing/types.hpp>

#include <fmt/format.h>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
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
    for (const auto& m : state_->models) out.push_back(state_->status_of(*m, now));
    return out;
  }

 private:
  using nanos = std::chrono::nanoseconds;

  using state = weir::detail::router_internals::router_state<Request, Response, Clock, Classifier>;
  using hedge_race = weir::detail::router_internals::hedge_race;
  using route_progress = weir::detail::router_internals::route_progress<state>;
  using attempt = weir::detail::router_internals::route_attempt<state>;
  using ticket_type = typename attempt::ticket_type;

  [[noreturn]] static void refuse_over_budget(const state& s, const constraints& c,
                                              const typename state::priced_out_models& out) {
    s.emit(rejected{c.operation, rejection::over_budget, out.room, "router"},
           attempt::route_ids(c));
    throw weir::exception::refusal(
        error::over_budget,
        fmt::format("router: every model that fits the request would pass budget {}{}{}{}",
                    out.budget, out.key.empty() ? "" : " for ", out.key,
                    out.room ? fmt::format("; room again in {:.0f} s",
                                           std::chrono::duration<double>(*out.room).count())
                             : std::string("; no room before calls in flight settle, if ever")),
        out.room);
  }

  // The route ends without an answer, as its machine decided: the error (and event) saying why.
  [[noreturn]] static void give_up(const state& s, const constraints& c,
                                   const route_progress& route, const route_decision& d,
                                   const std::optional<typename state::priced_out_models>& priced) {
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
    s.emit(rejected{c.operation, rejection::rate_limited, d.retry_after, "router"},
           attempt::route_ids(c));
    throw weir::exception(error::no_provider_available,
                          d.retry_after ? "router: no capable model has room before the deadline"
                                        : "router: every capable provider is isolated",
                          d.retry_after, cause, attempts);
  }

  // After an answer of model i that is not a success: false when it is the route's answer (a
  // fatal one); else the route falls back, and what the failure means for the model (a cooldown,
  // a spent quota) holds for every route.
  static bool fall_back(state& s, const constraints& c, std::size_t i,
                        const outcome<Response>& result, const typename attempt::lesson& l,
                        route_progress& route) {
    const auto& judged = l.judged;
    const auto finished = l.finished;
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
         .slot_given_back = l.slot_given_back,
         .failure =
             judged.is_success() ? std::exception_ptr{} : attempt::failure_of(result, spec, judged),
         .context_window = spec.context_window,
         .limits_per_provider = p.spec->cooldown_scope == cooldown_scope::provider,
         .default_cooldown = p.spec->default_cooldown});
    if (ended.answer) return false;
    if (const auto& hold = ended.hold)
      s.hold(i, *hold, judged.reason, finished, c.operation, route.ids);
    s.emit(route_fallback{c.operation, spec.provider, spec.id, judged.kind, ended.context_exceeded,
                          ended.refused_locally},
           route.ids);
    return true;
  }

  // Before a selection: what the fleet knows joins what this router knows (one round trip).
  static boost::asio::awaitable<void> hear_from_fleet(std::shared_ptr<state> s,
                                                      const constraints& c) {
    auto news = co_await s->options.fleet->read();
    const bool reachable = news.has_value();
    if (s->fleet_reachable.exchange(reachable) != reachable)
      s->emit(fleet_connection{c.operation, reachable}, attempt::route_ids(c));
    if (news) s->hear(*news, Clock::now());
  }

  // The route loop: pick a model (or wait for one), admit, send, learn, and answer or fall back.
  static boost::asio::awaitable<routed<Response>> run(std::shared_ptr<state> s, Request request,
                                                      constraints c,
                                                      std::shared_ptr<hedge_race> race = {}) {
    route_progress route(*s, c);
    route.race = std::move(race);
    route.ids = attempt::route_ids(c);
    std::optional<typename state::priced_out_models> priced;
    if (!s->options.budgets.empty()) priced.emplace(s->models.size());
    boost::asio::basic_waitable_timer<Clock> timer(co_await boost::asio::this_coro::executor);
    if (s->options.fallback_budget) s->options.fallback_budget->deposit();

    for (;;) {
      if (s->options.fleet) co_await hear_from_fleet(s, c);
      const auto now = Clock::now();
      const auto now_ns = weir::detail::to_nanos(now);
      if (const auto stop = route.machine.check(now_ns)) give_up(*s, c, route, *stop, priced);
      ranking ranked(s->models.size());
      const bool priced_out = priced && s->price_out(c, route.machine.tried(),
                                                     route.machine.min_context(), now, *priced);
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
        s->emit(throttled{c.operation, next.wait, "router"}, attempt::route_ids(c));
        timer.expires_after(std::chrono::duration_cast<typename Clock::duration>(next.wait));
        co_await timer.async_wait(boost::asio::use_awaitable);
        route.record.waited += std::chrono::duration_cast<nanos>(Clock::now() - now);
        continue;
      }
      const auto i = next.model;
      auto charges = s->charge_budgets(c, i, now);
      if (!charges) {
        s->models[i]->unreserve(route.estimate, now);
        continue;  // another route took the room first: the next selection sees it
      }
      std::optional<ticket_type> ticket;
      try {
        ticket = attempt::admit(*s, c, i, route, now);
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
      if constexpr (attempt::streamed)
        if (s->options.response_model_of) answered_by = std::make_shared<std::string>();
      typename attempt::lesson l;
      auto send = [&provider = *s->providers[s->models[i]->provider], &spec, &request,
                   &attempt_trace] { return provider.call(spec, request, attempt_trace); };
      auto result = co_await capture(attempt::driver::template run<Response, 0>(
          typename attempt::driver::shared(
              default_classifier{}, typename attempt::stage(s, i, *ticket, std::move(*charges), c,
                                                            route, l, started, answered_by)),
          &call, std::move(send), 1));
      if (!l.settled) {
        // A stream's first chunk (its stage settles it at its end), or an attempt never sent.
        l.judged = s->options.classifier(result);
        l.finished = Clock::now();
        l.tokens = route.estimate.tokens;
        if (result.has_value())
          l.slot_given_back = attempt::observe(*s, i, l.judged, result.reached_provider(), started,
                                               l.finished, route);
      }
      if (l.judged.is_success() && !c.session.empty()) {
        // The provider now holds this prompt: the prefix the session's next request resends.
        const auto prefix = l.used ? l.used->input_tokens : c.input_tokens;
        s->caches.note(c.session, i, prefix, l.finished,
                       s->providers[s->models[i]->provider]->cache_ttl);
      }
      if constexpr (attempt::streamed) {
        if (l.judged.is_success()) {
          Response stream = std::move(result).get();
          if (answered_by) *answered_by = s->options.response_model_of(stream);
          route.answered(spec, c, l);  // the estimate: the stream's report has the rest
          co_return routed<Response>{std::move(stream), std::move(route.record)};
        }
      }

      if (l.judged.kind == verdict::success || !fall_back(*s, c, i, result, l, route)) {
        route.answered(spec, c, l);
        co_return routed<Response>{std::move(result).get(), std::move(route.record)};
      }
    }
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir::routing
