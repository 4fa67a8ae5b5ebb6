// Specifications of weir/redis/spend_budget.hpp, against a real redis-server.
#include <weir/redis/spend_budget.hpp>

#include "../support/redis.hpp"

#include <atomic>
#include <optional>
#include <variant>
#include <vector>

TEST_CASE("a budget shared by two processes: reservations from both count, alerts fire once",
          "[tenants]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto name = unique_name("budget");
    std::atomic<int> alerts{0};
    weir::redis::client c1(ex, {.port = WEIR_REDIS_PORT}), c2(ex, {.port = WEIR_REDIS_PORT});
    const weir::spend_budget_options options{.name = name,
                                             .limit = 1.0,
                                             .per = weir::budget_scope::tenant,
                                             .alert_at = {0.5},
                                             .watch = [&](const weir::event& e) {
                                               alerts +=
                                                   std::holds_alternative<weir::budget_alert>(e);
                                             }};
    weir::redis::spend_budget<> one(ex, c1, options), two(ex, c2, options);
    auto a = co_await one.reserve("acme", 0.4);
    auto b = co_await two.reserve("acme", 0.4);
    std::optional<std::chrono::nanoseconds> retry_after;
    std::string said;
    bool refused = false;
    try {
      co_await one.reserve("acme", 0.3);  // 0.8 held by the two: 0.3 does not fit
    } catch (const weir::exception& e) {
      refused = e.code() == weir::error::over_budget && e.refused_locally();
      retry_after = e.retry_after();
      said = e.what();
    }
    CHECK(refused);
    CHECK_FALSE(retry_after);  // it fits once the calls in flight settle: no time to give
    CHECK_THAT(said, Catch::Matchers::Contains("no room before calls in flight settle"));
    auto other = co_await two.reserve("globex", 0.9);  // another tenant, another budget
    other.release();
    a.settle(0.1);
    b.settle(0.5);
    asio::steady_timer pause(ex, 200ms);  // the settles go out in the background
    co_await pause.async_wait(asio::use_awaitable);
    CHECK(alerts.load() == 1);
    auto c = co_await one.reserve("acme", 0.4);  // 0.6 spent
    c.release();
    bool full = false;
    try {
      co_await two.reserve("acme", 0.41);
    } catch (const weir::exception& e) {
      full = e.code() == weir::error::over_budget && e.retry_after() &&
             *e.retry_after() <= std::chrono::hours(24);  // at midnight UTC
    }
    CHECK(full);

    // A process that dies holding a reservation leaves only its fields in the key's hash (what
    // the script writes for a reservation, with a 300 ms lifetime): they hold the budget until
    // they expire.
    const auto now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    const auto day = weir::detail::calendar_window(weir::budget_window::daily(), now_ns).first;
    std::vector<std::string> crashed{"EVAL",    weir::redis::detail::budget_script,
                                     "1",       fmt::format("weir:{{budget:{}:acme}}", name),
                                     "reserve", fmt::format("c{}", day),
                                     "1",       "0.4",
                                     "12345",   std::to_string(now_ns / 1'000'000),
                                     "300",     "86400000"};
    auto [crash_ec, crash_reply] =
        co_await c1.async_command(std::move(crashed), asio::as_tuple(asio::use_awaitable));
    REQUIRE_FALSE(crash_ec);
    REQUIRE(crash_reply.elements.size() == 4);
    CHECK(crash_reply.elements[0].integer == 1);
    bool held = false;
    try {
      co_await two.reserve("acme", 0.1);
    } catch (const weir::exception&) {
      held = true;
    }
    CHECK(held);
    asio::steady_timer expiry(ex, 400ms);
    co_await expiry.async_wait(asio::use_awaitable);
    auto after = co_await two.reserve("acme", 0.4);
    after.release();
  });
}
