// Specifications of weir/core/error.hpp: codes, messages, weir::exception.
#include "../support/core.hpp"

TEST_CASE("weir error codes compare with their enum and read well", "[error]") {
  weir::error_code ec = weir::error::queue_full;
  CHECK(ec == weir::error::queue_full);
  CHECK(ec != weir::error::timeout);
  CHECK(ec.category().name() == std::string("weir"));
  CHECK(ec.message() == "request queue is full");
  CHECK(fmt::format("{}", weir::error::circuit_open) == "circuit breaker is open");

  std::error_code std_ec = weir::error::timeout;
  CHECK(std_ec.message() == "operation timed out");
}

TEST_CASE("every weir error has its own message", "[error]") {
  std::vector<std::string> seen;
  for (int e = static_cast<int>(weir::error::rate_limited);
       e <= static_cast<int>(weir::error::over_budget); ++e) {
    auto message = weir::make_error_code(static_cast<weir::error>(e)).message();
    CHECK(message != "unknown weir error");
    CHECK(std::find(seen.begin(), seen.end(), message) == seen.end());
    seen.push_back(message);
  }
  CHECK(weir::error_code(99, weir::error_category()).message() == "unknown weir error");
}

TEST_CASE("weir::exception carries the code, the server's retry_after and the last failure",
          "[error]") {
  auto cause = std::make_exception_ptr(std::runtime_error("connection reset"));
  try {
    throw weir::exception(weir::error::retries_exhausted, "after 3 attempts", 7s, cause, 3);
  } catch (const boost::system::system_error& e) {
    auto& x = dynamic_cast<const weir::exception&>(e);
    CHECK(x.code() == weir::error::retries_exhausted);
    CHECK(x.retry_after() == std::chrono::nanoseconds(7s));
    CHECK(x.attempts() == 3);
    CHECK(x.cause() == cause);
    CHECK(std::string(x.what()).find("all retry attempts failed") != std::string::npos);
  }
}
