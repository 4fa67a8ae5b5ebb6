// Specifications of weir/routing/router.hpp, on virtual time against scripted providers.
#include "../support/common.hpp"
#include "../support/provider_errors.hpp"
#include "../support/routing.hpp"

#include <weir/observability/metrics.hpp>

TEST_CASE("the cheapest capable model is chosen, and capability and context filter",
          "[routing][router]") {
  asio::io_context io;
  router_type r(io.get_executor(), two_models(), unpaced());
  provider a, b;
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  auto cheap = route_now(io, r, {.input_tokens = 100, .output_tokens = 50});
  REQUIRE(cheap.value);
  CHECK(cheap.value->route.model == "a-small");
  CHECK(cheap.value->route.cost == Approx((100 * 1 + 50 * 2) / 1e6));

  auto capable = route_now(io, r, {.input_tokens = 100, .min_capability = 6});
  REQUIRE(capable.value);
  CHECK(capable.value->route.model == "b-large");

  auto big = route_now(io, r, {.input_tokens = 9'000, .output_tokens = 500});
  REQUIRE(big.value);
  CHECK(big.value->route.model == "b-large");

  auto excluded = route_now(io, r, {.excluded_providers = {"a"}});
  REQUIRE(excluded.value);
  CHECK(excluded.value->route.provider == "b");

  auto pricey = route_now(io, r, {.input_tokens = 1'000'000, .min_context = 0, .max_cost = 2.0});
  REQUIRE(pricey.error);  // a-small cannot hold it, b-large costs $3
  CHECK(pricey.error->code() == weir::error::no_provider_available);
  CHECK_FALSE(pricey.error->retry_after());
  CHECK(a.calls() + b.calls() == 4);
}

TEST_CASE("a model whose own queue is full is passed over for the request, not failed",
          "[routing][router]") {
  asio::io_context io;
  std::vector<std::string> seen;
  router_type r(io.get_executor(), two_models(), unpaced_recording(seen));
  int refused = 0;
  r.connect("a",
            [&](const weir::routing::model_spec&, const prompt&) -> asio::awaitable<fake_response> {
              ++refused;
              throw weir::exception::refusal(weir::error::queue_full, "request_queue");
              co_return fake_response::ok();
            });
  provider b;
  r.connect("b", b.call<prompt>());
  auto spilled = route_now(io, r);
  REQUIRE(spilled.value);
  CHECK(spilled.value->route.model == "b-large");
  CHECK(spilled.value->route.attempts == 2);
  CHECK(refused == 1);
  CHECK(std::find(seen.begin(), seen.end(), "call: a/a-small has no room here, falling back") !=
        seen.end());
  // The breaker counted nothing against a: the next request tries it first again.
  route_now(io, r);
  CHECK(refused == 2);
}

TEST_CASE("a 429 saying the quota is spent for 20 s sends the next 20 s to b, then back to a",
          "[routing][router]") {
  asio::io_context io;
  std::vector<std::string> seen;
  router_type r(io.get_executor(), two_models(), unpaced_recording(seen));
  provider a, b;
  const auto refused_at = clock_type::now();
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point now) {
    return now == refused_at ? exhausted(20s) : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  auto first = route_now(io, r);
  REQUIRE(first.value);
  CHECK(first.value->route.model == "b-large");
  CHECK(first.value->route.attempts == 2);
  CHECK(first.value->route.steps.at(0).result == weir::verdict::rate_limited);
  CHECK(std::find(seen.begin(), seen.end(), "call: a/a-small cooling down for 20000.0 ms") !=
        seen.end());

  for (int second = 1; second < 20; ++second) {
    advance<clock_type>(io, 1s);
    auto during = route_now(io, r);
    REQUIRE(during.value);
    CHECK(during.value->route.provider == "b");
    CHECK(during.value->route.attempts == 1);
  }
  advance<clock_type>(io, 999ms);
  CHECK(route_now(io, r).value->route.provider == "b");  // 19.999 s
  advance<clock_type>(io, 1ms);
  CHECK(route_now(io, r).value->route.provider == "a");  // exactly 20 s
  CHECK(a.answered(429) == 1);
  CHECK(a.calls() == 2);
  CHECK(b.calls() == 21);
}

TEST_CASE("a 429 that says only Retry-After holds back that request's retry, not the model",
          "[routing][router]") {
  asio::io_context io;
  router_type r(io.get_executor(), two_models(), unpaced());
  provider a, b;
  int calls = 0;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point) {
    return ++calls % 2 == 1 ? fake_response::too_many(5s) : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  auto refused = route_now(io, r);  // a refuses; the request goes on to b at once
  REQUIRE(refused.value);
  CHECK(refused.value->route.model == "b-large");
  CHECK(refused.value->route.waited == 0s);
  auto next = route_now(io, r);  // the model itself is not cooled down
  REQUIRE(next.value);
  CHECK(next.value->route.model == "a-small");

  // With only a to try, the refused request waits exactly the 5 s the server asked for.
  route_result alone;
  start(io, r, {.allowed_providers = {"a"}}, alone);
  advance<clock_type>(io, 4999ms);
  CHECK_FALSE(alone.done);
  advance<clock_type>(io, 1ms);
  REQUIRE(alone.value);
  CHECK(alone.value->route.attempts == 2);
  CHECK(alone.value->route.waited == 5s);
}

TEST_CASE("a spent quota cools the model, or the whole provider when its limits are per account",
          "[routing][router]") {
  for (const auto scope :
       {weir::routing::cooldown_scope::model, weir::routing::cooldown_scope::provider}) {
    clock_type::reset();
    asio::io_context io;
    weir::routing::catalog c;
    c.add(weir::routing::provider_spec{.name = "a", .cooldown_scope = scope});
    c.add(weir::routing::model_spec{
        .provider = "a", .id = "small", .input_price = 1, .capability = 5});
    c.add(weir::routing::model_spec{
        .provider = "a", .id = "large", .input_price = 2, .capability = 8});
    c.add(weir::routing::model_spec{
        .provider = "b", .id = "other", .input_price = 3, .capability = 8});
    router_type r(io.get_executor(), c, unpaced());
    provider a, b;
    const auto t0 = clock_type::now();
    a.script = [&](const weir::routing::model_spec& m, clock_type::time_point now) {
      return now == t0 && m.id == "small" ? exhausted(10s) : fake_response::ok();
    };
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    auto res = route_now(io, r);
    REQUIRE(res.value);
    const bool per_model = scope == weir::routing::cooldown_scope::model;
    CHECK(res.value->route.model == (per_model ? "large" : "other"));
    CHECK(r.status(clock_type::now()).at(per_model ? 1 : 0).cooling == ns(per_model ? 0s : 10s));
  }
}

namespace {
// 2026-11-28 12:00 UTC: 04:00 in Mountain View, 20 h before Gemini's per-day quotas reset.
const auto wall_noon = std::chrono::system_clock::time_point(
                           std::chrono::sys_days(std::chrono::year(2026) / 11 / 28)) +
                       12h;

// `p` answers `status` with `body` to a call at `t0`, and every other call with success.
void fail_at(provider& p, clock_type::time_point t0, unsigned status, std::string_view body) {
  p.script = [=](const weir::routing::model_spec&, clock_type::time_point now) {
    return now == t0 ? fake_response{.status = status, .body = std::string(body), .wall = wall_noon}
                     : fake_response::ok();
  };
}
}  // namespace

TEST_CASE("a Gemini per-day quota takes the model out until midnight Pacific; others serve",
          "[routing][router][refusals]") {
  asio::io_context io;
  std::vector<std::string> seen;
  weir::metrics counted("router");
  auto o = unpaced_recording(seen);
  o.watch = weir::fan_out(o.watch, counted.observer());
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  const auto t0 = clock_type::now();
  fail_at(a, t0, 429, weir_test::provider_errors::gemini_per_day);
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  auto first = route_now(io, r);
  REQUIRE(first.value);
  CHECK(first.value->route.model == "b-large");
  CHECK(first.value->route.steps.at(0).result == weir::verdict::exhausted);
  CHECK(std::count(seen.begin(), seen.end(),
                   "call: a/a-small out for 72000.0 s: quota exhausted (gemini "
                   "RESOURCE_EXHAUSTED)") == 1);
  CHECK(counted.read().exhaustions == 1);  // weir_exhausted_total: what an alert pages on
  // Its RetryInfo said 22 s: a minute later, and an hour before the reset, b still serves.
  advance<clock_type>(io, 1min);
  CHECK(route_now(io, r).value->route.provider == "b");
  advance<clock_type>(io, 20h - 1min - 1ms);
  CHECK(route_now(io, r).value->route.provider == "b");
  CHECK(r.status(clock_type::now()).at(0).cooling == 1ms);
  advance<clock_type>(io, 1ms);
  CHECK(route_now(io, r).value->route.provider == "a");
  CHECK(a.calls() == 2);
}

TEST_CASE("a spent credit takes the provider out until restore(), or for exhausted_for",
          "[routing][router][refusals]") {
  namespace errors = weir_test::provider_errors;
  for (const auto& [status, body] :
       {std::pair{429u, errors::openai_insufficient_quota},
        std::pair{402u, errors::anthropic_billing}, std::pair{402u, errors::openrouter_credits}}) {
    clock_type::reset();
    asio::io_context io;
    weir::routing::catalog c = two_models();
    c.add(weir::routing::model_spec{
        .provider = "a", .id = "a-large", .input_price = 2, .capability = 8});
    std::vector<std::string> seen;
    auto o = unpaced_recording(seen);
    const bool timed = status == 402 && body == errors::openrouter_credits;
    if (timed) o.exhausted_for = 1h;
    router_type r(io.get_executor(), c, o);
    provider a, b;
    const auto t0 = clock_type::now();
    fail_at(a, t0, status, body);
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    INFO(body);
    auto first = route_now(io, r);
    REQUIRE(first.value);
    // The account is spent: a's other model is not tried either.
    CHECK(first.value->route.provider == "b");
    CHECK(first.value->route.attempts == 2);
    CHECK(a.calls() == 1);
    const auto paged = std::find_if(seen.begin(), seen.end(), [](const std::string& e) {
      return e.starts_with("call: provider a out ");
    });
    REQUIRE(paged != seen.end());
    CHECK(paged->find(timed ? "out for 3600.0 s: credit exhausted"
                            : "out until restored: credit exhausted") != std::string::npos);
    CHECK(paged->find("secret") == std::string::npos);

    advance<clock_type>(io, 59min);
    CHECK(route_now(io, r).value->route.provider == "b");
    advance<clock_type>(io, 1min);
    if (timed) {
      CHECK(route_now(io, r).value->route.provider == "a");
      continue;
    }
    advance<clock_type>(io, 1000h);
    CHECK(route_now(io, r).value->route.provider == "b");
    CHECK(r.status(clock_type::now()).at(0).cooling == ns::max());
    CHECK(r.restore("no-such-model") == 0);
    CHECK(r.restore("a-small") == 1);
    CHECK(route_now(io, r).value->route.provider == "a");
    CHECK(a.calls() == 2);
  }
}

TEST_CASE("an overloaded provider is failed over for this request only, and no quota is spent",
          "[routing][router][refusals]") {
  namespace errors = weir_test::provider_errors;
  for (const auto& [status, body] :
       {std::pair{529u, errors::anthropic_overloaded}, std::pair{498u, errors::groq_flex},
        std::pair{503u, errors::openai_slow_down}}) {
    clock_type::reset();
    asio::io_context io;
    std::vector<std::string> seen;
    router_type r(io.get_executor(), two_models(), unpaced_recording(seen));
    provider a, b;
    const auto t0 = clock_type::now();
    fail_at(a, t0, status, body);
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    INFO(status);
    auto first = route_now(io, r);
    REQUIRE(first.value);
    CHECK(first.value->route.provider == "b");
    CHECK(first.value->route.steps.at(0).result == weir::verdict::retryable);
    advance<clock_type>(io, 1ms);
    CHECK(route_now(io, r).value->route.provider == "a");  // not cooled, not taken out
    CHECK(std::none_of(seen.begin(), seen.end(), [](const std::string& e) {
      return e.find(" out ") != std::string::npos || e.find("cooling") != std::string::npos;
    }));
  }
}

TEST_CASE("a model the catalog gives no limit is paced by discovery, just under its server's",
          "[routing][router]") {
  asio::io_context io;
  weir::routing::catalog c;
  c.add(weir::routing::model_spec{.provider = "a", .id = "a-small", .capability = 5});
  router_type r(io.get_executor(), c);  // default options: discovery on
  provider a;
  // A strict server allowing 20/s: one request per 50 ms, refusals not counted.
  std::optional<clock_type::time_point> last_served;
  const auto start = clock_type::now();
  int served = 0, refused = 0;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point now) {
    const bool ok = !last_served || now - *last_served >= 50ms;
    if (ok) last_served = now;
    if (now - start >= 10s) ++(ok ? served : refused);
    return ok ? fake_response::ok() : fake_response::too_many(1s);
  };
  r.connect("a", a.call<prompt>());
  int failed = 0;
  for (int w = 0; w < 8; ++w)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          while (clock_type::now() - start < 70s) {
            try {
              auto op = r.route(prompt{}, {});
              co_await std::move(op);
            } catch (const weir::exception&) {
              ++failed;
            }
          }
        },
        asio::detached);
  advance<clock_type>(io, 71s);
  INFO(served << " served, " << refused << " refused from 10 s to 70 s");
  CHECK(served >= 0.90 * 20 * 60);
  CHECK(refused <= 0.03 * (served + refused));
  CHECK(failed == 0);
  CHECK(r.status().at(0).requests_limit >= 0.9 * 20 * 60);
}

TEST_CASE("five server errors open a's breaker, and b serves until a's probe succeeds",
          "[routing][router]") {
  asio::io_context io;
  weir::routing::catalog c;
  c.add(weir::routing::provider_spec{
      .name = "a", .breaker = {.consecutive_failures = 5, .break_duration = 30s}});
  const auto both = two_models();
  for (const auto& m : both.models()) c.add(m);
  std::vector<std::pair<weir::breaker_state, weir::breaker_state>> changes;
  options o = unpaced();
  o.max_attempts = 2;
  o.watch = [&](const weir::event& e) {
    if (auto* b = std::get_if<weir::breaker_changed>(&e); b && b->operation == "a")
      changes.emplace_back(b->from, b->to);
  };
  router_type r(io.get_executor(), c, o);
  // Reported once when the router is built, before any change.
  REQUIRE(changes.size() == 1);
  CHECK(changes[0] == std::pair{weir::breaker_state::closed, weir::breaker_state::closed});
  changes.clear();
  provider a, b;
  bool a_down = true;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point) {
    return a_down ? fake_response::server_error() : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  for (int i = 0; i < 10; ++i) {
    auto res = route_now(io, r);
    REQUIRE(res.value);
    CHECK(res.value->route.provider == "b");
  }
  CHECK(a.calls() == 5);  // the breaker stopped the rest
  REQUIRE(changes.size() == 1);
  CHECK(changes[0].second == weir::breaker_state::open);

  a_down = false;
  advance<clock_type>(io, 29s);
  CHECK(route_now(io, r).value->route.provider == "b");
  advance<clock_type>(io, 1s);
  CHECK(route_now(io, r).value->route.provider == "a");  // the probe
  CHECK(changes.back().second == weir::breaker_state::closed);
  CHECK(r.status().at(0).breaker == weir::breaker_state::closed);
}

TEST_CASE("routes whose own deadlines pass mid-call never open the breaker of a slow provider",
          "[routing][router]") {
  asio::io_context io;
  weir::routing::catalog c;
  c.add(weir::routing::provider_spec{
      .name = "a", .breaker = {.consecutive_failures = 2, .break_duration = 30s}});
  c.add(weir::routing::model_spec{.provider = "a", .id = "a-small"});
  router_type r(io.get_executor(), c, unpaced());
  provider a;
  a.latency = 2s;  // healthy, but slower than these callers wait
  r.connect("a", a.call<prompt>());
  for (int i = 0; i < 5; ++i) {
    auto res = route_now(io, r, {.deadline = clock_type::now() + 1s}, 1s);
    REQUIRE(res.error);
    CHECK(res.error->code() == weir::error::timeout);
    advance<clock_type>(io, 1s);  // the cancelled call's timer
  }
  CHECK(a.calls() == 5);  // each was sent: the callers gave up, the provider did not fail
  CHECK(r.status().at(0).breaker == weir::breaker_state::closed);
  // A caller that waits long enough is answered.
  CHECK(route_now(io, r, {.deadline = clock_type::now() + 5s}, 2s).value);
}

TEST_CASE("a model's usage window counts calls by the monitor stage's rule", "[routing][router]") {
  asio::io_context io;
  weir::routing::catalog c;
  c.add(weir::routing::model_spec{.provider = "a", .id = "a-small"});
  options o = unpaced();
  o.max_attempts = 1;
  router_type r(io.get_executor(), c, o);
  provider a;
  // The last is sent, then given up by its caller: a request, no error.
  const std::vector<fake_response> answers{fake_response::ok(), fake_response::server_error(),
                                           fake_response{.status = 400},
                                           fake_response::too_many(1s), fake_response::ok()};
  std::size_t next = 0;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point) {
    REQUIRE(next < answers.size());
    return answers[next++];
  };
  r.connect("a", a.call<prompt>());
  for (int i = 0; i < 4; ++i) {
    route_now(io, r);
    advance<clock_type>(io, 1s);  // past the 429's cooldown
  }
  a.latency = 2s;
  route_now(io, r, {.deadline = clock_type::now() + 1s}, 2s);
  CHECK(next == answers.size());
  const auto status = r.status().at(0);
  CHECK(status.requests_per_minute == 5);
  // Every failure the provider answered is an error, a 400 as much as a 500; a 429 is one too,
  // counted apart as well (as weir::usage_monitor_stage counts them for alerts' errors_above).
  CHECK(status.errors == 3);
  CHECK(status.rate_limited == 1);
}

TEST_CASE("a router's breakers are in the metrics' state set from its construction, closed",
          "[routing][router]") {
  asio::io_context io;
  weir::metrics counted("router");
  options o = unpaced();
  o.watch = counted.observer();
  router_type r(io.get_executor(), two_models(), o);
  std::string page;
  weir::write_prometheus(page, {&counted});
  for (const char* provider : {"a", "b"})
    for (const char* state : {"closed", "open", "half_open", "isolated"}) {
      const auto sample =
          fmt::format("weir_breaker_state{{pipeline=\"router\",breaker=\"{}\",state=\"{}\"}} {}\n",
                      provider, state, std::string_view(state) == "closed" ? 1 : 0);
      INFO(sample);
      CHECK(page.find(sample) != std::string::npos);
    }
}

TEST_CASE("with one model, a server error is retried after a backoff, not the end of the request",
          "[routing][router]") {
  // Before, a retryable failure marked the model tried for the request, and with no other model
  // left the route failed at its first 503 whatever max_attempts allowed.
  asio::io_context io;
  weir::routing::catalog c;
  c.add(weir::routing::provider_spec{.name = "a"});
  c.add(weir::routing::model_spec{.provider = "a", .id = "a-only", .capability = 5});
  options o = unpaced();
  o.max_attempts = 4;
  router_type r(io.get_executor(), c, o);
  provider a;
  std::vector<clock_type::time_point> sent;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point now) {
    sent.push_back(now);
    return sent.size() <= 2 ? fake_response::server_error() : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());

  auto retried = route_now(io, r, {}, 10s);
  REQUIRE(retried.value);
  CHECK(retried.value->route.attempts == 3);
  REQUIRE(sent.size() == 3);
  // Full jitter under 200 ms, then 400 ms: never more, and the clock moved only by them.
  CHECK(sent[1] - sent[0] <= 200ms);
  CHECK(sent[2] - sent[1] <= 400ms);

  // Failing every time, the route ends after max_attempts, with the last failure.
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point) {
    return fake_response::server_error();
  };
  auto exhausted = route_now(io, r, {}, 10s);
  REQUIRE(exhausted.error);
  CHECK(exhausted.error->code() == weir::error::retries_exhausted);
  CHECK(a.calls() == 3 + 4);
}

TEST_CASE("a server error answered at once is retried at once, into the slot it did not spend",
          "[routing][router]") {
  // One request a second, paced. The first call fails with a 500 that comes back at once (a
  // gateway in front of the limit): nothing went since, so its slot is given back and the request
  // takes it. Before, it backed off (up to 200 ms) and then waited for the next slot (1 s).
  asio::io_context io;
  weir::routing::catalog c;
  c.add(weir::routing::provider_spec{.name = "a"});
  c.add(weir::routing::model_spec{
      .provider = "a", .id = "a-only", .capability = 5, .requests_per_minute = 60});
  router_type r(io.get_executor(), c, {});
  provider a;
  std::vector<clock_type::time_point> sent;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point now) {
    sent.push_back(now);
    return sent.size() == 1 || sent.size() == 3 || sent.size() == 4 ? fake_response::server_error()
                                                                    : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  auto first = route_now(io, r, {}, 10s);
  REQUIRE(first.value);
  REQUIRE(sent.size() == 2);
  CHECK(sent[1] == sent[0]);
  // The pace holds after it: the next request goes a second later. Failing twice, it takes the
  // slot the first time and backs off the second.
  auto next = route_now(io, r, {}, 10s);
  REQUIRE(next.value);
  REQUIRE(sent.size() == 5);
  CHECK(sent[2] - sent[1] >= 900ms);
  CHECK(sent[3] == sent[2]);
  CHECK(sent[4] > sent[3]);
}

TEST_CASE("when every provider is out the error names the earliest time it frees up",
          "[routing][router]") {
  asio::io_context io;
  router_type r(io.get_executor(), two_models(), unpaced());
  provider a, b;
  const auto t0 = clock_type::now();
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point now) {
    return now == t0 ? exhausted(20s) : fake_response::ok();
  };
  b.script = [&](const weir::routing::model_spec&, clock_type::time_point now) {
    return now == t0 ? exhausted(30s) : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  SECTION("no waiting allowed: fails at once") {
    auto res = route_now(io, r, {.wait_for_capacity = false});
    REQUIRE(res.error);
    CHECK(res.error->code() == weir::error::no_provider_available);
    CHECK(res.error->retry_after() == 20s);
    CHECK(res.error->attempts() == 2);
    advance<clock_type>(io, 5s);
    auto later = route_now(io, r, {.wait_for_capacity = false});
    REQUIRE(later.error);
    CHECK(later.error->retry_after() == 15s);
    CHECK(a.calls() + b.calls() == 2);
  }
  SECTION("a deadline shorter than every wait fails at once") {
    auto res = route_now(io, r, {.deadline = t0 + 19s});
    REQUIRE(res.error);
    CHECK(res.error->code() == weir::error::no_provider_available);
    CHECK(res.error->retry_after() == 20s);
    CHECK(clock_type::now() == t0);
  }
  SECTION("with a deadline far enough it waits for the first one") {
    route_result res;
    start(io, r, {.deadline = t0 + 60s}, res);
    advance<clock_type>(io, 19s);
    CHECK_FALSE(res.done);
    advance<clock_type>(io, 1s);
    REQUIRE(res.value);
    CHECK(res.value->route.provider == "a");
    CHECK(res.value->route.waited == 20s);
    CHECK(res.value->route.attempts == 3);
  }
}

TEST_CASE("the limiter's knowledge keeps requests from being sent at all", "[routing][router]") {
  asio::io_context io;
  router_type r(io.get_executor(), two_models(60, 60), unpaced());  // one per second each
  provider a, b;
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  int to_a = 0, to_b = 0, refused = 0;
  for (int i = 0; i < 20; ++i) {
    auto res = route_now(io, r, {.wait_for_capacity = false});
    if (res.value) (res.value->route.provider == "a" ? to_a : to_b)++;
    if (res.error) {
      CHECK(res.error->code() == weir::error::no_provider_available);
      CHECK(res.error->retry_after() == 1s);
      ++refused;
    }
  }
  CHECK(to_a == 1);  // a first: it is cheaper
  CHECK(to_b == 1);
  CHECK(refused == 18);
  CHECK(a.calls() == 1);
  CHECK(b.calls() == 1);

  // The selection alone reserves nothing.
  advance<clock_type>(io, 1s);
  CHECK(r.select({}) == std::optional<std::size_t>(0));
  CHECK(r.select({}) == std::optional<std::size_t>(0));
}

TEST_CASE("a context overflow moves to a larger model, another 400 is returned as it is",
          "[routing][router]") {
  asio::io_context io;
  options o = unpaced();
  o.context_exceeded = [](const weir::outcome<fake_response>& out) {
    return out.has_value() && out.value().context_overflow;
  };
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  bool overflow = true;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point) {
    fake_response bad{.status = 400};
    bad.context_overflow = overflow;
    return bad;
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  auto moved = route_now(io, r, {.input_tokens = 500});
  REQUIRE(moved.value);
  CHECK(moved.value->route.model == "b-large");
  CHECK(moved.value->response.status == 200);

  overflow = false;
  auto kept = route_now(io, r, {.input_tokens = 500});
  REQUIRE(kept.value);
  CHECK(kept.value->route.model == "a-small");
  CHECK(kept.value->response.status == 400);
  CHECK(b.calls() == 1);
}

TEST_CASE("settled tokens and cost come from the response's usage", "[routing][router]") {
  asio::io_context io;
  options o = unpaced();
  o.usage_of = [](const fake_response& res) { return std::optional(res.usage); };
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  a.script = [](const weir::routing::model_spec&, clock_type::time_point) {
    return fake_response::ok({.input_tokens = 120, .output_tokens = 30});
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  auto res = route_now(io, r, {.input_tokens = 100, .output_tokens = 400});
  REQUIRE(res.value);
  CHECK(res.value->route.estimated_tokens == 500);
  CHECK(res.value->route.settled_tokens == 150);
  CHECK(res.value->route.cost == Approx((120 * 1 + 30 * 2) / 1e6));
  CHECK(r.status().at(0).tokens_per_minute == Approx(150));
}

TEST_CASE("router misuse gives clear errors", "[routing][router]") {
  asio::io_context io;
  CHECK_THROWS_AS(router_type(io.get_executor(), weir::routing::catalog{}), weir::exception);
  router_type r(io.get_executor(), two_models(), unpaced());
  CHECK_THROWS_AS(r.connect("nobody", provider{}.call<prompt>()), weir::exception);
  auto res = route_now(io, r);  // a was never connected
  REQUIRE(res.error);
  CHECK(res.error->code() == weir::error::invalid_argument);
  weir::routing::catalog c;
  CHECK_THROWS_AS(c.add(weir::routing::model_spec{.provider = "a", .id = "m", .input_price = -1}),
                  weir::exception);
}

TEST_CASE("routes shared by four threads all end, once each", "[routing][router][concurrency]") {
  asio::io_context io(4);
  weir::routing::catalog c;
  c.add(weir::routing::model_spec{.provider = "a",
                                  .id = "a1",
                                  .input_price = 1,
                                  .capability = 5,
                                  .requests_per_minute = 600'000});
  c.add(weir::routing::model_spec{.provider = "b", .id = "b1", .input_price = 2, .capability = 5});
  weir::routing::router<prompt, fake_response, std::chrono::steady_clock, fake_classifier> r(
      io.get_executor(), c);
  weir::testing::fake_provider<std::chrono::steady_clock> a, b;
  std::atomic<int> n{0};
  a.script = [&](const weir::routing::model_spec&, auto) {
    return ++n % 3 == 0 ? fake_response::server_error() : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  std::atomic<int> ok{0}, failed{0};
  for (int i = 0; i < 2000; ++i)
    asio::co_spawn(io, r.route(prompt{}, {}),
                   [&](std::exception_ptr e, auto) { (e ? failed : ok)++; });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(ok + failed == 2000);
  CHECK(failed == 0);  // a failure falls back to b
  CHECK(a.answered(200) + b.answered(200) == 2000);
}

TEST_CASE("a budget steers the router to a cheaper model, then refuses at once saying when",
          "[routing][router][budget]") {
  asio::io_context io;
  // Day boundary: the manual clock's epoch read as Unix time; 1000 h in is 16:00 UTC.
  weir::spend_budget<clock_type> daily({.name = "tenants",
                                        .limit = 0.010,
                                        .window = weir::budget_window::daily(),
                                        .per = weir::budget_scope::tenant});
  std::vector<std::string> seen;
  options o = unpaced_recording(seen);
  // Prefer the most capable model: b-large, $0.003 for this request; a-small costs $0.001.
  o.strategy = [](const weir::routing::basic_candidate<clock_type>& m) {
    return -m.model.capability;
  };
  o.budgets = {daily};
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  std::vector<std::string> models;
  for (int i = 0; i < 4; ++i) {
    auto done = route_now(io, r, {.input_tokens = 1000, .tenant = "acme"});
    REQUIRE(done.value);
    models.push_back(done.value->route.model);
  }
  // $0.009 after three on b-large; then only a-small fits, once.
  CHECK(models == std::vector<std::string>{"b-large", "b-large", "b-large", "a-small"});
  auto refused = route_now(io, r, {.input_tokens = 1000, .tenant = "acme"});
  REQUIRE(refused.error);
  CHECK(refused.error->code() == weir::error::over_budget);
  CHECK(refused.error->refused_locally());
  CHECK(refused.error->retry_after() == 8h);  // midnight UTC
  CHECK_THAT(refused.error->what(), Catch::Matchers::Contains("tenants for acme"));
  CHECK(std::find(seen.begin(), seen.end(),
                  "call: rejected (over budget) by router, retry after 28800000.0 ms") !=
        seen.end());
  // A request no model could ever take is no provider's, not over budget.
  auto impossible =
      route_now(io, r, {.input_tokens = 1000, .min_capability = 100, .tenant = "acme"});
  REQUIRE(impossible.error);
  CHECK(impossible.error->code() == weir::error::no_provider_available);
  // Another tenant has its own budget.
  auto other = route_now(io, r, {.input_tokens = 1000, .tenant = "globex"});
  REQUIRE(other.value);
  CHECK(other.value->route.model == "b-large");
  const auto status = daily.status();
  REQUIRE(status.size() == 2);
  CHECK(status[0].key == "acme");
  CHECK(status[0].spent == Approx(0.010));
  CHECK(status[0].reserved == 0);
}

TEST_CASE("agents looping through the router cannot spend past a budget, however many at once",
          "[routing][router][budget]") {
  // 32 agents, each call estimated at 1000 input and 500 output tokens and reporting between
  // 100 and 500 output tokens after 50–250 ms of virtual time; each agent stops at its first
  // refusal. b-large is preferred while it fits, then a-small.
  for (unsigned seed : {1u, 2u}) {
    weir::testing::manual_clock::reset();
    asio::io_context io;
    weir::spend_budget<clock_type> overall({.name = "overall", .limit = 0.05});
    options o = unpaced();
    o.strategy = [](const weir::routing::basic_candidate<clock_type>& m) {
      return -m.model.capability;
    };
    o.budgets = {overall};
    o.usage_of = [](const fake_response& r) { return std::optional(r.usage); };
    router_type r(io.get_executor(), two_models(), o);
    std::mt19937 random(seed);
    double billed = 0;
    provider a, b;
    for (auto* p : {&a, &b}) {
      p->latency = std::chrono::milliseconds(50 + random() % 200);
      p->script = [&](const weir::routing::model_spec& m, clock_type::time_point) {
        const weir::token_usage used{.input_tokens = 1000, .output_tokens = 100 + random() % 401};
        billed += m.cost(used.input_tokens, used.output_tokens);
        return fake_response::ok(used);
      };
    }
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    int refused = 0;
    auto agent = [&]() -> asio::awaitable<void> {
      for (;;) {
        try {
          auto op = r.route(prompt{}, {.input_tokens = 1000, .output_tokens = 500});
          co_await std::move(op);
        } catch (const weir::exception& e) {
          CHECK(e.code() == weir::error::over_budget);
          ++refused;
          co_return;
        }
      }
    };
    for (int i = 0; i < 32; ++i) asio::co_spawn(io, agent(), asio::detached);
    advance<clock_type>(io, 60s);
    CHECK(refused == 32);
    CHECK(billed <= 0.05 + 1e-12);
    CHECK(b.calls() > 0);
    CHECK(a.calls() > 0);  // the cheaper model took what the dearer one no longer fit
    CHECK(overall.status().at(0).spent == Approx(billed));
  }
}

TEST_CASE(
    "a hedged route tries the next-best model of another provider when the first is slow; "
    "the first answer wins and the record lists both attempts",
    "[routing][router][hedging]") {
  asio::io_context io;
  router_type r(io.get_executor(), two_models(), unpaced());
  provider a, b;
  a.latency = 5s;  // the cheap model's answer is late
  b.latency = 100ms;
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  const constraints c{.input_tokens = 100, .output_tokens = 50};

  SECTION("the hedge wins") {
    weir_test::finished<weir::routing::routed<fake_response>> call;
    call.start(io, r.route_hedged(prompt{"hi"}, c, weir::hedging<clock_type>({.delay = 1s})));
    advance<clock_type>(io, 1s + 99ms);
    CHECK_FALSE(call.done);
    advance<clock_type>(io, 1ms);
    REQUIRE(call.value);
    const auto& route = call.value->route;
    CHECK(route.model == "b-large");  // another provider's model: the next best
    REQUIRE(route.steps.size() == 2);
    CHECK(route.steps[0].model == "b-large");
    CHECK(route.steps[0].result == weir::verdict::success);
    CHECK(route.steps[1].model == "a-small");  // cancelled, listed when it ended
    CHECK(route.steps[1].result == weir::verdict::fatal);
    CHECK(route.attempts == 2);
    CHECK(a.answered(200) == 0);  // the slow answer never came
    CHECK(r.status()[0].breaker == weir::breaker_state::closed);
    CHECK(r.status()[0].errors == 0);  // a cancelled loser is not the provider's failure
  }
  SECTION("the cost ceiling allows no hedge: the first attempt's answer, late") {
    weir_test::finished<weir::routing::routed<fake_response>> call;
    call.start(io, r.route_hedged(prompt{"hi"}, c, weir::hedging<clock_type>({.delay = 1s}),
                                  /*max_hedge_cost=*/100 * 1 / 1e6 + 50 * 2 / 1e6));
    advance<clock_type>(io, 5s);
    REQUIRE(call.value);
    CHECK(call.value->route.model == "a-small");
    CHECK(b.calls() == 0);
  }
}

TEST_CASE("a hedged route's hedge_started goes to the router's observer, named for the request",
          "[routing][router][hedging]") {
  asio::io_context io;
  auto options = unpaced();
  std::vector<std::string> hedges;
  options.watch = [&](const weir::event& e) {
    if (std::holds_alternative<weir::hedge_started>(e)) hedges.push_back(fmt::format("{}", e));
  };
  router_type r(io.get_executor(), two_models(), std::move(options));
  provider a, b;
  a.latency = 5s;
  b.latency = 100ms;
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  std::vector<std::string> own;
  weir::hedging<clock_type> hedge(
      {.delay = 1s, .watch = [&](const weir::event& e) { own.push_back(fmt::format("{}", e)); }});
  weir_test::finished<weir::routing::routed<fake_response>> call;
  call.start(
      io, r.route_hedged(prompt{"hi"},
                         {.input_tokens = 100, .output_tokens = 50, .operation = "chat"}, hedge));
  advance<clock_type>(io, 2s);
  REQUIRE(call.value);
  CHECK(hedges == std::vector<std::string>{"chat: hedge 1 after 1000.0 ms by hedging"});
  CHECK(own.empty());
}

TEST_CASE(
    "hedged routes cut the p99 of a provider with a slow tail to the hedge's delay plus the "
    "next model's latency (virtual time)",
    "[routing][router][hedging]") {
  asio::io_context io;
  router_type r(io.get_executor(), two_models(), unpaced());
  // The cheap model answers in 100 ms, but one call in twenty takes 3 s; the other in 150 ms.
  unsigned a_calls = 0;
  r.connect("a", [&](const weir::routing::model_spec& m, const prompt&) {
    const bool slow = ++a_calls % 20 == 7;
    return [](ns took, std::string model) -> asio::awaitable<fake_response> {
      co_await weir_test::slow_answer<clock_type>(took);
      auto answer = fake_response::ok();
      answer.model = std::move(model);
      co_return answer;
    }(slow ? ns(3s) : ns(100ms), m.id);
  });
  provider b;
  b.latency = 150ms;
  r.connect("b", b.call<prompt>());

  // Latencies of 200 calls one after another, sorted.
  const auto latencies = [&](bool hedged) {
    std::vector<ns> took;
    weir::hedging<clock_type> hedge({.delay = 300ms});
    for (int i = 0; i < 200; ++i) {
      const auto start = clock_type::now();
      std::optional<ns> latency;
      const constraints c{.input_tokens = 100, .output_tokens = 50};
      auto route = hedged ? r.route_hedged(prompt{"hi"}, c, hedge) : r.route(prompt{"hi"}, c);
      asio::co_spawn(io, std::move(route), [&](std::exception_ptr e, auto) {
        if (!e) latency = clock_type::now() - start;
      });
      advance<clock_type>(io, 5s);
      REQUIRE(latency);
      took.push_back(*latency);
    }
    std::sort(took.begin(), took.end());
    return took;
  };
  const auto plain = latencies(false);
  const auto hedged = latencies(true);
  const auto p99 = [](const std::vector<ns>& sorted) { return sorted[sorted.size() * 99 / 100]; };
  CHECK(p99(plain) == 3s);
  CHECK(p99(hedged) == 300ms + 150ms);  // the slow call's hedge on b answered first
  CHECK(hedged.front() == 100ms);       // the fast calls are not slowed
  CHECK(b.calls() == 10);               // one hedge per slow call, no more
}

TEST_CASE("a traced route: each attempt sends a new span of the caller's trace, its events say so",
          "[routing][router][trace]") {
  asio::io_context io;
  options o = unpaced();
  std::vector<weir::event> events;
  o.watch = [&](const weir::event& e) { events.push_back(e); };
  router_type r(io.get_executor(), two_models(), o);
  events.clear();  // its breakers' first reports, which belong to no route
  std::vector<weir::trace_context> sent;
  const auto answer = [&](fake_response reply) {
    return [&sent, reply](const weir::routing::model_spec& m, const prompt&,
                          const weir::trace_context& attempt) -> asio::awaitable<fake_response> {
      sent.push_back(attempt);
      auto answered = reply;
      answered.model = m.id;
      co_return answered;
    };
  };
  r.connect("a", router_type::traced_provider_call(answer(fake_response::server_error())));
  r.connect("b", router_type::traced_provider_call(answer(fake_response::ok())));
  const auto caller =
      weir::trace_context::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
  REQUIRE(caller);

  auto traced = route_now(io, r, {.operation = "chat", .trace = *caller});
  REQUIRE(traced.value);
  CHECK(traced.value->route.attempts == 2);  // a's 500, then b
  REQUIRE(sent.size() == 2);
  for (const auto& attempt : sent) {
    CHECK(attempt.trace_id == caller->trace_id);
    CHECK(attempt.parent_id != caller->parent_id);
    CHECK(attempt.sampled());
  }
  CHECK(sent[0].parent_id != sent[1].parent_id);
  // The events of each attempt carry its span: the fallback from a names the span a was sent.
  std::vector<weir::span_id> chosen, fell_back;
  for (const auto& e : events) {
    const auto& ids = std::visit([](const auto& v) { return v.trace; }, e);
    CHECK(ids.trace == caller->trace_id);
    if (std::holds_alternative<weir::route_chosen>(e)) chosen.push_back(ids.span);
    if (std::holds_alternative<weir::route_fallback>(e)) fell_back.push_back(ids.span);
  }
  CHECK(chosen == std::vector<weir::span_id>{sent[0].parent_id, sent[1].parent_id});
  CHECK(fell_back == std::vector<weir::span_id>{sent[0].parent_id});

  // Without a trace context nothing is sent, whatever the callable takes.
  sent.clear();
  events.clear();
  auto untraced = route_now(io, r, {.operation = "chat"});
  REQUIRE(untraced.value);
  REQUIRE(sent.size() == 2);
  CHECK_FALSE(sent[0]);
  CHECK_FALSE(sent[1]);
  for (const auto& e : events) CHECK_FALSE(std::visit([](const auto& v) { return v.trace; }, e));
}
