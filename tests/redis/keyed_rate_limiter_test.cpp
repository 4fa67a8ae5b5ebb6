// Specifications of weir/redis/keyed_rate_limiter.hpp, against a real redis-server.
#include <weir/composition/pipeline.hpp>
#include <weir/redis/keyed_rate_limiter.hpp>

#include "../support/redis.hpp"

#include <array>
#include <map>
#include <vector>

TEST_CASE("keyed limits shared by two processes: each key its own quota, counted once",
          "[tenants]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    const auto family = unique_name("tenants");
    // Two limiters on two connections: two processes of one fleet.
    weir::redis::client first_connection(ex, {.port = WEIR_REDIS_PORT});
    weir::redis::client second_connection(ex, {.port = WEIR_REDIS_PORT});
    const weir::redis::keyed_rate_limiter_options options{
        .each = {.name = family, .requests = weir::limit{weir::per_minute(1), 3}},
        .limits_of = [](std::string_view key, weir::redis::rate_limiter_options& o) {
          if (key == "pro") o.requests = weir::limit{weir::per_minute(1), 5};
        }};
    weir::redis::keyed_rate_limiter<> one(ex, first_connection, options);
    weir::redis::keyed_rate_limiter<> two(ex, second_connection, options);
    std::map<std::string, int> admitted;
    const std::array<std::string, 3> keys{"acme", "pro", "globex"};
    const std::array<weir::redis::keyed_rate_limiter<>*, 2> members{&one, &two};
    for (const auto& key : keys)
      for (int i = 0; i < 4; ++i)
        for (auto* member : members) {
          const bool ok =
              co_await member->async_try_acquire(key, {.requests = 1}, asio::use_awaitable);
          admitted[key] += ok;
        }
    CHECK(admitted["acme"] == 3);
    CHECK(admitted["globex"] == 3);
    CHECK(admitted["pro"] == 5);
    CHECK(one.size() == 3);
    // The fleet's naming: one hash-tagged key per tenant.
    std::vector<std::string> words{"EXISTS", fmt::format("weir:{{{}:acme}}:requests", family)};
    auto [ec, exists] = co_await first_connection.async_command(
        std::move(words), asio::as_tuple(asio::use_awaitable));
    CHECK_FALSE(ec);
    CHECK(exists.integer == 1);

    // As a stage, keyed by the call's tenant.
    auto guarded = weir::pipeline(one);
    weir::call_context acme{.tenant = "acme"}, fresh{.tenant = "fresh"};
    const int ok = co_await guarded(fresh, []() -> asio::awaitable<int> { co_return 1; });
    CHECK(ok == 1);
    acme.deadline = std::chrono::steady_clock::now() + 100ms;
    bool refused = false;
    try {
      co_await guarded(acme, []() -> asio::awaitable<int> { co_return 1; });
    } catch (const weir::exception& e) {
      refused = e.code() == weir::error::rate_limited && e.refused_locally();
    }
    CHECK(refused);
  });
}
