// Specifications of weir/http/refusals.hpp and judge_status's reading of error bodies: a quota or
// credit spent (exhausted, never retried), an overloaded provider (retryable, a congestion signal)
// and a plain "slow down" (rate_limited), with the bodies as the providers document them.
#include "../support/common.hpp"
#include "../support/http.hpp"
#include "../support/provider_errors.hpp"

// ---- provider error bodies ------------------------------------------------------------------

namespace {

using header_pairs = std::vector<std::pair<std::string, std::string>>;
using namespace weir_test::provider_errors;
using weir::provider_shape;
using weir::refusal_cause;
using weir::verdict;

weir::classification judge_body(unsigned status, std::string_view body,
                                sys::time_point now = noon) {
  return weir::http::judge_status(status, header_pairs{}, body, {}, now);
}

// One documented answer and what judge_status must make of it.
struct expected_judgement {
  unsigned status;
  std::string_view body;
  verdict kind;
  refusal_cause cause;
  provider_shape shape;
  std::string_view code;
};

void check_judgements(std::initializer_list<expected_judgement> answers) {
  for (const auto& a : answers) {
    INFO(a.status << " " << a.body);
    const auto judged = judge_body(a.status, a.body);
    CHECK(judged.kind == a.kind);
    CHECK(judged.reason.cause == a.cause);
    CHECK(judged.reason.shape == a.shape);
    CHECK(judged.reason.code == a.code);
  }
}

}  // namespace

TEST_CASE("a spent quota or credit is exhausted: whose body said so, and never retryable",
          "[http][refusals]") {
  constexpr auto exhausted = verdict::exhausted;
  constexpr auto billing = refusal_cause::billing;
  check_judgements({
      {429, openai_insufficient_quota, exhausted, billing, provider_shape::openai,
       "insufficient_quota"},
      {402, anthropic_billing, exhausted, billing, provider_shape::anthropic, "billing_error"},
      {403, anthropic_billing, exhausted, billing, provider_shape::anthropic, "billing_error"},
      {400, anthropic_billing, exhausted, billing, provider_shape::anthropic, "billing_error"},
      {400, anthropic_credit_low, exhausted, billing, provider_shape::anthropic,
       "credit balance is too low"},
      {402, openrouter_credits, exhausted, billing, provider_shape::openrouter, "402"},
      // Any 402 is a payment needed, whatever its body.
      {402, "", exhausted, billing, provider_shape::unknown, "payment required"},
  });
  CHECK_FALSE(judge_body(429, openai_insufficient_quota).reason.resets_after);  // paid, not waited

  // x-should-retry: true does not make a spent quota worth another try.
  const auto told_retry = weir::http::judge_status(429, header_pairs{{"x-should-retry", "true"}},
                                                   openai_insufficient_quota);
  CHECK(told_retry.kind == verdict::exhausted);
}

TEST_CASE("a Gemini per-day quota is exhausted until midnight Pacific, whatever its RetryInfo says",
          "[http][refusals]") {
  using namespace std::chrono;
  // 2026-11-28 12:00 UTC is 04:00 PST: midnight is 20 h away (08:00 UTC).
  const auto in_winter = judge_body(429, gemini_per_day, noon);
  CHECK(in_winter.kind == verdict::exhausted);
  CHECK(in_winter.reason.cause == refusal_cause::quota);
  CHECK(in_winter.reason.shape == provider_shape::gemini);
  CHECK(in_winter.reason.code == "RESOURCE_EXHAUSTED");
  CHECK(in_winter.reason.resets_after == ns(20h));
  // 2026-07-01 06:00 UTC is 23:00 PDT on June 30: midnight is 1 h away (07:00 UTC).
  const auto summer = sys::time_point(sys_days(year(2026) / 7 / 1)) + 6h;
  CHECK(judge_body(429, gemini_per_day, summer).reason.resets_after == ns(1h));
  // 2026-03-08 (the second Sunday of March) 09:30 UTC is 01:30 PST; daylight time begins at
  // 2:00, so the next midnight is 00:00 PDT, 07:00 UTC on March 9: 21.5 h away.
  const auto spring = sys::time_point(sys_days(year(2026) / 3 / 8)) + 9h + 30min;
  CHECK(judge_body(429, gemini_per_day, spring).reason.resets_after == ns(21h + 30min));
  // 2026-11-01 (the first Sunday of November) 08:30 UTC is 01:30 PDT; standard time begins at
  // 2:00 PDT, so the next midnight is 00:00 PST, 08:00 UTC on November 2: 23.5 h away.
  const auto autumn = sys::time_point(sys_days(year(2026) / 11 / 1)) + 8h + 30min;
  CHECK(judge_body(429, gemini_per_day, autumn).reason.resets_after == ns(23h + 30min));

  // A per-minute quota is a plain "slow down", with the RetryInfo's delay.
  const auto per_minute = judge_body(429, gemini_per_minute);
  CHECK(per_minute.kind == verdict::rate_limited);
  CHECK(per_minute.reason.cause == refusal_cause::none);
  CHECK(per_minute.hint.retry_after == ns(22s));
}

TEST_CASE("Anthropic's monthly spend limit is exhausted until the first of next month, UTC",
          "[http][refusals]") {
  const auto spent = judge_body(429, anthropic_spend_limit, noon);  // 2026-11-28 12:00 UTC
  CHECK(spent.kind == verdict::exhausted);
  CHECK(spent.reason.cause == refusal_cause::billing);
  CHECK(spent.reason.shape == provider_shape::anthropic);
  CHECK(spent.reason.code == "enforced_spend_limit_reached");
  CHECK(spent.reason.resets_after == ns(std::chrono::days(2) + 12h));
  const auto in_december =
      sys::time_point(std::chrono::sys_days(std::chrono::year(2026) / 12 / 31));
  CHECK(judge_body(429, anthropic_spend_limit, in_december).reason.resets_after ==
        ns(std::chrono::days(1)));
}

TEST_CASE("an overloaded provider is retryable and says so; Groq's 498 is no longer fatal",
          "[http][refusals]") {
  constexpr auto retryable = verdict::retryable;
  constexpr auto overloaded = refusal_cause::overloaded;
  check_judgements({
      {529, anthropic_overloaded, retryable, overloaded, provider_shape::anthropic,
       "overloaded_error"},
      {529, "", retryable, overloaded, provider_shape::anthropic, "overloaded_error"},
      {498, groq_flex, retryable, overloaded, provider_shape::groq, "capacity_exceeded"},
      {498, "", retryable, overloaded, provider_shape::groq, "capacity_exceeded"},
      {503, openai_slow_down, retryable, overloaded, provider_shape::openai, "slow_down"},
      // A 503 that says nothing more is a plain transient failure.
      {503, "", retryable, refusal_cause::none, provider_shape::unknown, ""},
  });
  // The server's word still wins over the status.
  CHECK(weir::http::judge_status(498, header_pairs{{"x-should-retry", "false"}}, groq_flex).kind ==
        verdict::fatal);
}

TEST_CASE("a plain rate limit is still rate_limited with its hint, with no reason",
          "[http][refusals]") {
  for (auto body : {openai_rate_limit, anthropic_rate_limit, std::string_view{}}) {
    const auto c = weir::http::judge_status(429, header_pairs{{"retry-after", "3"}}, body);
    CHECK(c.kind == verdict::rate_limited);
    CHECK(c.hint.retry_after == ns(3s));
    CHECK(c.reason == weir::refusal_reason{});
  }
}

TEST_CASE("Beast's classifier reads the body as judge_status does", "[http][refusals]") {
  http::response<http::string_body> r{http::status::too_many_requests, 11};
  r.body() = std::string(openai_insufficient_quota);
  const auto c = weir::http::response_classifier{}.judge(r, noon);
  CHECK(c.kind == verdict::exhausted);
  CHECK(c.reason.shape == provider_shape::openai);
}

TEST_CASE("a status_error names the provider and its code, never the body", "[http][refusals]") {
  const auto e = weir::http::status_error::from(400, header_pairs{}, anthropic_billing);
  const std::string what = e.what();
  CHECK(what == "HTTP status 400: credit exhausted (anthropic billing_error)");
  CHECK(what.find("secret") == std::string::npos);
  CHECK(e.judged().kind == verdict::exhausted);
  const auto gemini = weir::http::status_error(429, judge_body(429, gemini_per_day, noon));
  CHECK(std::string(gemini.what()) ==
        "HTTP status 429: quota exhausted (gemini RESOURCE_EXHAUSTED), resets in 72000s");
  CHECK(std::string(weir::http::status_error::from(503, header_pairs{}, "").what()) ==
        "HTTP status 503");
}

TEST_CASE("retry does not retry an exhausted quota, and does retry an overloaded provider",
          "[http][refusals]") {
  using clock_type = weir::testing::manual_clock;
  for (const auto& [status, body, attempts] :
       {std::tuple{429u, openai_insufficient_quota, 1}, std::tuple{429u, gemini_per_day, 1},
        std::tuple{402u, openrouter_credits, 1}, std::tuple{529u, anthropic_overloaded, 3}}) {
    asio::io_context io;
    weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
    int calls = 0;
    weir_test::finished<int> f;
    f.start(io, retry([&, status = status, body = body]() -> asio::awaitable<int> {
              ++calls;
              throw weir::http::status_error::from(status, header_pairs{}, body);
              co_return 0;
            }));
    weir::testing::advance<clock_type>(io, 1min);
    INFO("status " << status);
    CHECK(f.done);
    CHECK(calls == attempts);
  }
}

TEST_CASE("an overloaded answer slows the pacing down, as a 429 does, and pauses nothing",
          "[http][refusals]") {
  using clock_type = weir::testing::manual_clock;
  asio::io_context io;
  weir::rate_limits<clock_type> limits(io.get_executor(),
                                       {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto before = adapt.state().rate.per_second;
  const auto sent = clock_type::now();
  clock_type::advance(50ms);
  adapt.observe(judge_body(529, anthropic_overloaded), sent, clock_type::now());
  CHECK(adapt.request_rate()->per_second == Approx(before * 0.8));
  CHECK(limits.time_until({.requests = 1}) < 1s);
  // A plain 503 is no refusal: the pacing stays.
  weir::rate_limits<clock_type> other(io.get_executor(),
                                      {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> unmoved(other);
  unmoved.observe(judge_body(503, ""), sent, clock_type::now());
  CHECK(unmoved.request_rate()->per_second == Approx(before));
}

TEST_CASE("the body reader never reads past a truncated or hostile body", "[http][refusals]") {
  for (std::string_view body :
       {R"({"type")", R"({"type":)", R"({"type": ")", R"({"type": "billing_error)",
        R"("quotaId": "PerDay)", R"({"status":"RESOURCE_EXHAUSTED","quotaId":)", "\"", ":",
        R"(type": "billing_error")", R"({"xtype": "billing_error"})"}) {
    INFO(body);
    for (unsigned status : {400u, 402u, 429u, 503u}) {
      const auto c = judge_body(status, body);
      CHECK(c.reason.cause != refusal_cause::overloaded);
      if (status != 402) CHECK(c.kind != verdict::exhausted);
    }
  }
}
