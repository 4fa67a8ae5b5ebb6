// Specifications for the router and its catalog, on virtual time with scripted providers.
#include <weir/router/catalog_json.hpp>
#include <weir/router/router.hpp>
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

using router_type = weir::router<prompt, fake_response, clock_type, fake_classifier>;
using constraints = router_type::constraints;
using options = weir::basic_router_options<fake_response, clock_type>;

// Two providers with one model each: a is cheaper than b.
weir::catalog two_models(double a_rpm = 0, double b_rpm = 0) {
  weir::catalog c;
  c.add(weir::model_spec{.provider = "a",
                         .id = "a-small",
                         .input_price = 1,
                         .output_price = 2,
                         .capability = 5,
                         .context_window = 8'000,
                         .requests_per_minute = a_rpm});
  c.add(weir::model_spec{.provider = "b",
                         .id = "b-large",
                         .input_price = 3,
                         .output_price = 6,
                         .capability = 8,
                         .context_window = 100'000,
                         .requests_per_minute = b_rpm});
  return c;
}

// The outcome of one route: what came back, or the weir error.
struct route_result {
  std::optional<weir::routed<fake_response>> value;
  std::optional<weir::exception> error;
  bool done = false;
};

void start(asio::io_context& io, router_type& r, constraints c, route_result& out) {
  asio::co_spawn(io, r.route(prompt{"hello"}, std::move(c)),
                 [&out](std::exception_ptr e, std::optional<weir::routed<fake_response>> v) {
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

TEST_CASE("the cheapest capable model is chosen, and capability and context filter") {
  clock_type::reset();
  asio::io_context io;
  router_type r(io.get_executor(), two_models());
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

TEST_CASE("a 429 with Retry-After: 20 sends the next 20 s of traffic to b, then back to a") {
  clock_type::reset();
  asio::io_context io;
  std::vector<std::string> seen;
  options o;
  o.watch = [&](const weir::event& e) { seen.push_back(fmt::format("{}", e)); };
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  const auto refused_at = clock_type::now();
  a.script = [&](const weir::model_spec&, clock_type::time_point now) {
    return now == refused_at ? fake_response::too_many(20s) : fake_response::ok();
  };
  r.connect("a", a.call<prompt>());
  r.connect("b", b.call<prompt>());

  auto first = route_now(io, r);
  REQUIRE(first.value);
  CHECK(first.value->route.model == "b-large");
  CHECK(first.value->route.attempts == 2);
  CHECK(first.value->route.steps.at(0).result == weir::verdict::rate_limited);
  CHECK(std::find(seen.begin(), seen.end(), "call: provider a cooling down for 20000.0 ms") !=
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

TEST_CASE("five server errors open a's breaker; b serves until a's probe succeeds") {
  clock_type::reset();
  asio::io_context io;
  weir::catalog c;
  c.add(weir::provider_spec{.name = "a",
                            .breaker = {.consecutive_failures = 5, .break_duration = 30s}});
  const auto both = two_models();
  for (const auto& m : both.models()) c.add(m);
  std::vector<std::pair<weir::breaker_state, weir::breaker_state>> changes;
  options o;
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
  a.script = [&](const weir::model_spec&, clock_type::time_point) {
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
  router_type r(io.get_executor(), two_models());
  provider a, b;
  const auto t0 = clock_type::now();
  a.script = [&](const weir::model_spec&, clock_type::time_point now) {
    return now == t0 ? fake_response::too_many(20s) : fake_response::ok();
  };
  b.script = [&](const weir::model_spec&, clock_type::time_point now) {
    return now == t0 ? fake_response::too_many(30s) : fake_response::ok();
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
  router_type r(io.get_executor(), two_models(60, 60));  // one per second each, burst 6
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
  CHECK(to_a == 6);  // a's burst first: it is cheaper
  CHECK(to_b == 6);
  CHECK(refused == 8);
  CHECK(a.calls() == 6);
  CHECK(b.calls() == 6);

  // The selection alone reserves nothing.
  advance<clock_type>(io, 1s);
  CHECK(r.select({}) == std::optional<std::size_t>(0));
  CHECK(r.select({}) == std::optional<std::size_t>(0));
}

TEST_CASE("a context overflow moves to a larger model; another 400 is returned as it is") {
  clock_type::reset();
  asio::io_context io;
  options o;
  o.context_exceeded = [](const weir::outcome<fake_response>& out) {
    return out.has_value() && out.value().context_overflow;
  };
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  bool overflow = true;
  a.script = [&](const weir::model_spec&, clock_type::time_point) {
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
  options o;
  o.usage_of = [](const fake_response& res) { return std::optional(res.usage); };
  router_type r(io.get_executor(), two_models(), o);
  provider a, b;
  a.script = [](const weir::model_spec&, clock_type::time_point) {
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
    options o;
    o.strategy = weir::strategies::lowest_latency<clock_type>();
    router_type r(io.get_executor(), two_models(), o);
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    std::vector<std::string> order;
    for (int i = 0; i < 4; ++i) order.push_back(route_now(io, r, {}, 1s).value->route.provider);
    CHECK(order == std::vector<std::string>{"a", "b", "b", "b"});
    CHECK(r.status().at(1).latency == 100ms);
  }
  SECTION("most headroom spreads the load over both limits") {
    options o;
    o.strategy = weir::strategies::most_headroom<clock_type>();
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
  CHECK_THROWS_AS(router_type(io.get_executor(), weir::catalog{}), weir::exception);
  router_type r(io.get_executor(), two_models());
  CHECK_THROWS_AS(r.connect("nobody", provider{}.call<prompt>()), weir::exception);
  auto res = route_now(io, r);  // a was never connected
  REQUIRE(res.error);
  CHECK(res.error->code() == weir::error::invalid_argument);
  weir::catalog c;
  CHECK_THROWS_AS(c.add(weir::model_spec{.provider = "a", .id = "m", .input_price = -1}),
                  weir::exception);
}

TEST_CASE("routes shared by four threads all end, once each", "[concurrency]") {
  asio::io_context io(4);
  weir::catalog c;
  c.add(weir::model_spec{.provider = "a",
                         .id = "a1",
                         .input_price = 1,
                         .capability = 5,
                         .requests_per_minute = 600'000});
  c.add(weir::model_spec{.provider = "b", .id = "b1", .input_price = 2, .capability = 5});
  weir::router<prompt, fake_response, std::chrono::steady_clock, fake_classifier> r(
      io.get_executor(), c);
  weir::testing::fake_provider<std::chrono::steady_clock> a, b;
  std::atomic<int> n{0};
  a.script = [&](const weir::model_spec&, auto) {
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
  const auto c = weir::load_catalog(R"({
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
      weir::load_catalog(json);
    } catch (const weir::catalog_error& e) {
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
    weir::load_catalog_file("/nonexistent/catalog.json");
    FAIL("no error");
  } catch (const weir::catalog_error& e) {
    CHECK(e.line() == 0);
  }
}
