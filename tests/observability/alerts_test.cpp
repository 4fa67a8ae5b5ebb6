// Specifications of weir/observability/alerts.hpp.
#include "../support/composition.hpp"

TEST_CASE("a 429-ratio alert fires once when it starts and once when it clears, without flapping",
          "[alerts]") {
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  std::vector<std::pair<std::string, bool>> changes;
  weir::alerts<clock_type> alerts(
      [&](const weir::alert& a) { changes.emplace_back(a.name, a.firing); });
  alerts.rate_limited_above("openai 429s", monitor, 0.05, 20);

  auto second = [&](int requests, int limited) {
    for (int i = 0; i < requests; ++i) monitor.record({.rate_limited = i < limited});
    clock_type::advance(1s);
    alerts.evaluate();
  };
  for (int s = 0; s < 10; ++s) second(10, 0);  // healthy
  CHECK(changes.empty());
  for (int s = 0; s < 10; ++s) second(10, 2);  // 20% of these are 429s: the ratio climbs past 5%
  for (int s = 0; s < 30; ++s) second(10, s % 2);  // hovering near 5%: still firing, no flapping
  CHECK(changes == std::vector<std::pair<std::string, bool>>{{"openai 429s", true}});
  for (int s = 0; s < 120; ++s) second(10, 0);  // the bad minute slides out
  CHECK(changes ==
        std::vector<std::pair<std::string, bool>>{{"openai 429s", true}, {"openai 429s", false}});
}

TEST_CASE("a breaker-open alert fires after 30 s open and clears when it closes", "[alerts]") {
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .break_duration = 10s});
  std::vector<std::pair<bool, double>> changes;
  weir::alerts<clock_type> alerts(
      [&](const weir::alert& a) { changes.emplace_back(a.firing, a.value); });
  alerts.breaker_open_longer("openai down", breaker, 30s);
  breaker.isolate();
  for (int s = 0; s <= 30; ++s) {
    alerts.evaluate();
    clock_type::advance(1s);
  }
  CHECK(changes.empty());  // open exactly 30 s: not longer
  alerts.evaluate();
  REQUIRE(changes.size() == 1);
  CHECK(changes[0].first);
  CHECK(alerts.firing() == std::vector<std::string>{"openai down"});
  breaker.reset();
  alerts.evaluate();
  alerts.evaluate();
  REQUIRE(changes.size() == 2);
  CHECK_FALSE(changes[1].first);
  CHECK_THROWS_AS(alerts.rate_limited_above("bad", weir::usage_monitor<clock_type>(), 1.5),
                  weir::exception);
}
