// What one route decides, apart from everything it does: which model next, how long to wait,
// when to give up, and what a failure means for the model that failed. It reads no clock, holds
// no lock and sends nothing: the router tells it what happened (a deadline check, a selection's
// result, an attempt's end) and carries out what it answers. So every rule of a route can be
// tested with numbers alone (tests/routing/route_machine_test.cpp), as Boost.Redis tests its
// protocol's state machines.
//
//     route_machine route(models, fitting_context(c), {.max_attempts = 4, .deadline_ns = ...}, seed);
//     for (;;) {
//       if (auto stop = route.check(now_ns)) give up with *stop;
//       auto next = route.selected({.picked = ..., .any_capable = ..., .earliest = ...}, now_ns);
//       ...  // try next.model, wait next.wait, select again, or give up
//       auto ended = route.ended({.model = i, .judged = ..., .finished_ns = ...});
//       if (ended.answer) return the outcome;  // else apply ended.hold and select again
//     }
#pragma once

#include <weir/core/outcome.hpp>
#include <weir/detail/small_buffer.hpp>
#include <weir/failure/backoff.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <optional>
#include <random>
#include <span>

namespace weir::routing {

// What a route does next.
enum class route_step_kind {
  try_model,     // send the request to `model`
  select_again,  // look for a model again now (the models that failed retryably are back)
  wait,          // no model has room: look again after `wait`
  give_up,       // the route ends with `reason`
};

// Why a route ends without an answer.
enum class give_up_reason {
  deadline_passed,     // nothing is sent past the deadline
  attempts_exhausted,  // max_attempts attempts were made
  over_budget,         // every model that fits would pass a spend budget
  no_capable_model,    // no model meets the constraints (and none was tried)
  every_model_failed,  // every capable model failed this request
  no_room,             // none has room now, and waiting is not allowed or would pass the deadline
};

struct route_decision {
  route_step_kind kind = route_step_kind::select_again;
  std::size_t model = 0;                                  // try_model
  std::chrono::nanoseconds wait{0};                       // wait
  give_up_reason reason{};                                // give_up
  std::optional<std::chrono::nanoseconds> retry_after{};  // give_up: when a model frees up
  // give_up: nothing was sent by this route (a local refusal)
  bool refused_before_sending = false;
};

// What the router found when it looked for a model (selection.hpp's rank and choose).
struct selection_result {
  std::optional<std::size_t> picked{};  // the model that took the request, its limits charged
  bool any_capable = false;             // some model fits the request, ready or not
  // Among the capable models not ready, the shortest wait (max: none will ever be).
  std::chrono::nanoseconds earliest = std::chrono::nanoseconds::max();
  bool priced_out = false;  // some model that fits was skipped for a spend budget
};

// How one attempt ended, as far as the route's decision goes.
struct attempt_end {
  std::size_t model = 0;
  classification judged{};
  bool refused_locally = false;   // the model's own stages turned it away before sending
  bool cancelled = false;         // no answer: the call was cancelled
  bool context_exceeded = false;  // a fatal answer saying the request does not fit the model
  std::int64_t finished_ns = 0;   // clock nanoseconds
  // A server error whose slot the model's pacing gave back: the limit never counted it.
  bool slot_given_back = false;
  std::exception_ptr failure{};  // what the route reports if it ends on this failure
  // Of the model and its provider:
  std::uint64_t context_window = 0;  // 0: unknown
  bool limits_per_provider = false;  // the provider's quotas are per account, not per model
  std::chrono::nanoseconds default_cooldown{std::chrono::seconds(1)};
};

// A failure's consequence beyond this route: nobody sends to the model (or to its whole
// provider) until `until_ns`, or, with none, until the router is told to restore it.
struct model_hold {
  enum class kind { cooling, exhausted };
  kind why = kind::cooling;
  bool whole_provider = false;
  std::optional<std::int64_t> until_ns{};            // clock nanoseconds; nullopt: until restored
  std::optional<std::chrono::nanoseconds> length{};  // how long from the attempt's end
};

// What an attempt's end means for the route.
struct attempt_judgement {
  bool answer = false;  // the outcome is the route's answer (a success, or a fatal failure)
  bool context_exceeded = false;
  bool refused_locally = false;
  std::optional<model_hold> hold{};
};

class route_machine {
 public:
  using nanos = std::chrono::nanoseconds;

  struct settings {
    unsigned max_attempts = 4;
    weir::backoff retry_backoff =
        weir::backoff::exponential(std::chrono::milliseconds(200), 2.0, std::chrono::seconds(5));
    // How long a spent quota keeps a model out when the server did not say (nullopt: until
    // restored).
    std::optional<nanos> exhausted_for{};
    bool wait_for_capacity = true;
    std::optional<std::int64_t> deadline_ns{};  // clock nanoseconds
  };

  route_machine(std::size_t models, std::uint64_t min_context, settings s, std::uint32_t seed)
      : tried_(models, untried),
        not_before_(models, 0),
        min_context_(min_context),
        settings_(std::move(s)),
        random_(seed) {}

  // Before each selection: the end of the route when the deadline has passed or every attempt
  // was made; nullopt to go on.
  std::optional<route_decision> check(std::int64_t now_ns) const {
    if (settings_.deadline_ns && now_ns >= *settings_.deadline_ns)
      return give_up(give_up_reason::deadline_passed, {}, attempts_ == 0);
    if (attempts_ == settings_.max_attempts) return give_up(give_up_reason::attempts_exhausted);
    return std::nullopt;
  }

  // What to do after a selection at `now_ns`.
  route_decision selected(const selection_result& found, std::int64_t now_ns) {
    if (found.picked) return {.kind = route_step_kind::try_model, .model = *found.picked};
    if (!found.any_capable) {
      // The models that failed retryably may be tried again, after their backoff.
      bool any = false;
      for (auto& t : tried_.span())
        if (t == tried_retryable) t = untried, any = true;
      if (any) return {.kind = route_step_kind::select_again};
      if (found.priced_out) return give_up(give_up_reason::over_budget, {}, true);
      if (attempts_ == 0 && !last_failure_) return give_up(give_up_reason::no_capable_model);
      return give_up(give_up_reason::every_model_failed);
    }
    const auto wait = found.earliest;
    const bool never = wait == nanos::max();
    const auto retry_after = never ? std::nullopt : std::optional(wait);
    if (never || !settings_.wait_for_capacity ||
        (settings_.deadline_ns && now_ns + wait.count() > *settings_.deadline_ns))
      return give_up(give_up_reason::no_room, retry_after);
    return {.kind = route_step_kind::wait, .wait = wait};
  }

  // The picked model turned the request away before it was sent (its breaker's last probe was
  // taken, its queue is full): the route does not try it again.
  void passed_over(std::size_t model) { tried_.span()[model] = tried_for_good; }

  // An attempt is sent.
  void sent() { ++attempts_; }

  // An attempt ended: is it the route's answer, and, if not, what does its failure mean?
  attempt_judgement ended(const attempt_end& a) {
    attempt_judgement out;
    auto& tried = tried_.span()[a.model];
    auto& not_before = not_before_.span()[a.model];
    switch (a.judged.kind) {
      case verdict::success: out.answer = true; return out;
      case verdict::rate_limited:
        if (const auto cool = a.judged.hint.exhausted_for()) {
          // The quota is spent until then: nobody sends there before it has room again.
          out.hold = model_hold{.why = model_hold::kind::cooling,
                                .whole_provider = a.limits_per_provider,
                                .until_ns = a.finished_ns + cool->count(),
                                .length = *cool};
        } else {
          // Only this request was refused: it waits as the server said before it tries this
          // model again.
          const auto wait = a.judged.hint.retry_after.value_or(a.default_cooldown);
          not_before = a.finished_ns + wait.count();
        }
        break;
      case verdict::retryable:
        // Another model first; this one again after a backoff if none is left, as a retry
        // would: with one model, a 503 is retried rather than the end of the request.
        tried = tried_retryable;
        // A gateway that failed the request before the limit counted it gave its slot back:
        // the request takes it at once, the first time (later ones back off, so that a
        // provider that fails everything at once is not hammered).
        if (a.slot_given_back && retryable_failures_ == 0) {
          ++retryable_failures_;
          not_before = std::max(not_before, a.finished_ns);
          break;
        }
        last_backoff_ =
            settings_.retry_backoff.delay(retryable_failures_++, last_backoff_, random_);
        not_before = std::max(not_before, a.finished_ns + last_backoff_.count());
        break;
      case verdict::exhausted: {
        // No retry helps before the quota resets or someone pays: the model (for the account's
        // credit, its whole provider) is out until then, or until restored.
        const auto out_for =
            a.judged.reason.resets_after ? a.judged.reason.resets_after : settings_.exhausted_for;
        out.hold = model_hold{
            .why = model_hold::kind::exhausted,
            .whole_provider =
                a.judged.reason.cause == refusal_cause::billing || a.limits_per_provider,
            .until_ns = out_for ? std::optional(a.finished_ns + out_for->count()) : std::nullopt,
            .length = out_for};
        tried = tried_for_good;
        break;
      }
      case verdict::fatal:
        if (a.refused_locally) {
          // This model has no room for the request now (its queue is full, its budget spent);
          // another may.
          tried = tried_for_good;
          out.refused_locally = true;
          break;
        }
        if (a.cancelled || !a.context_exceeded) {
          out.answer = true;
          return out;
        }
        tried = tried_for_good;
        if (a.context_window != 0) min_context_ = std::max(min_context_, a.context_window + 1);
        out.context_exceeded = true;
        break;
    }
    last_failure_ = a.failure;
    return out;
  }

  // Per model: whether this route may not try it now (selection.hpp's `tried`).
  std::span<const char> tried() const { return tried_.span(); }
  // Per model: when this route may try it again (clock nanoseconds).
  std::span<const std::int64_t> not_before() const { return not_before_.span(); }
  // The context window the request needs: grows when a model's proved too small.
  std::uint64_t min_context() const noexcept { return min_context_; }
  unsigned attempts() const noexcept { return attempts_; }
  // The failure the route reports if it ends now (null: none yet).
  const std::exception_ptr& last_failure() const noexcept { return last_failure_; }

 private:
  // What tried_ holds for a model: not tried; failed in a way another attempt may not (fatal,
  // too small a context, refused locally); failed in a way it may (a 5xx, a reset), tried again
  // after a backoff once no other capable model is left.
  enum : char { untried = 0, tried_for_good = 1, tried_retryable = 2 };

  route_decision give_up(give_up_reason why, std::optional<nanos> retry_after = {},
                         bool refused = false) const {
    return {.kind = route_step_kind::give_up,
            .reason = why,
            .retry_after = retry_after,
            .refused_before_sending = refused};
  }

  weir::detail::small_buffer<char, 32> tried_;
  weir::detail::small_buffer<std::int64_t, 32> not_before_;
  std::uint64_t min_context_;
  settings settings_;
  unsigned attempts_ = 0;
  unsigned retryable_failures_ = 0;
  nanos last_backoff_{0};
  std::minstd_rand random_;  // the backoff's jitter
  std::exception_ptr last_failure_{};
};

}  // namespace weir::routing
