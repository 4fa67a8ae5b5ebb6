// Specifications of weir/http/beast.hpp: the response classifier.
#include "../support/http.hpp"

// ---- Beast classifier -----------------------------------------------------------------------

namespace {
http::response<http::string_body> response(
    unsigned status, std::initializer_list<std::pair<std::string, std::string>> fields = {},
    std::string body = {}) {
  http::response<http::string_body> r{static_cast<http::status>(status), 11};
  for (const auto& [name, value] : fields) r.insert(name, value);
  r.body() = std::move(body);
  return r;
}
}  // namespace

TEST_CASE("the response classifier's status-code rule", "[http][beast]") {
  weir::http::response_classifier c;
  using v = weir::verdict;
  CHECK(c.judge(response(200)).kind == v::success);
  CHECK(c.judge(response(204)).kind == v::success);
  CHECK(c.judge(response(429, {{"retry-after", "20"}})).kind == v::rate_limited);
  CHECK(c.judge(response(429, {{"retry-after", "20"}})).hint.retry_after == ns(20s));
  for (unsigned s : {408u, 409u, 500u, 502u, 503u, 504u, 529u})
    CHECK(c.judge(response(s)).kind == v::retryable);
  for (unsigned s : {400u, 401u, 403u, 404u, 413u, 422u})
    CHECK(c.judge(response(s)).kind == v::fatal);
  CHECK(c.judge(response(503, {{"retry-after", "5"}})).hint.retry_after == ns(5s));

  weir::http::response_classifier lenient{.retryable_statuses = {425}};
  CHECK(lenient.judge(response(425)).kind == v::retryable);
}

TEST_CASE("x-should-retry overrides the status-code rule", "[http][beast]") {
  weir::http::response_classifier c;
  CHECK(c.judge(response(400, {{"x-should-retry", "true"}})).kind == weir::verdict::retryable);
  CHECK(c.judge(response(503, {{"x-should-retry", "false"}})).kind == weir::verdict::fatal);
  CHECK(c.judge(response(429, {{"x-should-retry", "true"}})).kind == weir::verdict::rate_limited);
}

TEST_CASE("a Gemini 429 gets its hint from the body", "[http][beast]") {
  weir::http::response_classifier c;
  auto r = response(
      429, {}, R"({"error":{"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay":"12s"}]}})");
  CHECK(c.judge(r).hint.retry_after == ns(12s));
}

TEST_CASE("as a classifier, errors are judged as the default classifier does", "[http][beast]") {
  weir::http::response_classifier c;
  using o = weir::outcome<http::response<http::string_body>>;
  CHECK(c(o::from_value(response(502))).kind == weir::verdict::retryable);
  CHECK(c(o::from_error(asio::error::connection_reset)).kind == weir::verdict::retryable);
  CHECK(c(o::from_error(asio::error::operation_aborted)).kind == weir::verdict::fatal);
}
