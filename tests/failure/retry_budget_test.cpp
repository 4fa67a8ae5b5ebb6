// Specifications of weir/failure/retry_budget.hpp: deposits, withdrawals and their expiry (how
// retry and hedging spend it is in retry_test.cpp and hedging_test.cpp).
#include "../support/failure.hpp"

TEST_CASE("retry budget deposits expire after their ttl", "[retry_budget][issue15]") {
  weir::retry_budget budget({.ratio = 0.5, .reserve = 0, .capacity = 1000, .ttl = 10s});
  const ns t0 = 1h;
  for (int i = 0; i < 100; ++i) budget.deposit(t0);
  CHECK(budget.available(t0) == Approx(50));
  CHECK(budget.try_withdraw(t0 + 5s));
  CHECK(budget.available(t0 + 5s) == Approx(49));
  // Ten seconds on, the deposits have expired (and the withdrawal with them).
  CHECK(budget.available(t0 + 11s) == Approx(0));
  CHECK_FALSE(budget.try_withdraw(t0 + 11s));
}
