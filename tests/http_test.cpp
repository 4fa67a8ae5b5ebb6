// Specifications for the HTTP rate-limit intelligence: header parsers on real provider samples and
// hostile input, the Beast response classifier, and server-driven adaptation on virtual time.
#include <weir/http/adaptation.hpp>
#include <weir/http/beast.hpp>
#include <weir/http/hints.hpp>
#include <weir/http/parse.hpp>
#include <weir/http/usage.hpp>
#include <weir/pipeline.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <deque>
#include <initializer_list>
#include <string>
#include <utility>

namespace asio = boost::asio;
namespace http = boost::beast::http;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using weir::http::max_hint;
using sys = std::chrono::system_clock;

namespace {
// 2026-11-28T12:00:00Z
const sys::time_point noon =
    sys::time_point(std::chrono::sys_days(std::chrono::year(2026) / 11 / 28)) + 12h;

weir::rate_limit_hint hints(std::initializer_list<std::pair<std::string, std::string>> fields,
                            sys::time_point now = noon) {
  weir::http::hint_parser p(now);
  for (const auto& [name, value] : fields) p.add(name, value);
  return p.hint();
}
}  // namespace

TEST_CASE("Retry-After as delta-seconds and as each HTTP-date form") {
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

TEST_CASE("Go-style reset durations as OpenAI and Groq send them") {
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
}

TEST_CASE("RFC 3339 resets with fractions and offsets") {
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

TEST_CASE("an OpenAI response's rate-limit headers") {
  auto h = hints({{"x-ratelimit-limit-requests", "500"},
                  {"x-ratelimit-limit-tokens", "30000"},
                  {"x-ratelimit-remaining-requests", "499"},
                  {"x-ratelimit-remaining-tokens", "29000"},
                  {"x-ratelimit-reset-requests", "120ms"},
                  {"x-ratelimit-reset-tokens", "2s"},
                  {"retry-after-ms", "1500"},
                  {"retry-after", "2"}});
  const auto refill = weir::refill::continuous;
  CHECK(h.requests == weir::limit_snapshot{500, 499, ns(120ms), {}, refill});
  CHECK(h.tokens == weir::limit_snapshot{30000, 29000, ns(2s), {}, refill});
  CHECK(h.retry_after == ns(1500ms));  // the precise one wins
}

TEST_CASE("a Groq 429's headers") {
  auto h = hints({{"retry-after", "7"},
                  {"x-ratelimit-limit-requests", "14400"},
                  {"x-ratelimit-remaining-requests", "14370"},
                  {"x-ratelimit-reset-requests", "2m59.56s"},
                  {"x-ratelimit-limit-tokens", "18000"},
                  {"x-ratelimit-remaining-tokens", "0"},
                  {"x-ratelimit-reset-tokens", "7.66s"}});
  CHECK(h.retry_after == ns(7s));
  CHECK(h.requests.reset_after == ns(2min + 59560ms));
  CHECK(h.tokens == weir::limit_snapshot{18000, 0, ns(7660ms), {}, weir::refill::continuous});
}

TEST_CASE("an Anthropic response's rate-limit headers") {
  auto h = hints({{"anthropic-ratelimit-requests-limit", "50"},
                  {"anthropic-ratelimit-requests-remaining", "0"},
                  {"anthropic-ratelimit-requests-reset", "2026-11-28T12:00:20Z"},
                  {"anthropic-ratelimit-input-tokens-limit", "40000"},
                  {"anthropic-ratelimit-input-tokens-remaining", "39000"},
                  {"anthropic-ratelimit-input-tokens-reset", "2026-11-28T12:00:01.5Z"},
                  {"anthropic-ratelimit-output-tokens-limit", "8000"},
                  {"anthropic-ratelimit-tokens-remaining", "47000"},
                  {"retry-after", "20"}});
  CHECK(h.requests == weir::limit_snapshot{50, 0, ns(20s), {}, weir::refill::continuous});
  CHECK(h.input_tokens ==
        weir::limit_snapshot{40000, 39000, ns(1500ms), {}, weir::refill::continuous});
  CHECK(h.output_tokens.limit == 8000);
  CHECK(h.tokens.remaining == 47000);
  CHECK(h.retry_after == ns(20s));
}

TEST_CASE("the IETF RateLimit and RateLimit-Policy fields") {
  auto h = hints(
      {{"RateLimit-Policy", R"("default";q=100;w=60, "bytes";q=1000;w=60;qu="content-bytes")"},
       {"RateLimit", R"("default";r=45;t=20, "bytes";r=0;t=50)"}});
  // w is the window: 100 per minute here, 10 per second below. content-bytes is not paced.
  CHECK(h.requests == weir::limit_snapshot{100, 45, ns(20s), ns(60s)});
  auto single = hints({{"ratelimit-policy", "burst;q=10;w=1"}, {"ratelimit", "burst;r=0;t=1"}});
  CHECK(single.requests == weir::limit_snapshot{10, 0, ns(1s), ns(1s)});
  auto policy_only = hints({{"RateLimit-Policy", R"("default";q=20;w=1)"}});
  CHECK(policy_only.requests == weir::limit_snapshot{20, {}, {}, ns(1s)});
}

TEST_CASE("the older RateLimit-* and X-RateLimit-* forms, resets told apart by magnitude") {
  CHECK(hints({{"RateLimit-Limit", "10, 10;w=1, 50;w=60"},
               {"RateLimit-Remaining", "3"},
               {"RateLimit-Reset", "4"}})
            .requests == weir::limit_snapshot{10, 3, ns(4s)});
  const auto epoch =
      std::chrono::duration_cast<std::chrono::seconds>(noon.time_since_epoch()).count() + 90;
  CHECK(hints({{"X-RateLimit-Reset", std::to_string(epoch)}}).requests.reset_after == ns(90s));
  CHECK(hints({{"X-RateLimit-Reset", "Sat, 28 Nov 2026 12:00:10 GMT"}}).requests.reset_after ==
        ns(10s));
  CHECK(hints({{"x-ratelimit-limit", "60"}, {"x-ratelimit-remaining", "59"}}).requests.limit == 60);
}

TEST_CASE("Gemini's RESOURCE_EXHAUSTED body with a RetryInfo retryDelay") {
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

TEST_CASE("hostile values are absent, never guessed, and huge ones are clamped") {
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

TEST_CASE("x-should-retry parses true and false in any case") {
  CHECK(weir::http::parse_should_retry("true") == true);
  CHECK(weir::http::parse_should_retry(" FALSE ") == false);
  CHECK(weir::http::parse_should_retry("yes") == std::nullopt);
}

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

TEST_CASE("the response classifier's status-code rule") {
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

TEST_CASE("x-should-retry overrides the status-code rule") {
  weir::http::response_classifier c;
  CHECK(c.judge(response(400, {{"x-should-retry", "true"}})).kind == weir::verdict::retryable);
  CHECK(c.judge(response(503, {{"x-should-retry", "false"}})).kind == weir::verdict::fatal);
  CHECK(c.judge(response(429, {{"x-should-retry", "true"}})).kind == weir::verdict::rate_limited);
}

TEST_CASE("a Gemini 429 gets its hint from the body") {
  weir::http::response_classifier c;
  auto r = response(
      429, {}, R"({"error":{"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay":"12s"}]}})");
  CHECK(c.judge(r).hint.retry_after == ns(12s));
}

TEST_CASE("as a classifier, errors are judged as the default classifier does") {
  weir::http::response_classifier c;
  using o = weir::outcome<http::response<http::string_body>>;
  CHECK(c(o::from_value(response(502))).kind == weir::verdict::retryable);
  CHECK(c(o::from_error(asio::error::connection_reset)).kind == weir::verdict::retryable);
  CHECK(c(o::from_error(asio::error::operation_aborted)).kind == weir::verdict::fatal);
}

// ---- server-driven adaptation ---------------------------------------------------------------

using clock_type = weir::testing::manual_clock;
using limits_type = weir::rate_limits<clock_type>;

TEST_CASE(
    "remaining 0 pauses a fixed window until its reset, a continuous limit until its next unit") {
  clock_type::reset();
  asio::io_context io;
  const auto limits_for = [&] {
    return limits_type(io.get_executor(), {.requests = weir::limit::per_minute(600)});
  };
  auto fixed = limits_for();
  weir::http::server_adaptation<clock_type> fixed_adapt(fixed);
  weir::classification c{weir::verdict::success, {}};
  c.hint.requests = {600, 0, ns(20s)};  // refill unknown: read as a fixed window
  fixed_adapt.observe(c);
  CHECK(fixed.time_until({.requests = 1}) == 20s);
  clock_type::advance(20s);
  CHECK(fixed.try_acquire({.requests = 1}));

  auto continuous = limits_for();
  weir::http::server_adaptation<clock_type> continuous_adapt(continuous);
  c.hint.requests.refill = weir::refill::continuous;  // full again in 20 s: one back every 1/30 s
  continuous_adapt.observe(c);
  CHECK(continuous.time_until({.requests = 1}) == ns(20s) / 600);
}

TEST_CASE("a 429 that says only Retry-After is one decrease, not a pause of the whole limiter") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  CHECK(adapt.request_rate()->per_second == Approx(9.7));  // 3% headroom under the known limit
  const auto sent = clock_type::now();
  clock_type::advance(50ms);
  adapt.observe({weir::verdict::rate_limited, {.retry_after = 7s}}, sent, clock_type::now());
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8));
  CHECK(limits.time_until({.requests = 1}) < 1s);  // the retry waits 7 s; the others do not
}

TEST_CASE("a 429 that says the quota is spent pauses as long as the largest hint, and decreases") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  weir::classification refused{weir::verdict::rate_limited, {.retry_after = 7s}};
  refused.hint.requests = {.limit = 600, .remaining = 0, .reset_after = ns(3s)};
  adapt.observe(refused);
  CHECK(limits.time_until({.requests = 1}) == 7s);
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8));  // and it is one decrease
  CHECK(refused.hint.exhausted_for() == ns(7s));
  refused.hint.retry_after.reset();
  CHECK(refused.hint.exhausted_for() == ns(3s));
}

TEST_CASE("the adaptation as a pipeline stage reads every answer and ignores cancelled calls",
          "[adaptation][pipeline]") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  auto guarded = weir::pipeline(limits, adapt.stage(weir::http::response_classifier{}));
  using reply = http::response<http::string_body>;

  // A cancelled call is no answer: nothing learnt.
  auto cancelled = []() -> asio::awaitable<reply> {
    throw boost::system::system_error(asio::error::operation_aborted);
    co_return reply{};
  };
  asio::co_spawn(io, guarded(cancelled), asio::detached);
  io.run();
  CHECK(adapt.request_rate()->per_second == Approx(9.7));

  // A 429 saying the quota is spent, returned as a value: the adaptation pauses the limits and
  // decreases, exactly as when fed by hand.
  clock_type::advance(1s);
  auto refused = []() -> asio::awaitable<reply> {
    co_return response(429, {{"retry-after", "7"},
                             {"x-ratelimit-limit-requests", "600"},
                             {"x-ratelimit-remaining-requests", "0"},
                             {"x-ratelimit-reset-requests", "3s"}});
  };
  unsigned status = 0;
  asio::co_spawn(io, guarded(refused),
                 [&](std::exception_ptr, reply r) { status = r.result_int(); });
  io.restart();
  io.run();
  CHECK(status == 429);
  CHECK(limits.time_until({.requests = 1}) == 7s);
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8));
}

TEST_CASE("refusals of requests already in flight at the first one are a single decrease") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto sent = clock_type::now();
  for (int i = 0; i < 8; ++i) {  // eight concurrent requests, refused one after another
    clock_type::advance(10ms);
    adapt.observe({weir::verdict::rate_limited, {}}, sent, clock_type::now());
  }
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8));  // not 0.8^8
  // A request sent after the decrease and refused too is a new event.
  const auto later = clock_type::now();
  clock_type::advance(50ms);
  adapt.observe({weir::verdict::rate_limited, {}}, later, clock_type::now());
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8 * 0.8));
}

TEST_CASE("a refusal while bursting shrinks the burst before it touches the rate") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 5}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  auto sent = clock_type::now();
  clock_type::advance(10ms);
  adapt.observe({weir::verdict::rate_limited, {}}, sent, clock_type::now());
  CHECK(limits.get_limit(weir::dimension::requests)->burst == 1);
  CHECK(adapt.request_rate()->per_second == Approx(9.7));
  clock_type::advance(1ms);
  sent = clock_type::now();
  clock_type::advance(10ms);
  adapt.observe({weir::verdict::rate_limited, {}}, sent, clock_type::now());
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8));
}

TEST_CASE(
    "a limit reported with its period is paced just under it; one without is never per minute") {
  clock_type::reset();
  asio::io_context io;
  limits_type ietf(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> learn(ietf);
  learn.observe({weir::verdict::success, hints({{"RateLimit-Policy", R"("default";q=20;w=1)"},
                                                {"RateLimit", R"("default";r=19;t=1)"}})});
  CHECK(learn.request_rate()->per_second == Approx(20 * 0.97));  // 20 per second, not per minute
  CHECK_FALSE(learn.state().slow_start);

  // X-RateLimit-Limit: 20 says nothing about its period: the rate is left to discovery.
  limits_type legacy(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> discover(legacy);
  const auto before = discover.request_rate()->per_second;
  discover.observe({weir::verdict::success,
                    hints({{"X-RateLimit-Limit", "20"}, {"X-RateLimit-Remaining", "19"}})});
  CHECK(discover.request_rate()->per_second >= before);
  CHECK_FALSE(discover.state().known);
  CHECK(discover.state().slow_start);
}

TEST_CASE("a continuously refilling limit's window is inferred from limit, remaining and reset") {
  clock_type::reset();
  asio::io_context io;
  limits_type openai(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> a(openai);
  a.observe({weir::verdict::success, hints({{"x-ratelimit-limit-requests", "500"},
                                            {"x-ratelimit-remaining-requests", "499"},
                                            {"x-ratelimit-reset-requests", "120ms"},
                                            {"x-ratelimit-limit-tokens", "30000"},
                                            {"x-ratelimit-remaining-tokens", "29000"},
                                            {"x-ratelimit-reset-tokens", "2s"}})});
  CHECK(a.state().known->per_second == Approx(500.0 / 60));  // a minute
  CHECK(openai.get_limit(weir::dimension::tokens)->rate.per_second == Approx(500 * 0.97));
  CHECK(openai.get_limit(weir::dimension::tokens)->burst == 3000);

  limits_type groq(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> g(groq);
  g.observe({weir::verdict::success, hints({{"x-ratelimit-limit-requests", "14400"},
                                            {"x-ratelimit-remaining-requests", "14370"},
                                            {"x-ratelimit-reset-requests", "2m59.56s"}})});
  CHECK(g.state().known->per_second == Approx(14400.0 / 86400).epsilon(0.01));  // a day
}

namespace {
// A strict server on virtual time, as nginx's limit_req with no burst: a request is served when it
// comes at least one interval after the last one served; refusals do not count.
struct strict_server {
  ns interval;
  std::optional<clock_type::time_point> last{};

  bool admit(clock_type::time_point t) {
    if (last && t - *last < interval) return false;
    last = t;
    return true;
  }
};

struct counts {
  int served = 0, refused = 0;
};

// `in_flight` workers send as fast as the limiter lets them; each answer comes back `rtt` later
// and is fed to the adaptation. Counts what the server decided from `from` on.
counts drive(limits_type& limits, weir::http::server_adaptation<clock_type>& adapt,
             strict_server& server, ns length, ns from, ns rtt, std::size_t in_flight) {
  struct answer {
    clock_type::time_point due, sent;
    bool ok;
  };
  std::deque<answer> answers;  // in due order: the round trip is constant
  const auto start = clock_type::now();
  counts seen;
  while (clock_type::now() - start < length) {
    const auto now = clock_type::now();
    while (!answers.empty() && answers.front().due <= now) {
      const auto a = answers.front();
      answers.pop_front();
      adapt.observe({a.ok ? weir::verdict::success : weir::verdict::rate_limited, {}}, a.sent,
                    a.due);
    }
    const bool can_send = answers.size() < in_flight;
    if (can_send && limits.try_acquire({.requests = 1}, now)) {
      const bool ok = server.admit(now);
      if (now - start >= from) ++(ok ? seen.served : seen.refused);
      answers.push_back({now + rtt, now, ok});
      continue;
    }
    ns step = can_send ? limits.time_until({.requests = 1}, now) : ns::max();
    if (!answers.empty()) step = std::min<ns>(step, answers.front().due - now);
    clock_type::advance(std::max<ns>(step, 1us));
  }
  return seen;
}
}  // namespace

TEST_CASE("told the limit of a strict server, weir reaches 95% of it with no refusal") {
  for (double limit : {5.0, 20.0}) {
    for (std::size_t in_flight : {8u, 32u}) {
      clock_type::reset();
      asio::io_context io;
      limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(limit * 60)});
      weir::http::server_adaptation<clock_type> adapt(limits);
      strict_server server{std::chrono::duration_cast<ns>(1s / limit)};
      const auto seen = drive(limits, adapt, server, 60s, 0s, 80ms, in_flight);
      INFO(limit << "/s, " << in_flight << " in flight: " << seen.served << " served, "
                 << seen.refused << " refused");
      CHECK(seen.served >= 0.95 * limit * 60);
      CHECK(seen.refused <= 0.01 * seen.served);
    }
  }
}

TEST_CASE("an unknown strict limit is found by slow start and held just under") {
  for (double limit : {5.0, 20.0, 100.0}) {
    clock_type::reset();
    asio::io_context io;
    limits_type limits(io.get_executor(), {});
    weir::http::server_adaptation<clock_type> adapt(limits);
    strict_server server{std::chrono::duration_cast<ns>(1s / limit)};
    const auto seen = drive(limits, adapt, server, 70s, 10s, 50ms, 32);
    INFO(limit << "/s: " << seen.served << " served, " << seen.refused << " refused after 10 s");
    CHECK(seen.served >= 0.90 * limit * 60);
    CHECK(seen.refused <= 0.03 * (seen.served + seen.refused));
    CHECK(adapt.state().ceiling->per_second <= limit * 1.1);
  }
}

TEST_CASE("adaptation options out of range are invalid_argument naming the field") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  using weir::http::server_adaptation;
  const auto names = [](std::string field) {
    return Catch::Predicate<weir::exception>([field](const weir::exception& e) {
      return e.code() == weir::error::invalid_argument &&
             std::string(e.what()).find(field) != std::string::npos;
    });
  };
  CHECK_THROWS_MATCHES(server_adaptation<clock_type>(limits, {.decrease = 1.5}), weir::exception,
                       names("decrease"));
  CHECK_THROWS_MATCHES(server_adaptation<clock_type>(limits, {.headroom = -0.1}), weir::exception,
                       names("headroom"));
  CHECK_THROWS_MATCHES(server_adaptation<clock_type>(limits, {.assumed_window = 0s}),
                       weir::exception, names("assumed_window"));
  CHECK_THROWS_MATCHES(server_adaptation<clock_type>(limits, {.initial_burst = 0}), weir::exception,
                       names("initial_burst"));
}

TEST_CASE("dates and epoch resets far outside any real reset cannot overflow") {
  using namespace weir::http;
  CHECK(parse_retry_after("Sat, 28 Nov 9999 12:00:30 GMT", noon) == std::nullopt);
  CHECK(parse_rfc3339("9999-12-31T23:59:59Z") == std::nullopt);
  CHECK(parse_rfc3339("0001-01-01T00:00:00Z") == std::nullopt);
  CHECK(hints({{"X-RateLimit-Reset", "9007199254740992"}}).requests.reset_after == max_hint);
}

TEST_CASE("the usage a response body reports, in OpenAI's and Anthropic's forms", "[usage]") {
  using weir::http::reported_usage;
  const auto openai = reported_usage(
      R"({"id":"x","choices":[{"message":{"content":"\"prompt_tokens\": 999"}}],)"
      R"("usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46,)"
      R"( "prompt_tokens_details": {"cached_tokens": 0}}})");
  REQUIRE(openai);
  CHECK(openai->input_tokens == 12);
  CHECK(openai->output_tokens == 34);
  const auto anthropic = reported_usage(
      R"({"content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":7,"output_tokens":3}})");
  REQUIRE(anthropic);
  CHECK(anthropic->input_tokens == 7);
  CHECK(anthropic->output_tokens == 3);
  CHECK_FALSE(reported_usage(R"({"error":{"message":"rate limited"}})"));
  CHECK_FALSE(reported_usage(R"({"usage": {"prompt_tokens": "many"}})"));
  CHECK_FALSE(reported_usage(""));
}
