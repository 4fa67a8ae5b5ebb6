// Specifications for the router and its catalog, on virtual time with scripted providers.
#include <weir/routing/catalog_json.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>
#include <weir/testing/manual_clock.hpp>

#include <boost/asio.hpp>
#include <boost/json/src.hpp>  // Boost.JSON is compiled once per program: here
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::fake_classifier;
using weir::testing::fake_response;
using provider = weir::testing::fake_provider<clock_type>;

namespace {

struct prompt {
  std::string text;
};

using router_type = weir::routing::router<prompt, fake_response, clock_type, fake_classifier>;
using constraints = router_type::constraints;
using options = weir::routing::basic_router_options<fake_response, clock_type>;

// Two providers with one model each: a is cheaper than b.
weir::routing::catalog two_models(double a_rpm = 0, double b_rpm = 0) {
  weir::routing::catalog c;
  c.add(weir::routing::model_spec{.provider = "a",
                                  .id = "a-small",
                                  .input_price = 1,
                                  .output_price = 2,
                                  .capability = 5,
                                  .context_window = 8'000,
                                  .requests_per_minute = a_rpm});
  c.add(weir::routing::model_spec{.provider = "b",
                                  .id = "b-large",
                                  .input_price = 3,
                                  .output_price = 6,
                                  .capability = 8,
                                  .context_window = 100'000,
                                  .requests_per_minute = b_rpm});
  return c;
}

// Most specifications here are about choosing, not pacing: the limits stay exactly as the
// catalog gives them, and a model without limits is not paced (no discovery).
options unpaced() {
  options o;
  o.adaptation.reset();
  return o;
}

// A 429 that says the quota is spent for `retry_after`.
fake_response exhausted(ns retry_after) {
  auto r = fake_response::too_many(retry_after);
  r.hint.requests.remaining = 0;
  return r;
}

// The outcome of one route: what came back, or the weir error.
struct route_result {
  std::optional<weir::routing::routed<fake_response>> value;
  std::optional<weir::exception> error;
  bool done = false;
};

void start(asio::io_context& io, router_type& r, constraints c, route_result& out) {
  asio::co_spawn(
      io, r.route(prompt{"hello"}, std::move(c)),
      [&out](std::exception_ptr e, std::optional<weir::routing::routed<fake_response>> v) {
        out.done = true;
        if (!e) {
          out.value = std::move(v);
          return;
        }
        try {
          std::rethrow_exception(e);
        } catch (const weir::exception& x) {
          out.error = x;
        } catch (const std::exception& x) {
          FAIL("not a weir::exception: " << x.what());
        }
      });
}

route_result route_now(asio::io_context& io, router_type& r, constraints c = {},
                       ns let_pass = 0ns) {
  route_result out;
  start(io, r, std::move(c), out);
  advance<clock_type>(io, let_pass);
  return out;
}

}  // namespace

// Selection is pure: specs, views and numbers in, a ranking out; no coroutine, server or clock.
TEST_CASE("selection ranks what may be tried now and says when the first blocked one frees up",
          "[router][selection]") {
  namespace r = weir::routing;
  using steady = std::chrono::steady_clock;
  const std::vector<r::model_spec> specs = {
      {.provider = "a", .id = "cheap", .input_price = 1, .output_price = 1, .capability = 5},
      {.provider = "a", .id = "small", .input_price = 0.5, .capability = 5, .context_window = 1000},
      {.provider = "b", .id = "dear", .input_price = 9, .output_price = 9, .capability = 9},
      {.provider = "b", .id = "weak", .input_price = 0.1, .capability = 2},
  };
  std::vector<r::model_view<steady>> views;
  for (const auto& s : specs) views.push_back({.spec = &s});
  const r::basic_route_constraints<steady> c{
      .input_tokens = 900, .output_tokens = 300, .min_capability = 5};
  const std::vector<char> none_tried(specs.size(), 0);
  const std::vector<std::int64_t> no_wait(specs.size(), 0);
  const steady::time_point now{1h};
  const auto strategy = r::strategies::cheapest<steady>();
  const auto rank = [&](r::ranking& ranked, auto blocked, const std::vector<char>& tried,
                        const std::vector<std::int64_t>& not_before) {
    r::rank<steady>(ranked, views, c, r::fitting_context(c), tried, not_before, now, strategy,
                    blocked);
  };

  // "small" cannot hold 1 200 tokens, "weak" is not capable: "cheap" wins, "dear" is next.
  r::ranking all(specs.size());
  rank(
      all, [](std::size_t) { return ns(0); }, none_tried, no_wait);
  CHECK(all.any_capable);
  const auto scores = all.scores.span();
  CHECK(scores[1] == r::ranking::unranked);
  CHECK(scores[3] == r::ranking::unranked);
  CHECK(scores[0] < scores[2]);
  // The cheapest has no room for 2 s: the next takes the request.
  std::vector<std::size_t> asked;
  const auto taken = r::choose(all, [&](std::size_t i) {
    asked.push_back(i);
    return i == 0 ? ns(2s) : ns(0);
  });
  CHECK(taken == std::optional<std::size_t>(2));
  CHECK(asked == std::vector<std::size_t>{0, 2});

  // "cheap" cooling for 5 s, "dear" waiting 3 s for this request: none now, the first in 3 s.
  r::ranking blocked(specs.size());
  std::vector<std::int64_t> not_before = no_wait;
  not_before[2] = (now + 3s).time_since_epoch().count();
  rank(
      blocked, [](std::size_t i) { return i == 0 ? ns(5s) : ns(0); }, none_tried, not_before);
  CHECK(!r::choose(blocked, [](std::size_t) { return ns(0); }));
  CHECK(blocked.any_capable);
  CHECK(blocked.earliest == 3s);

  // Both capable ones tried already: nothing capable is left.
  r::ranking tried_all(specs.size());
  rank(
      tried_all, [](std::size_t) { return ns(0); }, std::vector<char>{1, 0, 1, 0}, no_wait);
  CHECK(!tried_all.any_capable);

  // Refusals of the limits lower the earliest wait; cooldowns, an open breaker and batch pacing
  // add up to the longest of them.
  r::ranking limited(specs.size());
  rank(
      limited, [](std::size_t) { return ns(0); }, none_tried, no_wait);
  CHECK(!r::choose(limited, [](std::size_t i) { return i == 0 ? ns(4s) : ns(7s); }));
  CHECK(limited.earliest == 4s);
  CHECK(r::blocked_for(1s, 2s, std::nullopt, std::nullopt) == 2s);
  CHECK(r::blocked_for(1s, -5s, ns(30s), ns(10ms)) == 30s);
  CHECK(r::blocked_for(-1s, -1s, std::nullopt, std::nullopt) == 0s);
  CHECK(r::cost_of(c).tokens == 1200);
}

TEST_CASE("the cheapest capable model is chosen, and capability and context filter") {
  clock_type::reset();
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

TEST_CASE("a 429 saying the quota is spent for 20 s sends the next 20 s to b, then back to a") {
  clock_type::reset();
  asio::io_context io;
  std::vector<std::string> seen;
  options o = unpaced();
  o.watch = [&](const weir::event& e) { seen.push_back(fmt::format("{}", e)); };
  router_type r(io.get_executor(), two_models(), o);
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

TEST_CASE("a 429 that says only Retry-After holds back that request's retry, not the model") {
  clock_type::reset();
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

TEST_CASE("a spent quota cools the model, or the whole provider when its limits are per account") {
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

TEST_CASE("a model the catalog gives no limit is paced by discovery, just under its server's") {
  clock_type::reset();
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

TEST_CASE("five server errors open a's breaker, and b serves until a's probe succeeds") {
  clock_type::reset();
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
    if (auto* b = std::get_if<weir::breaker_changed>(&e)) {
      CHECK(b->operation == "a");
      changes.emplace_back(b->from, b->to);
    }
  };
  router_type r(io.get_executor(), c, o);
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

TEST_CASE("when every provider is out the error names the earliest time it frees up") {
  clock_type::reset();
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

TEST_CASE("the limiter's knowledge keeps requests from being sent at all") {
  clock_type::reset();
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

TEST_CASE("a context overflow moves to a larger model, another 400 is returned as it is") {
  clock_type::reset();
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

TEST_CASE("settled tokens and cost come from the response's usage") {
  clock_type::reset();
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

TEST_CASE("strategies: most headroom and lowest latency") {
  clock_type::reset();
  asio::io_context io;
  provider a, b;
  a.latency = 300ms;
  b.latency = 100ms;

  SECTION("lowest latency measures each model once, then keeps to the faster") {
    options o = unpaced();
    o.strategy = weir::routing::strategies::lowest_latency<clock_type>();
    router_type r(io.get_executor(), two_models(), o);
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    std::vector<std::string> order;
    for (int i = 0; i < 4; ++i) order.push_back(route_now(io, r, {}, 1s).value->route.provider);
    CHECK(order == std::vector<std::string>{"a", "b", "b", "b"});
    CHECK(r.status().at(1).latency == 100ms);
  }
  SECTION("most headroom spreads the load over both limits") {
    options o = unpaced();
    o.strategy = weir::routing::strategies::most_headroom<clock_type>();
    router_type r(io.get_executor(), two_models(600, 600), o);
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    for (int i = 0; i < 40; ++i) route_now(io, r, {}, 1s);
    CHECK(a.calls() == 20);
    CHECK(b.calls() == 20);
  }
}

TEST_CASE("router misuse gives clear errors") {
  clock_type::reset();
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

TEST_CASE("routes shared by four threads all end, once each", "[concurrency]") {
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

// ---- the JSON catalog ---------------------------------------------------------------------

TEST_CASE("a catalog loads from JSON") {
  const auto c = weir::routing::load_catalog(R"({
    "providers": [
      {"name": "openai", "default_cooldown_seconds": 2.5,
       "breaker": {"consecutive_failures": 3, "break_seconds": 10}}
    ],
    "models": [
      {"provider": "openai", "id": "gpt-4o-mini", "input_price": 0.15, "output_price": 0.6,
       "capability": 7, "context_window": 128000,
       "requests_per_minute": 500, "tokens_per_minute": 200000},
      {"provider": "groq", "id": "llama-3.1-8b", "capability": 5}
    ]
  })");
  REQUIRE(c.models().size() == 2);
  REQUIRE(c.providers().size() == 2);
  CHECK(c.providers()[0].default_cooldown == 2500ms);
  CHECK(c.providers()[0].breaker.consecutive_failures == 3);
  CHECK(c.providers()[0].breaker.break_duration == 10s);
  CHECK(c.models()[0].context_window == 128'000);
  CHECK(c.models()[0].output_price == 0.6);
  CHECK(c.models()[1].provider == "groq");
  CHECK(c.find_provider("groq"));
}

TEST_CASE("a bad catalog file names the field and the line") {
  const auto error_of = [](const std::string& json) -> std::pair<std::string, std::size_t> {
    try {
      weir::routing::load_catalog(json);
    } catch (const weir::routing::catalog_error& e) {
      CHECK(e.code() == weir::error::invalid_argument);
      return {e.field(), e.line()};
    }
    return {"(no error)", 0};
  };
  CHECK(error_of("{\n \"models\": [\n  {\"provider\": \"a\", \"id\": \"m\",\n"
                 "   \"capability\": \"high\"}\n ]\n}") ==
        std::pair<std::string, std::size_t>{"models[0].capability", 4});
  CHECK(error_of("{\n \"models\": [\n  {\"provider\": \"a\", \"id\": \"m\"}\n ]\n}") ==
        std::pair<std::string, std::size_t>{"models[0].capability", 3});
  CHECK(error_of("{\"models\": [\n{\"provider\": \"a\", \"id\": \"m\", \"capability\": 1},\n"
                 "{\"provider\": \"a\", \"id\": \"m\", \"capability\": 2}]}") ==
        std::pair<std::string, std::size_t>{"models[1]", 3});
  CHECK(error_of("{\"models\": [{\"provider\": \"a\", \"id\": \"m\", \"capability\": 1,\n"
                 "  \"capabilty\": 2}]}") ==
        std::pair<std::string, std::size_t>{"models[0].capabilty", 2});
  CHECK(error_of("{\"models\": [\n  {\"provider\": \"a\",,}\n]}").second == 2);
  CHECK(error_of("{\"models\": [{\"provider\": \"a\", \"id\": \"m\", \"capability\": 1,\n"
                 "\"context_window\": 1.5}]}") ==
        std::pair<std::string, std::size_t>{"models[0].context_window", 2});
  CHECK(error_of("[]").first == "catalog");
  try {
    weir::routing::load_catalog_file("/nonexistent/catalog.json");
    FAIL("no error");
  } catch (const weir::routing::catalog_error& e) {
    CHECK(e.line() == 0);
  }
}

// ---- reliability: cancellation, shutdown, soak -------------------------------------------------

#include <weir/weir.hpp>

#include <malloc.h>

namespace {

// Whether an exception_ptr holds a cancellation.
bool aborted(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return x.code() == asio::error::operation_aborted;
  } catch (...) {
    return false;
  }
}

// Spawns `a` with a cancellation slot; counts completions and remembers whether it was aborted.
struct cancellable {
  asio::cancellation_signal signal;
  int completions = 0;
  bool was_aborted = false;

  template <class Awaitable>
  void spawn(asio::io_context& io, Awaitable a) {
    asio::co_spawn(
        io, std::move(a),
        asio::bind_cancellation_slot(signal.slot(), [this](std::exception_ptr e, auto...) {
          ++completions;
          was_aborted = e && aborted(e);
        }));
  }
  void cancel() { signal.emit(asio::cancellation_type::terminal); }
};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int soak_calls = 100'000;  // sanitizers are ten times slower; the shape is the same
#else
constexpr int soak_calls = 1'000'000;
#endif

// Bytes the C heap has handed out and not taken back (0 under ASan, whose allocator glibc does
// not see: the flatness checks then pass vacuously, and LSan checks for leaks instead).
std::size_t heap_in_use() { return mallinfo2().uordblks; }

}  // namespace

TEST_CASE("cancelling each kind of wait completes it once, aborted, and gives back what it took") {
  clock_type::reset();
  asio::io_context io;

  SECTION("a token bucket wait") {
    weir::token_bucket<clock_type> bucket(io.get_executor(),
                                          {.rate = weir::per_second(1), .burst = 1});
    REQUIRE(bucket.try_acquire());
    cancellable wait;
    wait.spawn(io, bucket.async_acquire(1, asio::use_awaitable));
    advance<clock_type>(io, 100ms);
    wait.cancel();
    advance<clock_type>(io, 0ns);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    advance<clock_type>(io, 900ms);
    CHECK(bucket.try_acquire());  // the cancelled wait's token went back
  }
  SECTION("a request queue admission") {
    weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
    auto held = queue.try_admit();
    cancellable wait;
    wait.spawn(io, queue.async_admit(asio::use_awaitable));
    advance<clock_type>(io, 0ns);
    CHECK(queue.queued() == 1);
    wait.cancel();
    advance<clock_type>(io, 0ns);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    CHECK(queue.queued() == 0);
    held.release();
    CHECK(queue.in_flight() == 0);
  }
  SECTION("a retry's backoff") {
    weir::retry<clock_type> retry({.max_attempts = 5, .backoff = weir::backoff::constant(10s)});
    int calls = 0;
    auto failing = [&]() -> asio::awaitable<int> {
      ++calls;
      throw std::runtime_error("transient");
      co_return 0;
    };
    cancellable wait;
    wait.spawn(io, retry(failing));
    advance<clock_type>(io, 5s);
    wait.cancel();
    advance<clock_type>(io, 60s);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    CHECK(calls == 1);
  }
  SECTION("a router waiting for capacity") {
    router_type r(io.get_executor(), two_models(), unpaced());
    provider a, b;
    const auto t0 = clock_type::now();
    for (auto* p : {&a, &b})
      p->script = [t0](const weir::routing::model_spec&, clock_type::time_point now) {
        return now == t0 ? fake_response::too_many(20s) : fake_response::ok();
      };
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    cancellable wait;
    wait.spawn(io, r.route(prompt{}, {}));
    advance<clock_type>(io, 5s);
    CHECK(wait.completions == 0);
    wait.cancel();
    advance<clock_type>(io, 0ns);
    CHECK(wait.completions == 1);
    CHECK(wait.was_aborted);
    advance<clock_type>(io, 15s);
    CHECK(route_now(io, r).value->route.provider == "a");  // nothing stayed reserved
    CHECK(a.calls() + b.calls() == 3);
  }
}

TEST_CASE("destroying an io_context mid-flight destroys every pending handler, no permit leaked") {
  clock_type::reset();
  auto sentinel = std::make_shared<int>(0);
  {
    asio::io_context io;
    weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 8});
    weir::token_bucket<clock_type> bucket(io.get_executor(),
                                          {.rate = weir::per_hour(1), .burst = 1});
    router_type r(io.get_executor(), two_models(), unpaced());
    provider a, b;
    a.script = b.script = [](const weir::routing::model_spec&, clock_type::time_point) {
      return fake_response::too_many(1h);
    };
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    auto held = queue.try_admit();
    REQUIRE(bucket.try_acquire());
    for (int i = 0; i < 3; ++i)
      asio::co_spawn(
          io,
          [&queue, s = sentinel]() -> asio::awaitable<void> {
            auto p = co_await queue.async_admit(asio::use_awaitable);
          },
          asio::detached);
    asio::co_spawn(
        io,
        [&bucket, s = sentinel]() -> asio::awaitable<void> {
          co_await bucket.async_acquire(1, asio::use_awaitable);
        },
        asio::detached);
    asio::co_spawn(
        io,
        [&r, s = sentinel]() -> asio::awaitable<void> {
          // The awaitable first, then co_await: g++ 12 mishandles temporaries with destructors
          // inside a co_await expression (double free).
          auto op = r.route(prompt{}, {});
          co_await std::move(op);
        },
        asio::detached);
    advance<clock_type>(io, 1s);
    CHECK(sentinel.use_count() == 6);  // five waits pending
    CHECK(queue.queued() == 3);
  }
  CHECK(sentinel.use_count() == 1);  // every pending coroutine was destroyed with the context
}

TEST_CASE("soak: a million calls through the full pipeline, memory flat, counts exact") {
  clock_type::reset();
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 64, .max_queued = 64});
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.requests = weir::limit{weir::per_second(1e9), 4'000'000}});
  weir::usage_monitor<clock_type> monitor({.window = 1h, .buckets = 60});
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1'000});
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(0ns)});
  weir::metrics counts("soak");
  auto guarded = weir::pipeline(retry, breaker, limits, monitor, queue);
  guarded.observe(counts.observer());
  int calls = 0, ok = 0;
  std::size_t heap_after_warmup = 0, heap_at_end = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < soak_calls; ++i) {
          if (i == soak_calls / 10) heap_after_warmup = heap_in_use();
          ok += co_await guarded([&]() -> asio::awaitable<int> {
            if (++calls % 10 == 0) throw std::runtime_error("transient");  // every 10th attempt
            co_return 1;
          });
        }
        heap_at_end = heap_in_use();
      },
      asio::detached);
  io.run();
  CHECK(ok == soak_calls);
  const auto m = counts.read();
  CHECK(m.attempts == static_cast<std::uint64_t>(calls));
  CHECK(m.successes == static_cast<std::uint64_t>(soak_calls));
  CHECK(m.failures == m.retries);
  CHECK(m.failures == static_cast<std::uint64_t>(calls - soak_calls));
  CHECK(monitor.totals().requests == static_cast<std::uint64_t>(calls));
  CHECK(queue.in_flight() == 0);
  CHECK(heap_at_end <= heap_after_warmup + 64 * 1024);
}

TEST_CASE("soak: a million routes with fallbacks, memory flat, counts exact") {
  clock_type::reset();
  asio::io_context io;
  options o = unpaced();
  o.fallback_budget.emplace(weir::retry_budget_options{.ratio = 0.5, .reserve = 10});
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  int n = 0;
  a.script = [&](const weir::routing::model_spec&, clock_type::time_point) {
    return ++n % 7 == 0 ? fake_response::server_error() : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  int ok = 0, failed = 0;
  std::size_t heap_after_warmup = 0, heap_at_end = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < soak_calls; ++i) {
          if (i == soak_calls / 10) heap_after_warmup = heap_in_use();
          try {
            auto op = r.route(prompt{}, {});  // not inside the co_await: see above
            auto res = co_await std::move(op);
            ok += res.response.status == 200;
          } catch (const weir::exception&) {
            ++failed;
          }
        }
        heap_at_end = heap_in_use();
      },
      asio::detached);
  io.run();
  CHECK(ok == soak_calls);
  CHECK(failed == 0);
  CHECK(a.calls() == static_cast<unsigned>(soak_calls));
  CHECK(b.calls() == a.answered(500));  // each failure fell back exactly once
  CHECK(a.answered(200) + b.answered(200) == static_cast<unsigned>(soak_calls));
  CHECK(heap_at_end <= heap_after_warmup + 64 * 1024);
}

TEST_CASE("a spent fallback budget ends routes with budget_exhausted") {
  clock_type::reset();
  asio::io_context io;
  options o = unpaced();
  o.fallback_budget.emplace(weir::retry_budget_options{.ratio = 0, .reserve = 2, .capacity = 2});
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  a.script = b.script = [](const weir::routing::model_spec&, clock_type::time_point) {
    return fake_response::server_error();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());
  auto first = route_now(io, r);  // a fails, b (paid from the reserve) fails
  REQUIRE(first.error);
  CHECK(first.error->code() == weir::error::retries_exhausted);
  auto second = route_now(io, r);  // a fails, b paid with the last unit
  auto third = route_now(io, r);   // a fails, nothing left for b
  REQUIRE(third.error);
  CHECK(third.error->code() == weir::error::budget_exhausted);
  CHECK(third.error->attempts() == 1);
  CHECK(a.calls() == 3);
  CHECK(b.calls() == 2);
}
