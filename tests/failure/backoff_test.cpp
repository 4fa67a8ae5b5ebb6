// Specifications of weir/failure/backoff.hpp, on seeded draws.
#include "../support/failure.hpp"

TEST_CASE("exponential backoff doubles from the initial delay up to the cap", "[backoff]") {
  auto b = weir::backoff::exponential(500ms, 2.0, 8s);
  std::vector<ns> got;
  for (unsigned n = 0; n < 7; ++n) got.push_back(b.delay(n));
  CHECK(got == std::vector<ns>{500ms, 1s, 2s, 4s, 8s, 8s, 8s});
}

TEST_CASE("linear and constant backoff", "[backoff]") {
  auto linear = weir::backoff::linear(1s, 250ms, 2s);
  CHECK(linear.delay(0) == 1s);
  CHECK(linear.delay(2) == 1500ms);
  CHECK(linear.delay(100) == 2s);
  CHECK(weir::backoff::constant(3s).delay(9) == 3s);
}

TEST_CASE("no backoff overflows or goes negative at attempt 10 000", "[backoff]") {
  std::mt19937_64 rng(7);
  for (auto j :
       {weir::jitter::none, weir::jitter::full, weir::jitter::equal, weir::jitter::decorrelated}) {
    for (auto b : {weir::backoff::exponential(1ms, 10.0, 1h), weir::backoff::linear(1ms, 1h, 2h),
                   weir::backoff::constant(5s)}) {
      auto d = b.with(j).delay(10'000, b.max_delay(), rng);
      CHECK(d >= 0ns);
      CHECK(d <= b.max_delay());
    }
  }
}

TEST_CASE("jittered delays stay within their documented bounds over 100 000 seeded draws",
          "[backoff]") {
  std::mt19937_64 rng(2026);
  const auto base = weir::backoff::exponential(100ms, 2.0, 10s);
  auto full = base.with(weir::jitter::full);
  auto equal = base.with(weir::jitter::equal);
  auto decorrelated = base.with(weir::jitter::decorrelated);
  ns previous = 0ns;
  double full_sum = 0;
  for (int i = 0; i < 100'000; ++i) {
    const unsigned n = i % 12;
    const ns ceiling = base.delay(n);
    const ns f = full.delay(n, 0ns, rng);
    REQUIRE(f >= 0ns);
    REQUIRE(f <= ceiling);
    full_sum += static_cast<double>(f.count()) / static_cast<double>(ceiling.count());
    const ns e = equal.delay(n, 0ns, rng);
    REQUIRE(e >= ceiling / 2);
    REQUIRE(e <= ceiling);
    const ns d = decorrelated.delay(n, previous, rng);
    REQUIRE(d >= 100ms);
    const ns grows_from = previous > 0ns ? previous : 100ms;  // the initial delay at first
    REQUIRE(d <= std::min<ns>(10s, grows_from * 3));
    previous = d;
  }
  // Full jitter is uniform: its mean sits at half the ceiling.
  CHECK(full_sum / 100'000 == Approx(0.5).margin(0.01));
}

TEST_CASE("seeded jitter is reproducible", "[backoff]") {
  auto b = weir::backoff::exponential(100ms, 2.0, 10s).with(weir::jitter::full);
  std::mt19937_64 a(1), c(1);
  for (unsigned n = 0; n < 20; ++n) CHECK(b.delay(n, 0ns, a) == b.delay(n, 0ns, c));
}

TEST_CASE("a misconfigured backoff is invalid_argument", "[backoff]") {
  CHECK_THROWS_AS(weir::backoff::exponential(1s, 0.5, 10s), weir::exception);
  CHECK_THROWS_AS(weir::backoff::exponential(1s, 2.0, 100ms), weir::exception);
  CHECK_THROWS_AS(weir::backoff::constant(-1s), weir::exception);
  CHECK_THROWS_AS(weir::backoff::linear(1s, -1s, 5s), weir::exception);
}
