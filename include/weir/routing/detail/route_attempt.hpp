// A route's attempt on one model, run by the pipeline's driver (weir/detail/driver.hpp), and what
// a route keeps while it runs (see router.hpp).
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/core/trace.hpp>
#include <weir/detail/driver.hpp>
#include <weir/detail/limiter_stage.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/routing/route_machine.hpp>
#include <weir/routing/types.hpp>
#include <weir/throttling/spend_budget.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace weir::detail::router_internals {
using namespace weir::routing;

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
template <class State>
struct route_progress {
  using constraints = typename State::constraints;

  route_progress(const State& s, const constraints& c)
      : machine(s.models.size(), fitting_context(c), settings_of(s, c),
                s.route_seeds.fetch_add(1, std::memory_order_relaxed)),
        estimate(cost_of(c)) {
    record.estimated_tokens = estimate.tokens;
  }

  static route_machine::settings settings_of(const State& s, const constraints& c) {
    return {.max_attempts = s.options.max_attempts,
            .retry_backoff = s.options.retry_backoff,
            .exhausted_for = s.options.exhausted_for,
            .wait_for_capacity = c.wait_for_capacity,
            .deadline_ns =
                c.deadline ? std::optional(weir::detail::to_nanos(*c.deadline)) : std::nullopt};
  }

  // The route ends with model `spec`'s answer: the record says whose it is and, for a success,
  // what it used and cost (for a stream, its estimate: the stream's report has the rest).
  template <class Lesson>
  void answered(const model_spec& spec, const constraints& c, const Lesson& l) {
    record.provider = spec.provider;
    record.model = spec.id;
    if (!l.judged.is_success()) return;
    record.settled_tokens = l.tokens;
    record.cost = l.used ? spec.cost(*l.used) : spec.cost(c.input_tokens, c.output_tokens);
    if (l.used) {
      record.cache_read_tokens = l.used->cache_read_tokens;
      record.cache_write_tokens = l.used->cache_write_tokens;
    }
  }

  route_machine machine;
  usage estimate;
  route_record record;
  std::shared_ptr<hedge_race> race{};  // when the route is one of a hedged request's
  trace_ids ids{};                     // the route's trace id and the current attempt's span id
};

// What one route's attempt on a model does when it ends, for a router whose shared state is
// State (router_state.hpp).
template <class State>
struct route_attempt {
  using Response = typename State::response_type;
  using Clock = typename State::clock_type;
  using time_point = typename Clock::time_point;
  using nanos = std::chrono::nanoseconds;
  using constraints = typename State::constraints;
  using ticket_type = typename circuit_breaker<Clock>::ticket;
  using route_progress = router_internals::route_progress<State>;

  // What events of the route as a whole carry: its trace id, no attempt's span.
  static trace_ids route_ids(const constraints& c) { return {c.trace.trace_id, {}}; }

  // The failure a route reports if it ends on this answer: the exception, else one that names
  // the model and what its answer was.
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

  // Model i was picked and its limits charged: the breaker's ticket to send with, or nullopt
  // when another request took the last half-open probe (the model is then skipped). Throws
  // when the route ends here; either way without sending, the charge goes back.
  static std::optional<ticket_type> admit(State& s, const constraints& c, std::size_t i,
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
    bool slot_given_back = false;  // see observe
  };
  // A stream (see weir/composition/stream.hpp) is judged at its first chunk and settled at its end.
  static constexpr bool streamed = weir::detail::settles_at_stream_end<Response>;

  // What an answer of model i teaches before anything is settled: the pacing (and through it the
  // fleet), the route's steps and the latency estimate. A stream's latency is its time to first
  // token. A cancelled call, or one the provider's own code refused before sending, is no answer:
  // the pacing learns nothing from it. Returns whether the pacing gave the attempt's slot back (a
  // server error the limit did not count).
  static bool observe(State& s, std::size_t i, const classification& judged, bool answered,
                      time_point started, time_point finished, route_progress& route) {
    auto& m = *s.models[i];
    const auto latency = std::chrono::duration_cast<nanos>(finished - started);
    bool given_back = false;
    if (m.adapt && answered) {
      given_back = m.adapt->observe(judged, started, finished);
      if (s.options.fleet)
        if (const auto known = m.adapt->state().known;
            known && m.shared_limit.exchange(known->per_second) != known->per_second)
          s.options.fleet->publish_limit(m.spec->provider, m.spec->id, known->per_second);
    }
    route.record.steps.push_back({m.spec->provider, m.spec->id, judged.kind, latency});
    if (route.race) route.race->ended(route.record.steps.back());
    if (judged.is_success()) s.note_latency(m, latency);
    if (answered && judged.kind == verdict::retryable) s.note_failure_latency(m, latency);
    return given_back;
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
  struct stage {
    struct slot {};

    stage(std::shared_ptr<State> st, std::size_t i, ticket_type t, charges_type held,
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
    stage(stage&&) noexcept = default;
    stage& operator=(stage&&) = delete;
    ~stage() {
      if (s && !entered) give_back();
    }

    bool try_enter(slot&, stage_context<Clock>&) { return entered = true; }

    stage_action exit(slot&, stage_context<Clock>& env, const outcome<Response>& result) {
      if (env.stream)
        settle_stream(*env.stream, env.call, result);
      else
        settle_whole(env.call, result);
      return {};
    }

   private:
    // A call that ended with no stream to follow: settled now, and the lesson the route reads.
    void settle_whole(const basic_call_context<Clock>& call, const outcome<Response>& result) {
      auto& l = *whole.learned;
      const auto& c = *whole.asked;
      l.settled = true;
      l.judged = s->options.classifier(result);
      l.finished = Clock::now();
      const bool reached = result.reached_provider();
      // The route's deadline passing mid-call is the caller's giving up, not an answer: neither
      // the breaker nor the pacing learns from it (call_context::cut_by_deadline).
      const bool answered = reached && !call.cut_by_deadline(result);
      l.slot_given_back =
          observe(*s, model, l.judged, answered, started, l.finished, *whole.progress);
      if constexpr (!streamed)
        if (l.judged.is_success() && s->options.usage_of)
          l.used = s->options.usage_of(result.value());
      // A success, or a call sent and then given up, may have produced tokens; a failure that
      // says nothing, or a call the provider's code refused before sending, did not.
      const bool sent = !result.refused_locally();
      l.tokens = settle(sent, answered, l.judged.kind, l.used,
                        l.judged.is_success() || (sent && !answered));
      if (!s->options.watch || !(reached || result.cancelled())) return;
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
        const auto tokens = settle(true, true, kind, used, true);
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

    // What the end of a call teaches, for both shapes: the breaker (its ticket), the usage
    // window, and the limits and budgets, each by the rule its stage uses (settled_usage,
    // usage_record_of, settle_spend) with what the provider counts of `used`. Returns the tokens
    // used: reported, else what the limits were settled to. A 429 is the cooldown's business,
    // not the breaker's (circuit_breaker_options says why).
    std::uint64_t settle(bool sent, bool answered, verdict kind,
                         const std::optional<token_usage>& used, bool maybe_billed) {
      auto& m = *s->models[model];
      s->providers[m.provider]->breaker.settle(ticket, answered, kind);
      // What the provider counts: at Anthropic, say, not the input read from its cache.
      const usage spent = weir::detail::settled_usage(
          sent, used ? std::optional(m.spec->limited_usage(*used)) : std::nullopt, maybe_billed,
          estimate);
      if (sent)
        m.monitor.record(weir::detail::usage_record_of(answered, kind, spent.tokens), started);
      if (m.limits) m.limits->settle(estimate, spent, started);
      const spend_ending spend{
          .reported_cost = used ? std::optional(m.spec->cost(*used)) : std::nullopt,
          .maybe_billed = maybe_billed,
          .estimated_cost = m.spec->cost(estimate.input_tokens, estimate.output_tokens)};
      for (auto& r : charges) settle_spend(r, spend);
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

    std::shared_ptr<State> s;
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
  using driver = weir::detail::driver<Clock, default_classifier, stage>;
};

}  // namespace weir::detail::router_internals
