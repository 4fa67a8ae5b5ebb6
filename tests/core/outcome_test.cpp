// Specifications of weir/core/outcome.hpp: outcomes, classifiers, capture.
#include "../support/core.hpp"

TEST_CASE("an outcome knows a cancellation, as an error code or as an exception", "[outcome]") {
  using o = weir::outcome<int>;
  const auto aborted = boost::asio::error::operation_aborted;
  CHECK(o::from_error(aborted).cancelled());
  CHECK(
      o::from_exception(std::make_exception_ptr(boost::system::system_error(aborted))).cancelled());
  CHECK_FALSE(o::from_value(1).cancelled());
  CHECK_FALSE(o::from_error(weir::error::timeout).cancelled());
  CHECK_FALSE(o::from_exception(std::make_exception_ptr(std::runtime_error("x"))).cancelled());
}

TEST_CASE("an outcome holds exactly one of value, error code or exception", "[outcome]") {
  auto v = weir::outcome<int>::from_value(42);
  CHECK(v.has_value());
  CHECK(std::move(v).get() == 42);

  auto e = weir::outcome<int>::from_error(weir::error::timeout);
  CHECK(e.has_error());
  CHECK_THROWS_AS(std::move(e).get(), boost::system::system_error);

  auto x = weir::outcome<void>::from_exception(std::make_exception_ptr(std::logic_error("bad")));
  CHECK(x.has_exception());
  CHECK_THROWS_AS(std::move(x).get(), std::logic_error);
  CHECK(x.failure() != nullptr);
}

TEST_CASE("the default classifier judges values, weir errors, cancellation and other failures",
          "[outcome]") {
  weir::default_classifier classify;
  using o = weir::outcome<int>;
  CHECK(classify(o::from_value(1)).kind == weir::verdict::success);
  CHECK(classify(o::from_error(weir::error::rate_limited)).kind == weir::verdict::rate_limited);
  CHECK(classify(o::from_error(weir::error::timeout)).kind == weir::verdict::retryable);
  CHECK(classify(o::from_error(weir::error::queue_full)).kind == weir::verdict::fatal);
  CHECK(classify(o::from_error(asio::error::operation_aborted)).kind == weir::verdict::fatal);
  CHECK(classify(o::from_error(asio::error::connection_reset)).kind == weir::verdict::retryable);

  auto limited = classify(o::from_exception(
      std::make_exception_ptr(weir::exception(weir::error::rate_limited, {}, 20s))));
  CHECK(limited.kind == weir::verdict::rate_limited);
  CHECK(limited.hint.retry_after == std::chrono::nanoseconds(20s));

  auto unknown = classify(o::from_exception(std::make_exception_ptr(std::runtime_error("?"))));
  CHECK(unknown.kind == weir::verdict::retryable);
}

TEST_CASE("a user classifier is any callable from outcome to classification", "[outcome]") {
  auto only_values_over_ten = [](const weir::outcome<int>& o) {
    if (o.has_value() && o.value() > 10) return weir::classification{};
    return weir::classification{weir::verdict::retryable, {}};
  };
  static_assert(weir::classifier_for<decltype(only_values_over_ten), int>);
  CHECK(only_values_over_ten(weir::outcome<int>::from_value(3)).kind == weir::verdict::retryable);
}

TEST_CASE("capture turns an awaitable's value or exception into an outcome", "[outcome]") {
  asio::io_context io;
  std::optional<weir::outcome<int>> good, bad;
  auto keep = [](asio::awaitable<int> op,
                 std::optional<weir::outcome<int>>& into) -> asio::awaitable<void> {
    into = co_await weir::capture(std::move(op));
  };
  asio::co_spawn(io, keep([]() -> asio::awaitable<int> { co_return 5; }(), good), asio::detached);
  asio::co_spawn(io,
                 keep(
                     []() -> asio::awaitable<int> {
                       throw std::runtime_error("boom");
                       co_return 0;
                     }(),
                     bad),
                 asio::detached);
  io.run();
  REQUIRE(good);
  CHECK(good->value() == 5);
  REQUIRE(bad);
  CHECK(bad->has_exception());
}
