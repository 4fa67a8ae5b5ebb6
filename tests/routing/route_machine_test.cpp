// Specifications of weir/routing/route_machine.hpp: a route's decisions with numbers alone, no
// coroutine, server or clock.
#include "../support/routing.hpp"

namespace {

constexpr std::int64_t clock_ns(ns t) { return t.count(); }

// A route over `models` models, needing no context, with a backoff without jitter.
weir::routing::route_machine machine_over(std::size_t models,
                                          weir::routing::route_machine::settings s = {}) {
  s.retry_backoff = weir::backoff::exponential(200ms, 2.0, 5s);
  return weir::routing::route_machine(models, 0, std::move(s), 1);
}

weir::classification judged_as(weir::verdict kind) { return {.kind = kind}; }

}  // namespace

TEST_CASE("a route tries the model selection picked, and gives up after max_attempts attempts",
          "[routing][route_machine]") {
  auto route = machine_over(2, {.max_attempts = 2});
  CHECK(!route.check(0));
  const auto first = route.selected({.picked = 1, .any_capable = true}, 0);
  CHECK(first.kind == weir::routing::route_step_kind::try_model);
  CHECK(first.model == 1);
  route.sent();
  CHECK(route.ended({.model = 1, .judged = judged_as(weir::verdict::success)}).answer);
  route.sent();
  const auto stop = route.check(0);
  REQUIRE(stop);
  CHECK(stop->kind == weir::routing::route_step_kind::give_up);
  CHECK(stop->reason == weir::routing::give_up_reason::attempts_exhausted);
  CHECK(route.attempts() == 2);
}

TEST_CASE("a route whose deadline passed gives up, a local refusal when nothing was sent",
          "[routing][route_machine]") {
  auto route = machine_over(1, {.deadline_ns = clock_ns(10s)});
  CHECK(!route.check(clock_ns(9s)));
  auto before = route.check(clock_ns(10s));
  REQUIRE(before);
  CHECK(before->reason == weir::routing::give_up_reason::deadline_passed);
  CHECK(before->refused_before_sending);
  route.sent();
  auto after = route.check(clock_ns(11s));
  REQUIRE(after);
  CHECK(after->reason == weir::routing::give_up_reason::deadline_passed);
  CHECK(!after->refused_before_sending);
}

TEST_CASE("a 429 that says only Retry-After holds back that model for this route alone",
          "[routing][route_machine]") {
  auto route = machine_over(2);
  route.sent();
  weir::classification refused{.kind = weir::verdict::rate_limited};
  refused.hint.retry_after = 3s;
  const auto told = route.ended({.model = 0, .judged = refused, .finished_ns = clock_ns(10s)});
  CHECK(!told.answer);
  CHECK(!told.hold);
  CHECK(route.not_before()[0] == clock_ns(13s));
  CHECK(route.tried()[0] == 0);  // still a candidate, once its wait is over

  // Without Retry-After the provider's default cooldown is the wait.
  route.sent();
  const auto silent = route.ended({.model = 1,
                                   .judged = judged_as(weir::verdict::rate_limited),
                                   .finished_ns = clock_ns(10s),
                                   .default_cooldown = 2s});
  CHECK(!silent.hold);
  CHECK(route.not_before()[1] == clock_ns(12s));
}

TEST_CASE(
    "a 429 saying the quota is spent cools the model, or its provider when limits are per "
    "account",
    "[routing][route_machine]") {
  weir::classification spent{.kind = weir::verdict::rate_limited};
  spent.hint.requests.remaining = 0;
  spent.hint.requests.reset_after = 20s;
  auto route = machine_over(2);
  route.sent();
  const auto model = route.ended({.model = 0, .judged = spent, .finished_ns = clock_ns(5s)});
  REQUIRE(model.hold);
  CHECK(model.hold->why == weir::routing::model_hold::kind::cooling);
  CHECK(!model.hold->whole_provider);
  CHECK(model.hold->until_ns == clock_ns(25s));
  CHECK(model.hold->length == ns(20s));

  route.sent();
  const auto account = route.ended(
      {.model = 1, .judged = spent, .finished_ns = clock_ns(5s), .limits_per_provider = true});
  REQUIRE(account.hold);
  CHECK(account.hold->whole_provider);
}

TEST_CASE("a retryable failure sends the route elsewhere first, then back after a growing backoff",
          "[routing][route_machine]") {
  auto route = machine_over(2);
  route.sent();
  CHECK(!route.ended({.model = 0, .judged = judged_as(weir::verdict::retryable), .finished_ns = 0})
             .answer);
  CHECK(route.tried()[0] != 0);
  CHECK(route.not_before()[0] == clock_ns(200ms));
  route.sent();
  CHECK(!route.ended({.model = 1, .judged = judged_as(weir::verdict::retryable), .finished_ns = 0})
             .answer);
  CHECK(route.not_before()[1] == clock_ns(400ms));

  // Nothing capable is left untried: both come back, each after its own backoff.
  const auto again = route.selected({.any_capable = false}, 0);
  CHECK(again.kind == weir::routing::route_step_kind::select_again);
  CHECK(route.tried()[0] == 0);
  CHECK(route.tried()[1] == 0);
}

TEST_CASE("a server error whose slot was given back is retried at once, the first time only",
          "[routing][route_machine]") {
  // The gateway failed the request before the limit counted it (the model's pacing gave the
  // slot back): the request takes that slot. A second such failure backs off as any would.
  auto route = machine_over(1);
  const auto given_back = [&](ns at) {
    route.sent();
    return route.ended({.model = 0,
                        .judged = judged_as(weir::verdict::retryable),
                        .finished_ns = clock_ns(at),
                        .slot_given_back = true});
  };
  CHECK(!given_back(1s).answer);
  CHECK(route.not_before()[0] == clock_ns(1s));
  CHECK(!given_back(2s).answer);
  CHECK(route.not_before()[0] == clock_ns(2s + 400ms));
}

TEST_CASE(
    "a spent quota or credit keeps the model out as long as the server said, or until "
    "restored",
    "[routing][route_machine]") {
  weir::classification quota{.kind = weir::verdict::exhausted};
  quota.reason = {.cause = weir::refusal_cause::quota, .resets_after = 1h};
  weir::classification credit{.kind = weir::verdict::exhausted};
  credit.reason = {.cause = weir::refusal_cause::billing};

  auto route = machine_over(3, {.exhausted_for = 10min});
  route.sent();
  const auto q = route.ended({.model = 0, .judged = quota, .finished_ns = clock_ns(1s)});
  REQUIRE(q.hold);
  CHECK(q.hold->why == weir::routing::model_hold::kind::exhausted);
  CHECK(!q.hold->whole_provider);
  CHECK(q.hold->until_ns == clock_ns(1s + 1h));
  CHECK(route.tried()[0] != 0);

  // The account's credit: the whole provider, for exhausted_for when the server did not say.
  route.sent();
  const auto c = route.ended({.model = 1, .judged = credit, .finished_ns = clock_ns(1s)});
  REQUIRE(c.hold);
  CHECK(c.hold->whole_provider);
  CHECK(c.hold->length == ns(10min));

  // With no exhausted_for: until restored.
  auto forever = machine_over(1);
  forever.sent();
  const auto f = forever.ended({.model = 0, .judged = credit, .finished_ns = clock_ns(1s)});
  REQUIRE(f.hold);
  CHECK(!f.hold->until_ns);
  CHECK(!f.hold->length);
}

TEST_CASE(
    "a fatal answer is the route's, unless the model refused locally or its context was "
    "too small",
    "[routing][route_machine]") {
  auto route = machine_over(3);
  route.sent();
  const auto local =
      route.ended({.model = 0, .judged = judged_as(weir::verdict::fatal), .refused_locally = true});
  CHECK(!local.answer);
  CHECK(local.refused_locally);
  CHECK(route.tried()[0] != 0);

  route.sent();
  const auto too_small = route.ended({.model = 1,
                                      .judged = judged_as(weir::verdict::fatal),
                                      .context_exceeded = true,
                                      .context_window = 8000});
  CHECK(!too_small.answer);
  CHECK(too_small.context_exceeded);
  CHECK(route.min_context() == 8001);

  route.sent();
  CHECK(route.ended({.model = 2, .judged = judged_as(weir::verdict::fatal)}).answer);
  // A cancelled call is an answer, whatever the context.
  CHECK(route
            .ended({.model = 2,
                    .judged = judged_as(weir::verdict::fatal),
                    .cancelled = true,
                    .context_exceeded = true})
            .answer);
}

TEST_CASE("with no model picked, a route waits for the first with room, or says why it cannot",
          "[routing][route_machine]") {
  auto route = machine_over(2, {.deadline_ns = clock_ns(10s)});
  const auto wait = route.selected({.any_capable = true, .earliest = 3s}, clock_ns(5s));
  CHECK(wait.kind == weir::routing::route_step_kind::wait);
  CHECK(wait.wait == 3s);

  // Room only after the deadline: no_room, saying when.
  const auto late = route.selected({.any_capable = true, .earliest = 6s}, clock_ns(5s));
  CHECK(late.kind == weir::routing::route_step_kind::give_up);
  CHECK(late.reason == weir::routing::give_up_reason::no_room);
  CHECK(late.retry_after == ns(6s));
  // Never room (every capable provider isolated): no_room, no retry_after.
  const auto never = route.selected({.any_capable = true}, clock_ns(5s));
  CHECK(never.reason == weir::routing::give_up_reason::no_room);
  CHECK(!never.retry_after);

  // Not allowed to wait.
  auto hasty = machine_over(1, {.wait_for_capacity = false});
  CHECK(hasty.selected({.any_capable = true, .earliest = 1ms}, 0).reason ==
        weir::routing::give_up_reason::no_room);

  // Nothing capable: no model meets the constraints, or each that did failed.
  auto none = machine_over(1);
  CHECK(none.selected({}, 0).reason == weir::routing::give_up_reason::no_capable_model);
  none.sent();
  (void)none.ended({.model = 0,
                    .judged = judged_as(weir::verdict::fatal),
                    .refused_locally = true,
                    .failure = std::make_exception_ptr(std::runtime_error("full"))});
  CHECK(none.last_failure());
  CHECK(none.selected({}, 0).reason == weir::routing::give_up_reason::every_model_failed);

  // Every model that fits was priced out by a budget: over_budget, a local refusal.
  auto priced = machine_over(1);
  const auto over = priced.selected({.priced_out = true}, 0);
  CHECK(over.reason == weir::routing::give_up_reason::over_budget);
  CHECK(over.refused_before_sending);
}
