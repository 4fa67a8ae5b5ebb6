// Specifications of weir/http/parse.hpp: the values in rate-limit headers, parsed exactly.
#include "../support/http.hpp"

TEST_CASE("Retry-After as delta-seconds and as each HTTP-date form", "[http][hints]") {
  using weir::http::parse_retry_after;
  CHECK(parse_retry_after("120", noon) == ns(120s));
  CHECK(parse_retry_after("  7 ", noon) == ns(7s));
  CHECK(parse_retry_after("1.5", noon) == ns(1500ms));
  CHECK(parse_retry_after("0", noon) == ns(0));
  CHECK(parse_retry_after("Sat, 28 Nov 2026 12:00:30 GMT", noon) == ns(30s));
  CHECK(parse_retry_after("Saturday, 28-Nov-26 12:01:00 GMT", noon) == ns(60s));
  CHECK(parse_retry_after("Sat Nov 28 12:00:05 2026", noon) == ns(5s));
  CHECK(parse_retry_after("Sat, 28 Nov 2026 11:00:00 GMT", noon) == ns(0));  // in the past
  CHECK(parse_retry_after("retry-after-ms", noon) == std::nullopt);
  CHECK(weir::http::parse_retry_after_ms("1500") == ns(1500ms));
  CHECK(weir::http::parse_retry_after_ms("20.5") == ns(20500us));
}

TEST_CASE("Go-style reset durations as OpenAI and Groq send them", "[http][hints]") {
  using weir::http::parse_duration;
  CHECK(parse_duration("12ms") == ns(12ms));
  CHECK(parse_duration("1.5s") == ns(1500ms));
  CHECK(parse_duration("6m0s") == ns(6min));
  CHECK(parse_duration("2m59.56s") == ns(2min + 59560ms));
  CHECK(parse_duration("1h2m3s") == ns(1h + 2min + 3s));
  CHECK(parse_duration("7.66s") == ns(7660ms));
  CHECK(parse_duration("250us") == ns(250us));
  CHECK(parse_duration("0") == ns(0));
  for (auto bad : {"", "s", "1x", "-1s", "1.s", "1..5s", "1h-2m", "ms", "1 s"})
    CHECK(parse_duration(bad) == std::nullopt);

  // The place of the last digit: what a hint's reset_precision is read from.
  const auto precision = [](const char* s) {
    return std::chrono::duration<double, std::milli>(
               weir::http::parse_written_duration(s)->precision)
        .count();
  };
  CHECK(precision("12ms") == Approx(1));
  CHECK(precision("6m0s") == Approx(1000));
  CHECK(precision("2m59.56s") == Approx(10));
  CHECK(precision("250us") == Approx(0.001));
  CHECK(weir::http::parse_written_duration("1.s") == std::nullopt);
}

TEST_CASE("RFC 3339 resets with fractions and offsets", "[http][hints]") {
  using weir::http::parse_rfc3339;
  const auto t = [](const char* s) { return parse_rfc3339(s); };
  REQUIRE(t("2026-11-28T12:00:30Z"));
  CHECK(*t("2026-11-28T12:00:30Z") - noon == ns(30s));
  CHECK(*t("2026-11-28T12:00:30.25Z") - noon == ns(30250ms));
  CHECK(*t("2026-11-28T14:00:30+02:00") - noon == ns(30s));
  CHECK(t("2026-11-28t11:00:30-01:00z") == std::nullopt);  // an offset then a Z
  for (auto bad :
       {"", "2026-11-28", "2026-13-28T12:00:30Z", "2026-02-30T12:00:00Z", "2026-11-28T25:00:00Z",
        "2026-11-28T12:00:30", "2026-11-28T12:00:30.Z", "2026-11-28T12:00:30+2:00", "garbage-date"})
    CHECK(parse_rfc3339(bad) == std::nullopt);
}

TEST_CASE("x-should-retry parses true and false in any case", "[http][hints]") {
  CHECK(weir::http::parse_should_retry("true") == true);
  CHECK(weir::http::parse_should_retry(" FALSE ") == false);
  CHECK(weir::http::parse_should_retry("yes") == std::nullopt);
}
