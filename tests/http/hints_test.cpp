// Specifications of weir/http/hints.hpp: what servers say about their limits, read exactly.
#include "../support/http.hpp"

TEST_CASE("a Go-style reset is taken as written to the millisecond, or finer", "[http][hints]") {
  const auto hint =
      hints({{"x-ratelimit-reset-requests", "6m0s"}, {"x-ratelimit-reset-tokens", "250us"}});
  CHECK(hint.requests.reset_precision == ns(1ms));
  CHECK(hint.tokens.reset_precision == ns(1us));
}

TEST_CASE("an OpenAI response's rate-limit headers", "[http][hints]") {
  auto h = hints({{"x-ratelimit-limit-requests", "500"},
                  {"x-ratelimit-limit-tokens", "30000"},
                  {"x-ratelimit-remaining-requests", "499"},
                  {"x-ratelimit-remaining-tokens", "29000"},
                  {"x-ratelimit-reset-requests", "120ms"},
                  {"x-ratelimit-reset-tokens", "2s"},
                  {"retry-after-ms", "1500"},
                  {"retry-after", "2"}});
  const auto refill = weir::refill::continuous;
  CHECK(h.requests == weir::limit_snapshot{500, 499, ns(120ms), {}, refill, {}, false, ns(1ms)});
  CHECK(h.tokens == weir::limit_snapshot{30000, 29000, ns(2s), {}, refill, {}, false, ns(1ms)});
  CHECK(h.retry_after == ns(1500ms));  // the precise one wins
}

TEST_CASE("a Groq 429's headers", "[http][hints]") {
  auto h = hints({{"retry-after", "7"},
                  {"x-ratelimit-limit-requests", "14400"},
                  {"x-ratelimit-remaining-requests", "14370"},
                  {"x-ratelimit-reset-requests", "2m59.56s"},
                  {"x-ratelimit-limit-tokens", "18000"},
                  {"x-ratelimit-remaining-tokens", "0"},
                  {"x-ratelimit-reset-tokens", "7.66s"}});
  CHECK(h.retry_after == ns(7s));
  CHECK(h.requests.reset_after == ns(2min + 59560ms));
  CHECK(h.tokens == weir::limit_snapshot{
                        18000, 0, ns(7660ms), {}, weir::refill::continuous, {}, false, ns(1ms)});
}

TEST_CASE("an Anthropic response's rate-limit headers", "[http][hints]") {
  auto h = hints({{"anthropic-ratelimit-requests-limit", "50"},
                  {"anthropic-ratelimit-requests-remaining", "0"},
                  {"anthropic-ratelimit-requests-reset", "2026-11-28T12:00:20Z"},
                  {"anthropic-ratelimit-input-tokens-limit", "40000"},
                  {"anthropic-ratelimit-input-tokens-remaining", "39000"},
                  {"anthropic-ratelimit-input-tokens-reset", "2026-11-28T12:00:01.5Z"},
                  {"anthropic-ratelimit-output-tokens-limit", "8000"},
                  {"anthropic-ratelimit-tokens-remaining", "47000"},
                  {"retry-after", "20"}});
  // Whole seconds are a reset rounded up; a fraction is taken as it is.
  CHECK(h.requests ==
        weir::limit_snapshot{50, 0, ns(20s), {}, weir::refill::continuous, ns(1s), true});
  CHECK(h.input_tokens ==
        weir::limit_snapshot{40000, 39000, ns(1500ms), {}, weir::refill::continuous, {}, true});
  CHECK(h.output_tokens.limit == 8000);
  CHECK(h.tokens.remaining == 47000);
  CHECK(h.retry_after == ns(20s));
}

TEST_CASE("the IETF RateLimit and RateLimit-Policy fields", "[http][hints]") {
  auto h = hints(
      {{"RateLimit-Policy", R"("default";q=100;w=60, "bytes";q=1000;w=60;qu="content-bytes")"},
       {"RateLimit", R"("default";r=45;t=20, "bytes";r=0;t=50)"}});
  // w is the window: 100 per minute here, 10 per second below. content-bytes is not paced.
  constexpr auto unknown = weir::refill::unknown;
  CHECK(h.requests == weir::limit_snapshot{100, 45, ns(20s), ns(60s), unknown, ns(1s)});
  auto single = hints({{"ratelimit-policy", "burst;q=10;w=1"}, {"ratelimit", "burst;r=0;t=1"}});
  CHECK(single.requests == weir::limit_snapshot{10, 0, ns(1s), ns(1s), unknown, ns(1s)});
  auto policy_only = hints({{"RateLimit-Policy", R"("default";q=20;w=1)"}});
  CHECK(policy_only.requests == weir::limit_snapshot{20, {}, {}, ns(1s)});
}

TEST_CASE("the older RateLimit-* and X-RateLimit-* forms, resets told apart by magnitude",
          "[http][hints]") {
  CHECK(hints({{"RateLimit-Limit", "10, 10;w=1, 50;w=60"},
               {"RateLimit-Remaining", "3"},
               {"RateLimit-Reset", "4"}})
            .requests == weir::limit_snapshot{10, 3, ns(4s), {}, weir::refill::unknown, ns(1s)});
  const auto epoch =
      std::chrono::duration_cast<std::chrono::seconds>(noon.time_since_epoch()).count() + 90;
  CHECK(hints({{"X-RateLimit-Reset", std::to_string(epoch)}}).requests.reset_after == ns(90s));
  // A moment, not a delay; a small number is a delay.
  CHECK(hints({{"X-RateLimit-Reset", std::to_string(epoch)}}).requests.reset_is_instant);
  CHECK_FALSE(hints({{"X-RateLimit-Reset", "90"}}).requests.reset_is_instant);
  CHECK(hints({{"X-RateLimit-Reset", "Sat, 28 Nov 2026 12:00:10 GMT"}}).requests.reset_after ==
        ns(10s));
  CHECK(hints({{"x-ratelimit-limit", "60"}, {"x-ratelimit-remaining", "59"}}).requests.limit == 60);
}

TEST_CASE("a reset in whole seconds is an upper bound: nothing left waits for its lower bound",
          "[http][hints]") {
  // A fixed window of 20 a second that opens in 30 ms, its reset rounded up to 1: before, weir
  // paused a whole second each time it read remaining 0, and reached half the limit.
  auto delta =
      hints({{"RateLimit-Limit", "20"}, {"RateLimit-Remaining", "0"}, {"RateLimit-Reset", "1"}});
  CHECK(delta.requests.next_unit_after() == ns(0));
  CHECK(delta.exhausted_for() == ns(0));
  const auto epoch =
      std::chrono::duration_cast<std::chrono::seconds>(noon.time_since_epoch()).count() + 3;
  auto at_epoch = hints({{"X-RateLimit-Limit", "20"},
                         {"X-RateLimit-Remaining", "0"},
                         {"X-RateLimit-Reset", std::to_string(epoch)}},
                        noon + 400ms);  // the window opens between 1.6 s and 2.6 s from now
  REQUIRE(at_epoch.requests.next_unit_after());
  CHECK(std::abs((*at_epoch.requests.next_unit_after() - 1600ms).count()) < 1000);
  auto ietf = hints({{"RateLimit-Policy", R"("w";q=20;w=1)"}, {"RateLimit", R"("w";r=0;t=1)"}});
  CHECK(ietf.requests.next_unit_after() == ns(0));
  // Go durations and RFC 3339 times with fractions are taken as they are.
  auto openai = hints({{"x-ratelimit-limit-requests", "20"},
                       {"x-ratelimit-remaining-requests", "0"},
                       {"x-ratelimit-reset-requests", "1s"}});
  CHECK(openai.requests.next_unit_after() == ns(50ms));
}

TEST_CASE("Gemini's RESOURCE_EXHAUSTED body with a RetryInfo retryDelay", "[http][hints]") {
  const std::string body = R"({
  "error": {
    "code": 429,
    "message": "You exceeded your current quota.",
    "status": "RESOURCE_EXHAUSTED",
    "details": [
      {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "PerMinute"}]},
      {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}
    ]
  }
})";
  CHECK(weir::http::parse_gemini_retry_delay(body) == ns(30s));
  CHECK(weir::http::parse_gemini_retry_delay(
            R"({"status":"RESOURCE_EXHAUSTED","retryDelay" : "1.5s"})") == ns(1500ms));
  CHECK(weir::http::parse_gemini_retry_delay(R"({"status":"INTERNAL","retryDelay":"30s"})") ==
        std::nullopt);
  CHECK(weir::http::parse_gemini_retry_delay(
            R"({"status":"RESOURCE_EXHAUSTED","retryDelay":"30)") == std::nullopt);
  CHECK(weir::http::parse_gemini_retry_delay(
            R"({"status":"RESOURCE_EXHAUSTED","retryDelay":"-3s"})") == std::nullopt);
}

TEST_CASE("hostile values are absent, never guessed, and huge ones are clamped", "[http][hints]") {
  using namespace weir::http;
  for (auto bad :
       {"", " ", "-1", "-5", "NaN", "nan", "inf", "1e9", "+5", "0x10", "12abc", "1,5", "٣"}) {
    CHECK(parse_count(bad) == std::nullopt);
    CHECK(parse_retry_after(bad, noon) == std::nullopt);
  }
  CHECK(parse_retry_after("99999999999999999999999999", noon) == max_hint);
  CHECK(parse_retry_after_ms("1e400") == std::nullopt);
  CHECK(parse_duration("999999999999h") == max_hint);
  CHECK(parse_count("123456789012345678901234567890") == max_count);
  CHECK(parse_retry_after("Sun, 31 Feb 2026 12:00:00 GMT", noon) == std::nullopt);
  CHECK(parse_retry_after("Sat, 28 Nov 2026 24:00:00 GMT", noon) == std::nullopt);
  CHECK(parse_retry_after("Sat, 28 Nov 2026 12:00:00 PST", noon) == std::nullopt);
  CHECK(parse_retry_after("Sat, 28 Xyz 2026 12:00:00 GMT", noon) == std::nullopt);
  CHECK(parse_retry_after("Sat, 28 Nov 2026 12:00:00 GMT trailing", noon) == std::nullopt);
  // Azure's "-1" means not tracked: unknown, not exhausted.
  CHECK(hints({{"x-ratelimit-remaining-requests", "-1"}}).requests.remaining == std::nullopt);
  // Repeated headers: the most cautious reading.
  auto repeated = hints({{"Retry-After", "3"},
                         {"retry-after", "9"},
                         {"RETRY-AFTER", "junk"},
                         {"x-ratelimit-remaining-tokens", "500"},
                         {"x-ratelimit-remaining-tokens", "20"}});
  CHECK(repeated.retry_after == ns(9s));
  CHECK(repeated.tokens.remaining == 20);
  // Unknown dimensions and malformed structured fields are ignored.
  CHECK(hints({{"x-ratelimit-limit-widgets", "5"},
               {"RateLimit", "\"unterminated;r=1"},
               {"RateLimit", ";;;,,,"}})
            .empty());
}

TEST_CASE("long RateLimit and RateLimit-Policy lists match each item to its policy by name",
          "[http][hints][issue36]") {
  // 20 000 items on each field, the policies in the reverse order: each RateLimit item finds
  // its own policy (pairwise, 2·10⁸ name comparisons; by name, n log n). The tightest is p0.
  std::string policies, current;
  const int n = 20'000;
  for (int i = n - 1; i >= 0; --i)
    policies += fmt::format("{}\"p{}\";q={};w=60", i == n - 1 ? "" : ", ", i, 100 + i);
  for (int i = 0; i < n; ++i)
    current += fmt::format("{}\"p{}\";r={};t=30", i == 0 ? "" : ", ", i, 50 + i);
  const auto h = hints({{"RateLimit-Policy", policies}, {"RateLimit", current}});
  CHECK(h.requests.limit == 100);
  CHECK(h.requests.remaining == 50);
  CHECK(h.requests.window == ns(60s));
  // The first of two policies with one name is the one taken.
  const auto twice =
      hints({{"RateLimit-Policy", R"("a";q=5;w=1, "a";q=500;w=1)"}, {"RateLimit", R"("a";r=1)"}});
  CHECK(twice.requests.limit == 5);
}
