// Specifications of weir/redis/fleet.hpp: routers of one fleet sharing what they learn in Redis.
#include <weir/redis/fleet.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>

#include "../support/redis.hpp"

#include <cstdio>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace {

using weir::testing::fake_classifier;
using weir::testing::fake_response;
struct prompt {
  std::string text;
};
using fleet_router =
    weir::routing::router<prompt, fake_response, std::chrono::steady_clock, fake_classifier>;

// Two providers with one model each; a is cheaper, so it is chosen first.
weir::routing::catalog fleet_catalog() {
  weir::routing::catalog c;
  c.add(weir::routing::provider_spec{.name = "a"});
  c.add(weir::routing::provider_spec{
      .name = "b", .breaker = {.consecutive_failures = 1, .break_duration = 30s}});
  c.add(weir::routing::model_spec{
      .provider = "a", .id = "a-small", .input_price = 1, .output_price = 2, .capability = 5});
  c.add(weir::routing::model_spec{
      .provider = "b", .id = "b-large", .input_price = 3, .output_price = 6, .capability = 8});
  return c;
}

// One member of a fleet: its own connection, its own view of the fleet, its own router, and
// counts of what reached each provider.
struct member {
  member(asio::any_io_executor ex, const std::string& fleet, int port, bool paced = false)
      : redis(ex, {.port = port, .connect_timeout = 300ms, .command_timeout = 300ms}),
        shared(std::make_shared<weir::redis::fleet_state>(
            redis, weir::redis::fleet_options{.name = fleet})),
        router(ex, fleet_catalog(), options(paced)) {
    for (const char* p : {"a", "b"})
      router.connect(p,
                     [this, p](const weir::routing::model_spec&,
                               const prompt&) -> asio::awaitable<fake_response> {
                       ++sent[p];
                       co_return answer[p];
                     });
  }

  fleet_router::options_type options(bool paced) {
    fleet_router::options_type o;
    if (!paced) o.adaptation.reset();
    o.fleet = shared;
    o.watch = [this](const weir::event& e) {
      if (const auto* f = std::get_if<weir::fleet_connection>(&e))
        reachable.push_back(f->reachable);
    };
    return o;
  }

  // Routes one request; the model that answered, or the error's code.
  asio::awaitable<std::string> ask() {
    prompt p{"hi"};
    try {
      auto r = co_await router.route(p, {.wait_for_capacity = false});
      co_return r.route.model;
    } catch (const weir::exception& e) {
      co_return e.code().message();
    }
  }

  weir::redis::client redis;
  std::shared_ptr<weir::redis::fleet_state> shared;
  fleet_router router;
  std::map<std::string, int> sent;
  std::map<std::string, fake_response> answer{{"a", fake_response::ok()},
                                              {"b", fake_response::ok()}};
  std::vector<bool> reachable;
};

}  // namespace

TEST_CASE("two processes: a 429 seen by one keeps the other off that model", "[fleet]") {
  const auto fleet = unique_name("processes");
  const auto member = [&](const std::string& in, const char* role) {
    std::unique_ptr<FILE, int (*)(FILE*)> out(
        ::popen(fmt::format("{} {} {} {}", WEIR_FLEET_MEMBER, WEIR_REDIS_PORT, in, role).c_str(),
                "r"),
        ::pclose);
    char model[64] = {};
    int reached_a = -1;
    REQUIRE(out);
    CHECK(std::fscanf(out.get(), "%63s %d", model, &reached_a) == 2);
    return std::pair{std::string(model), reached_a};
  };
  // The first hears a's server say its quota is spent, and goes to b.
  CHECK(member(fleet, "a-refuses") == std::pair{std::string("b-large"), 1});
  // The second, a process of its own started afterwards, never sends to a: the fleet told it.
  CHECK(member(fleet, "a-answers") == std::pair{std::string("b-large"), 0});
  // A member of another fleet heard nothing: it sends to a, which answers.
  CHECK(member(fleet + "-other", "a-answers") == std::pair{std::string("a-small"), 1});
}

TEST_CASE("a 429 or an open breaker seen by one member keeps the fleet away", "[fleet]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto fleet = unique_name("routers");
    member first(ex, fleet, WEIR_REDIS_PORT), second(ex, fleet, WEIR_REDIS_PORT);

    // The first member hears a's server say its quota is spent for 30 s, and falls back to b.
    auto spent = fake_response::too_many(30s);
    spent.hint.requests.remaining = 0;
    first.answer["a"] = spent;
    CHECK(co_await first.ask() == "b-large");
    CHECK(first.sent["a"] == 1);

    // The second member's next route skips a without sending there: the fleet told it.
    CHECK(co_await second.ask() == "b-large");
    CHECK(second.sent["a"] == 0);
    CHECK(second.router.status()[0].cooling > 25s);

    // b fails once at the first member: its breaker opens, and the second stays away from b too,
    // so with a cooling everywhere nothing is left for it.
    first.answer["b"] = fake_response::server_error();
    const auto failed = co_await first.ask();
    CHECK(failed != "b-large");
    CHECK(first.router.status()[1].breaker == weir::breaker_state::open);
    asio::steady_timer settle(ex);  // the breaker's news is posted: let it reach Redis
    settle.expires_after(50ms);
    co_await settle.async_wait(asio::use_awaitable);
    const int before = second.sent["b"];
    const auto refused = co_await second.ask();
    CHECK(refused == weir::make_error_code(weir::error::no_provider_available).message());
    CHECK(second.sent["b"] == before);
    CHECK(second.reachable.empty());  // no loss of the fleet was reported
    first.redis.close();
    second.redis.close();
  });
}

TEST_CASE("a member that starts late paces at the limit the fleet learned", "[fleet]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto fleet = unique_name("limits");
    member first(ex, fleet, WEIR_REDIS_PORT, true), second(ex, fleet, WEIR_REDIS_PORT, true);
    auto told = fake_response::ok();
    told.hint.requests.limit = 600;
    told.hint.requests.window = 60s;  // 10 requests a second
    first.answer["a"] = told;
    CHECK(co_await first.ask() == "a-small");
    CHECK(first.router.status()[0].requests_limit == Approx(600));
    CHECK_FALSE(second.router.status()[0].requests_limit.has_value());
    CHECK(second.router.status()[0].discovering);
    CHECK(co_await second.ask() == "a-small");  // its server said nothing; the fleet did
    CHECK(second.router.status()[0].requests_limit == Approx(600));
    CHECK_FALSE(second.router.status()[0].discovering);
    first.redis.close();
    second.redis.close();
  });
}

TEST_CASE("without Redis a router routes on its own state, and says so", "[fleet][faults]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    rig::redis_server server(WEIR_REDIS_PORT + 5);
    member alone(ex, unique_name("lost"), server.port());
    CHECK(co_await alone.ask() == "a-small");
    server.stop();
    CHECK(co_await alone.ask() == "a-small");  // the fleet is gone; routing is not
    server.start();
    asio::steady_timer pause(ex);
    // Until the client's reconnect backoff lets it look again: bounded by time, loosely.
    const auto give_up = std::chrono::steady_clock::now() + 15s;
    while (alone.reachable.size() < 2 && std::chrono::steady_clock::now() < give_up) {
      CHECK(co_await alone.ask() == "a-small");
      pause.expires_after(20ms);
      co_await pause.async_wait(asio::use_awaitable);
    }
    CHECK(alone.reachable == std::vector<bool>{false, true});
    alone.redis.close();
  });
}
