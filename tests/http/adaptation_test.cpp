// Specifications of weir/http/adaptation.hpp: pacing steered by the server, on virtual time.
#include "../support/http.hpp"

#include <random>

// ---- server-driven adaptation ---------------------------------------------------------------

using clock_type = weir::testing::manual_clock;
using limits_type = weir::rate_limits<clock_type>;

TEST_CASE(
    "remaining 0 pauses a fixed window until its reset, a continuous limit until its next unit",
    "[http][adaptation]") {
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

TEST_CASE("a 429 that says only Retry-After is one decrease, not a pause of the whole limiter",
          "[http][adaptation]") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  CHECK(adapt.state().rate.per_second == Approx(9.7));  // 3% headroom under the known limit
  const auto sent = clock_type::now();
  clock_type::advance(50ms);
  adapt.observe({weir::verdict::rate_limited, {.retry_after = 7s}}, sent, clock_type::now());
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8));
  CHECK(limits.time_until({.requests = 1}) < 1s);  // the retry waits 7 s; the others do not
}

TEST_CASE("a 429 that says the quota is spent pauses as long as the largest hint, and decreases",
          "[http][adaptation]") {
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
          "[http][adaptation][pipeline]") {
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
  CHECK(adapt.request_rate()->per_second == Approx(9.7));  // in force from the first call

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

TEST_CASE("refusals of requests already in flight at the first one are a single decrease",
          "[http][adaptation]") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto sent = clock_type::now();
  for (int i = 0; i < 8; ++i) {  // eight concurrent requests, refused one after another
    clock_type::advance(10ms);
    adapt.observe({weir::verdict::rate_limited, {}}, sent, clock_type::now());
  }
  CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8));  // not 0.8^8
  // Requests sent after the decrease judge it: refused as often as before, they are a new
  // event (a lockout, or a rate still too high), once their answers say so.
  for (int i = 0; i < 4; ++i) {
    const auto later = clock_type::now();
    clock_type::advance(50ms);
    adapt.observe({weir::verdict::rate_limited, {}}, later, clock_type::now());
    CHECK(adapt.request_rate()->per_second == Approx(9.7 * 0.8 * (i == 3 ? 0.8 : 1)));
  }
}

TEST_CASE("a refusal while bursting shrinks the burst before it touches the rate",
          "[http][adaptation]") {
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
    "a limit reported with its period is paced just under it; one without is never per minute",
    "[http][adaptation]") {
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

TEST_CASE("a continuously refilling limit's window is inferred from limit, remaining and reset",
          "[http][adaptation]") {
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

TEST_CASE("a tokens burst the user gave, spent, is not owed back when the server's report cuts it",
          "[http][adaptation]") {
  // Issue 30: given 1 000 tokens/s with a burst of ten seconds, as the server has it, spent;
  // then learned from the server's report with a burst of a tenth of its window: the spent
  // burst was owed back, and the next call waited 9.5 s while the server's bucket refilled.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.tokens = weir::limit{weir::per_second(1000), 10'000}});
  weir::http::server_adaptation<clock_type> a(limits);
  REQUIRE(limits.try_acquire({.requests = 1, .tokens = 10'000}));
  a.observe({weir::verdict::success, hints({{"x-ratelimit-limit-tokens", "10000"},
                                            {"x-ratelimit-remaining-tokens", "0"},
                                            {"x-ratelimit-reset-tokens", "10s"}})});
  const auto learned = limits.get_limit(weir::dimension::tokens);
  REQUIRE(learned);
  CHECK(learned->rate.per_second == Approx(1000 * 0.97));
  CHECK(learned->burst == 1'000);
  CHECK(limits.time_until({.requests = 1, .tokens = 500}) < 1s);
}

TEST_CASE("a given limit stands against a report that differs from it only by the reset's rounding",
          "[http][adaptation]") {
  // Issue 30: told 38.3 requests/s, a server of 383 per 10 s says "reset 27ms" for one request
  // out (26.1 ms, rounded up): read as 37.0/s, it lowered the given limit by 3%.
  asio::io_context io;
  const auto told = [&] {
    return limits_type(io.get_executor(), {.requests = weir::limit{weir::per_second(38.3), 1}});
  };
  const auto answer = [](const char* reset) {
    return weir::classification{weir::verdict::success,
                                hints({{"x-ratelimit-limit-requests", "383"},
                                       {"x-ratelimit-remaining-requests", "382"},
                                       {"x-ratelimit-reset-requests", reset}})};
  };
  auto within = told();
  weir::http::server_adaptation<clock_type> a(within);
  a.observe(answer("27ms"));
  CHECK(a.state().known->per_second == Approx(38.3));
  // A report lower than its rounding allows lowers it, as before.
  auto beyond = told();
  weir::http::server_adaptation<clock_type> b(beyond);
  b.observe(answer("30ms"));
  CHECK(b.state().known->per_second == Approx(1 / 0.030));
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
  weir::classification answer(clock_type::time_point t) {
    return {admit(t) ? weir::verdict::success : weir::verdict::rate_limited, {}};
  }
};

struct counts {
  int served = 0, refused = 0;
};

// `in_flight` workers send as fast as the limiter lets them; each answer (the server's
// classification, judged when it is sent) comes back `rtt` later and is fed to the adaptation.
// Counts what the server decided from `from` on.
template <class Server>
counts drive(limits_type& limits, weir::http::server_adaptation<clock_type>& adapt, Server& server,
             ns length, ns from, ns rtt, std::size_t in_flight) {
  struct answer {
    clock_type::time_point due, sent;
    weir::classification judged;
  };
  std::deque<answer> answers;
  const auto start = clock_type::now();
  counts seen;
  while (clock_type::now() - start < length) {
    const auto now = clock_type::now();
    while (!answers.empty() && answers.front().due <= now) {
      const auto a = answers.front();
      answers.pop_front();
      adapt.observe(a.judged, a.sent, a.due);
    }
    const bool can_send = answers.size() < in_flight;
    if (can_send && limits.try_acquire({.requests = 1}, now)) {
      auto judged = server.answer(now);
      if (now - start >= from) ++(judged.is_success() ? seen.served : seen.refused);
      answers.push_back({now + rtt, now, judged});
      continue;
    }
    ns step = can_send ? limits.time_until({.requests = 1}, now) : ns::max();
    if (!answers.empty()) step = std::min<ns>(step, answers.front().due - now);
    clock_type::advance(std::max<ns>(step, 1us));
  }
  return seen;
}
}  // namespace

TEST_CASE("told the limit of a strict server, weir reaches 95% of it with no refusal",
          "[http][adaptation]") {
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

TEST_CASE("an unknown strict limit is found by slow start and held just under",
          "[http][adaptation]") {
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

TEST_CASE("adaptation options out of range are invalid_argument naming the field",
          "[http][adaptation]") {
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
  // A burst of 10³⁰⁰ times a learned limit was cast to an integer: undefined behaviour.
  CHECK_THROWS_MATCHES(server_adaptation<clock_type>(limits, {.burst_fraction = 1e300}),
                       weir::exception, names("burst_fraction"));
}

TEST_CASE("dates and epoch resets far outside any real reset cannot overflow",
          "[http][adaptation]") {
  using namespace weir::http;
  CHECK(parse_retry_after("Sat, 28 Nov 9999 12:00:30 GMT", noon) == std::nullopt);
  CHECK(parse_rfc3339("9999-12-31T23:59:59Z") == std::nullopt);
  CHECK(parse_rfc3339("0001-01-01T00:00:00Z") == std::nullopt);
  CHECK(hints({{"X-RateLimit-Reset", "9007199254740992"}}).requests.reset_after == max_hint);
}

namespace {
// A status and the tokens the server counted, as the pacing tests' operations return them.
struct paced_reply {
  int status = 200;
};
// 429 is a refusal that says only Retry-After: 1, as nginx configured so sends it.
struct paced_classifier {
  template <class T>
  weir::classification operator()(const weir::outcome<T>& o) const {
    if (!o.has_value()) return weir::default_classifier{}(o);
    if constexpr (std::is_same_v<T, paced_reply>)
      if (o.value().status == 429) return {weir::verdict::rate_limited, {.retry_after = 1s}};
    return {};
  }
};

// `workers` callers send through `pipeline` as fast as it lets them, for `length` of virtual time;
// each call reaches `server` half a round trip after it is sent. The first request the server sees
// after `early_refusal` is refused whatever the rate (one early 429). Returns what the server
// served in each second.
template <class Pipeline>
std::vector<int> drive_pipeline(asio::io_context& io, Pipeline& pipeline, strict_server& server,
                                ns length, ns rtt, int workers, std::uint64_t estimate,
                                std::uint64_t actual, std::optional<ns> early_refusal) {
  const auto start = clock_type::now();
  std::vector<int> served(static_cast<std::size_t>(length / 1s) + 1);
  bool refused_early = false;
  auto sleep = [](ns d) -> asio::awaitable<void> {
    asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor, d);
    co_await t.async_wait(asio::use_awaitable);
  };
  auto worker = [&]() -> asio::awaitable<void> {
    while (clock_type::now() - start < length) {
      weir::basic_call_context<clock_type> ctx{.tokens = estimate};
      try {
        co_await pipeline(ctx, [&]() -> asio::awaitable<paced_reply> {
          co_await sleep(rtt / 2);
          const auto at = clock_type::now();
          bool ok = server.admit(at);
          if (ok && early_refusal && !refused_early && at - start >= *early_refusal) {
            refused_early = true;
            ok = false;
          }
          if (ok) ++served[static_cast<std::size_t>((at - start) / 1s)];
          co_await sleep(rtt / 2);
          if (ok) ctx.actual_tokens = actual;
          co_return paced_reply{ok ? 200 : 429};
        });
      } catch (const weir::exception&) {
      }
    }
  };
  for (int i = 0; i < workers; ++i) asio::co_spawn(io, worker(), asio::detached);
  weir::testing::advance<clock_type>(io, length + 1min);
  return served;
}
}  // namespace

TEST_CASE("refunds and one early refusal do not collapse the pacing of a strict server",
          "[http][adaptation][pipeline]") {
  // Before: a storm of refusals in the first seconds, then one request a minute for good.
  for (std::uint64_t actual : {40u, 20u}) {
    clock_type::reset();
    asio::io_context io;
    limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(600),
                                           .tokens = weir::limit::per_minute(600 * 40)});
    weir::http::server_adaptation<clock_type> adapt(limits);
    weir::retry<clock_type, paced_classifier> retry({.max_attempts = 4});
    auto guarded = weir::pipeline(retry, limits, adapt.stage(paced_classifier{}));
    strict_server server{100ms};
    const auto served =
        drive_pipeline(io, guarded, server, 60s, 80ms, 8, 40, actual, std::optional<ns>(500ms));
    int late = 0;
    for (std::size_t s = 30; s < 60; ++s) late += served[s];
    std::string per_second;
    for (auto n : served) per_second += std::to_string(n) + " ";
    INFO("actual " << actual << ": served per second " << per_second << "; pacing "
                   << adapt.state().rate.per_second << "/s, ceiling "
                   << adapt.state().ceiling->per_second);
    CHECK(late >= 0.95 * 10 * 30);
  }
}

TEST_CASE("an adaptation changes nothing in its limiter until it is used", "[http][adaptation]") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(10), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  CHECK(limits.get_limit(weir::dimension::requests)->rate.per_second == 10);  // before: 9.7
  CHECK(adapt.state().rate.per_second == Approx(9.7));          // what it will pace at
  auto stage = adapt.stage(weir::http::response_classifier{});  // made, not used
  CHECK(adapt.request_rate()->per_second == 10);

  auto guarded = weir::pipeline(limits, stage);
  asio::co_spawn(io, guarded([]() -> asio::awaitable<int> { co_return 1; }), asio::detached);
  io.run();
  CHECK(adapt.request_rate()->per_second == Approx(9.7));

  limits_type discovered(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> discover(discovered);
  CHECK_FALSE(discovered.get_limit(weir::dimension::requests));
  discover.engage();
  CHECK(discover.request_rate()->per_second == 2);  // slow start's first rate
}

namespace {
// A fixed window of `limit` per second, opening at `phase` past each second of the manual clock,
// or (from_first_request) at the first request after the last window ended, as Flask-Limiter and
// other in-memory stores count. It reports the reset rounded up to whole seconds,
// as epoch seconds (X-RateLimit-*) or as delta seconds (RateLimit-*), and refuses with a
// Retry-After rounded up too. Refusals do not count.
struct fixed_window_server {
  int limit;
  ns phase;
  bool epoch;
  bool from_first_request = false;
  std::int64_t window = -1;
  std::optional<ns> began{};  // from_first_request: when the current window began
  int used = 0;

  weir::classification answer(clock_type::time_point t) {
    ns opens{0};  // on the manual clock
    if (from_first_request) {
      if (!began || t.time_since_epoch() >= *began + 1s) began = t.time_since_epoch(), used = 0;
      opens = *began + 1s;
    } else {
      const auto index = static_cast<std::int64_t>((t.time_since_epoch() - phase) / 1s);
      if (index != window) window = index, used = 0;
      opens = phase + ns(1s) * (index + 1);
    }
    const bool ok = used < limit;
    if (ok) ++used;
    const auto wall = noon + t.time_since_epoch();
    const auto left = opens - t.time_since_epoch();
    const auto whole = [](ns d) {
      return std::to_string((d.count() + 999'999'999) / 1'000'000'000);
    };
    std::vector<std::pair<std::string, std::string>> headers;
    const auto remaining = std::to_string(limit - used);
    if (epoch) {
      const auto reset_at = noon.time_since_epoch() + opens;
      headers = {{"X-RateLimit-Limit", std::to_string(limit)},
                 {"X-RateLimit-Remaining", remaining},
                 {"X-RateLimit-Reset", whole(reset_at)}};
    } else {
      headers = {{"RateLimit-Limit", std::to_string(limit)},
                 {"RateLimit-Remaining", remaining},
                 {"RateLimit-Reset", whole(left)}};
    }
    if (!ok) headers.emplace_back("Retry-After", whole(left));
    return weir::http::judge_status(ok ? 200 : 429, headers, {}, {},
                                    std::chrono::time_point_cast<sys::duration>(wall));
  }
};

}  // namespace

// A fixed window of 20/s, in both reset shapes, at two phases and from the first request, driven
// for a minute with the limit told or not; what the server decided after the first 10 s.
template <class Check>
void for_each_fixed_window(bool told, Check check) {
  for (bool epoch : {true, false}) {
    for (int start = 0; start < 3; ++start) {
      clock_type::reset();
      asio::io_context io;
      limits_type limits(io.get_executor(), {});
      if (told) limits.set_limit(weir::dimension::requests, weir::limit::per_minute(20 * 60));
      weir::http::server_adaptation<clock_type> adapt(limits);
      const ns phase = start == 1 ? ns(370ms) : ns(0);
      fixed_window_server server{
          .limit = 20, .phase = phase, .epoch = epoch, .from_first_request = start == 2};
      const auto seen = drive(limits, adapt, server, 60s, 10s, 80ms, 16);
      const auto start_text = start == 2 ? std::string("from the first request")
                                         : "at phase " + std::to_string(phase / 1ms) + " ms";
      INFO((epoch ? "epoch" : "delta") << " resets, windows " << start_text << ": " << seen.served
                                       << " served, " << seen.refused << " refused");
      check(seen, adapt);
    }
  }
}

TEST_CASE("told the limit of a fixed window that reports whole-second resets, weir reaches 95%",
          "[http][adaptation]") {
  // Before: each "remaining 0" paused until the rounded-up reset, a whole second, and weir
  // reached about half of the limit. A window from the first request steps its epoch resets by
  // 1 s or 2 s; read from the latest step, it was 2 s half the time, and weir reached 85% of
  // Flask-Limiter's limit (benchmarks/goodput).
  for_each_fixed_window(true, [](counts seen, auto&) {
    CHECK(seen.served >= 0.95 * 20 * 50);
    CHECK(seen.refused <= 0.01 * seen.served);
  });
}

TEST_CASE("told nothing, a fixed window that reports its resets in whole seconds is paced at it",
          "[http][adaptation]") {
  // The first answer after a window opens reports the whole window as its reset (a delay), or
  // every answer in a window names the same moment (epoch seconds): either gives the window, and
  // the limit over it is the rate. Before, such a limit was discovered by refusals: 76% of it.
  for_each_fixed_window(false, [](counts seen, auto& adapt) {
    CHECK(seen.served >= 0.93 * 20 * 50);
    CHECK(seen.refused <= 0.01 * seen.served);
    CHECK(adapt.state().known->per_second == Approx(20));
  });
}

TEST_CASE("a limit the user gave is a cap the server's figure lowers but never raises",
          "[http][adaptation]") {
  // Four clients sharing a limit of 20/s, each told 5/s: the server reports the whole 20/s.
  // Before, its word replaced the share, and each client paced at 19.4/s.
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(5 * 60)});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto report = [&](int limit) {
    adapt.observe(
        {weir::verdict::success, hints({{"RateLimit-Policy", fmt::format(R"("d";q={};w=1)", limit)},
                                        {"RateLimit", R"("d";r=5;t=1)"}})});
  };
  report(20);
  CHECK(adapt.request_rate()->per_second <= 5);
  report(4);  // the limit fell below the share
  CHECK(adapt.request_rate()->per_second == Approx(4 * 0.97));
  report(20);
  for (int i = 0; i < 500; ++i) adapt.observe({weir::verdict::success, {}});
  CHECK(adapt.request_rate()->per_second <= 5);
  CHECK(adapt.request_rate()->per_second > 0.95 * 5 * 0.97);
}

namespace {
// A strict limit behind a flaky gateway: besides the limit's own refusals, a share of requests is
// refused at random with 429 and Retry-After: 1, whatever the rate.
struct flaky_strict_server {
  strict_server limit;
  double flaky;
  std::mt19937_64 rng{7};
  int flaky_refusals = 0;

  weir::classification answer(clock_type::time_point t) {
    if (std::bernoulli_distribution(flaky)(rng)) {
      ++flaky_refusals;
      return {weir::verdict::rate_limited, {.retry_after = 1s}};
    }
    if (!limit.admit(t)) return {weir::verdict::rate_limited, {.retry_after = 1s}};
    return {};
  }
};
}  // namespace

TEST_CASE("under a known limit, random refusals unrelated to the rate cost at most a tenth",
          "[http][adaptation]") {
  // Before: every random 429 was a congestion event, and the pace fell for good (to 0.3-2.6/s
  // of 20). Now a decrease that the refusals do not follow is undone.
  for (double flaky : {0.05, 0.1, 0.2}) {
    for (std::size_t in_flight : {4u, 16u}) {
      clock_type::reset();
      asio::io_context io;
      limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(20 * 60)});
      weir::http::server_adaptation<clock_type> adapt(limits);
      flaky_strict_server server{{50ms}, flaky};
      const auto seen = drive(limits, adapt, server, 90s, 30s, 80ms, in_flight);
      const double sent = (seen.served + seen.refused) / 60.0;
      INFO(flaky * 100 << "% random refusals, " << in_flight << " in flight: sent " << sent
                       << "/s, served " << seen.served / 60.0 << "/s, " << server.flaky_refusals
                       << " random refusals");
      CHECK(sent >= 0.9 * 0.97 * 20);
    }
  }
  // A real halving of the limit is still followed: refusals that fall after a decrease are
  // congestion.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(20 * 60)});
  weir::http::server_adaptation<clock_type> adapt(limits);
  flaky_strict_server server{{50ms}, 0.1};
  drive(limits, adapt, server, 30s, 0s, 80ms, 16);
  server.limit.interval = 100ms;
  drive(limits, adapt, server, 10s, 0s, 80ms, 16);
  const auto halved = drive(limits, adapt, server, 30s, 0s, 80ms, 16);
  INFO("after halving: " << halved.served << " served, " << halved.refused << " refused");
  // (Noise and a real change together still cost: ~68% of the new limit is served, where the
  // property asks 80%. Refusals during recovery lower the ceiling; see issue 30's note.)
  CHECK(halved.served >= 0.6 * 10 * 30);
  CHECK(halved.refused <= 0.2 * (halved.served + halved.refused));
}

TEST_CASE("a decrease after one judged congestion is judged against the share at its pace",
          "[http][adaptation]") {
  // Issue 30: a limit halved under a given one. Half the answers after the first decrease are
  // refused: congestion, and the last refusal is the second decrease. That one was judged against
  // the share before it taken over the last 32 answers, mostly from before the halving (a sixth
  // refused): 2 of 8 refused after it read as noise, the decrease was undone, and the pace stayed
  // above the new limit, its refusals from then on within the noise learned.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(4), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  auto t = clock_type::now();
  const auto answers = [&](std::string_view pattern) {  // '.' served, 'r' refused
    for (char c : pattern) {
      t += 100ms;
      adapt.observe({c == 'r' ? weir::verdict::rate_limited : weir::verdict::success, {}}, t - 50ms,
                    t);
    }
  };
  answers(std::string(32, '.'));
  answers("r");  // the first decrease
  const auto first = adapt.state().rate.per_second;
  answers("..r.r.rr");  // half refused: congestion, then the second decrease
  const auto second = adapt.state().rate.per_second;
  REQUIRE(second < first * 0.9);
  answers("..r..r..");  // 2 of 8 refused
  INFO("paced at " << adapt.state().rate.per_second << "/s after the second decrease to " << second
                   << "/s");
  // Recovery climbs a few percent toward the ceiling with each success, not back above the
  // pace of the first decrease.
  CHECK(adapt.state().rate.per_second <= second * 1.1);
  CHECK(adapt.state().rate.per_second < first);
}

TEST_CASE("told nothing, 5% random refusals leave the pace near an unknown limit",
          "[http][adaptation]") {
  // Before: while discovering, every random 429 was a congestion event: slow start ended at the
  // first one, a few requests a second, and each later one lowered the pace again (1.0-5.7/s of
  // a strict 20/s sent over the last 30 s of 90, four gateways' draws). Now a decrease is judged
  // here too, and one that the refusals do not follow is undone: 11-18/s. (At 10-20% random
  // refusals discovery still often collapses: docs/pacing.md.)
  for (std::uint64_t draw : {1u, 2u, 3u, 4u}) {
    for (std::size_t in_flight : {4u, 16u}) {
      clock_type::reset();
      asio::io_context io;
      limits_type limits(io.get_executor(), {});
      weir::http::server_adaptation<clock_type> adapt(limits);
      flaky_strict_server server{{50ms}, 0.05, std::mt19937_64(draw)};
      const auto seen = drive(limits, adapt, server, 90s, 60s, 80ms, in_flight);
      const double sent = (seen.served + seen.refused) / 30.0;
      INFO("draw " << draw << ", " << in_flight << " in flight: sent " << sent << "/s, served "
                   << seen.served / 30.0 << "/s");
      CHECK(sent >= 0.5 * 20);
      CHECK(sent <= 20 * 1.1);
    }
  }
}

namespace {
// Eighteen runs told nothing against a strict `limit` per second behind a gateway refusing 10,
// 15 and 20% at random (six draws each), 16 in flight: what each sent per second over the last
// 30 s of 120.
std::vector<double> flaky_discoveries(double limit, ns rtt) {
  std::vector<double> sent;
  for (double flaky : {0.1, 0.15, 0.2}) {
    for (std::uint64_t draw = 1; draw <= 6; ++draw) {
      clock_type::reset();
      asio::io_context io;
      limits_type limits(io.get_executor(), {});
      weir::http::server_adaptation<clock_type> adapt(limits);
      flaky_strict_server server{
          {std::chrono::duration_cast<ns>(1s / limit)}, flaky, std::mt19937_64(draw)};
      const auto seen = drive(limits, adapt, server, 120s, 90s, rtt, 16);
      sent.push_back((seen.served + seen.refused) / 30.0);
    }
  }
  return sent;
}
}  // namespace

TEST_CASE("told nothing, 10-20% random refusals do not hold the pace down for good",
          "[http][adaptation]") {
  // Before: decrease after decrease read a flaky gateway's refusals as congestion, and most runs
  // ended at 0.2-0.6/s of a strict 20/s, refused as often as ever (4 of these 18 runs sent 8/s or
  // more over the last 30 s of 120). Now a pace under a third of the best one, still refused as
  // often, is noise: 12 of 18 when that check read the last 32 answers (the rest fell within
  // them, with no better pace yet to compare with), all 18 (9.8-16/s) since it reads 16.
  int near_the_limit = 0;
  for (const double sent : flaky_discoveries(20, 80ms)) {
    INFO("sent " << sent << "/s");
    CHECK(sent <= 20 * 1.1);
    near_the_limit += sent >= 8 ? 1 : 0;
  }
  CHECK(near_the_limit >= 16);
}

TEST_CASE("told nothing, random refusals do not hold a slow limit's pace down for good",
          "[http][adaptation]") {
  // A strict 4/s behind a gateway refusing 10-20% at random: 32 answers take eight seconds or
  // more there, and the check against a collapse, which read the last 32, often saw none before
  // the pace had fallen to a few tenths of a request a second, too slow to fill 32 answers
  // again (0.13-1.3/s sent over the last 30 s of 120 in 12 of these 18 runs). It reads the last
  // 16 now: 14 of 18 runs send 2.1-4.0/s, the rest 1.0-1.8/s.
  int near_the_limit = 0;
  std::string runs;
  for (const double sent : flaky_discoveries(4, 200ms)) {
    runs += fmt::format("{:.2f} ", sent);
    CHECK(sent <= 4 * 1.1);
    near_the_limit += sent >= 2 ? 1 : 0;
  }
  INFO("sent per second over the last 30 s: " << runs);
  CHECK(near_the_limit >= 12);
}

TEST_CASE("a pace restored as noise and refused as a lockout is forgotten: a limit cut is kept",
          "[http][adaptation]") {
  // A strict 20/s behind a gateway refusing 15% at random is cut to 4/s: the pace falls under a
  // third of its best with a share refused that noise would explain, and is restored once. The
  // lockout that follows undoes the restore and the noise it learned, so the pace settles near
  // the new limit, 18-23% refused with the gateway's 15% (restored again at each fall, one run
  // was refused 44%; with that noise kept, 37%; before any of this, 0.2-1.3/s were served).
  for (std::uint64_t draw = 1; draw <= 4; ++draw) {
    clock_type::reset();
    asio::io_context io;
    limits_type limits(io.get_executor(), {});
    weir::http::server_adaptation<clock_type> adapt(limits);
    flaky_strict_server server{{50ms}, 0.15, std::mt19937_64(draw)};
    drive(limits, adapt, server, 60s, 0s, 80ms, 16);
    server.limit.interval = 250ms;
    drive(limits, adapt, server, 30s, 0s, 80ms, 16);
    const auto cut = drive(limits, adapt, server, 30s, 0s, 80ms, 16);
    const double answered = cut.served + cut.refused;
    INFO("draw " << draw << ": served " << cut.served / 30.0 << "/s, " << cut.refused
                 << " refused of " << answered);
    CHECK(cut.refused <= 0.3 * answered);
    CHECK(cut.served >= 1.0 * 30);
  }
}

TEST_CASE("a limit reported anew ends the judging of a decrease made under the old one",
          "[http][adaptation]") {
  // A decrease judged as noise is undone to the pace before it. Before: a limit that fell
  // meanwhile (20/s, then 10/s) was undone back to 19.4/s, twice the new limit.
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto report = [&](int limit) {
    adapt.observe(
        {weir::verdict::success, hints({{"RateLimit-Policy", fmt::format(R"("d";q={};w=1)", limit)},
                                        {"RateLimit", fmt::format(R"("d";r={};t=1)", limit / 2)}})},
        clock_type::now() - 10ms, clock_type::now());
  };
  const auto answer = [&](bool refused) {
    clock_type::advance(50ms);
    adapt.observe(refused ? weir::classification{weir::verdict::rate_limited, {}}
                          : weir::classification{weir::verdict::success, {}},
                  clock_type::now() - 10ms, clock_type::now());
  };
  report(20);
  REQUIRE(adapt.state().known->per_second == Approx(20));
  for (int i = 0; i < 40; ++i) answer(false);
  // The first refusal shrinks the burst, the second is jitter's (a step of one headroom), the
  // third a decrease, judged by the answers that follow.
  for (int i = 0; i < 3; ++i) answer(true);
  REQUIRE(adapt.request_rate()->per_second < 19);
  clock_type::advance(50ms);
  report(10);
  report(10);
  // Refusals go on as before: the decrease would be judged noise and undone.
  for (int i = 0; i < 40; ++i) answer(i % 16 == 0);
  CHECK(adapt.request_rate()->per_second <= 10 * 0.97 + 1e-9);
}

namespace {
// A strict limit behind which, or in front of which, a share of requests fails with a 503: in
// front (a flaky proxy), the limit never counts them; behind (its upstream), it counted them.
struct failing_server {
  strict_server limit;
  double failing;
  bool counted;
  std::mt19937_64 rng{11};
  int refusals = 0;

  weir::classification answer(clock_type::time_point t) {
    const bool fails = std::bernoulli_distribution(failing)(rng);
    if (fails && !counted) return unavailable();
    if (!limit.admit(t)) {
      ++refusals;
      return {weir::verdict::rate_limited, {}};
    }
    return fails ? unavailable() : weir::classification{};
  }
  static weir::classification unavailable() { return {weir::verdict::retryable, {}, {}, 503}; }
};
}  // namespace

TEST_CASE("a slot that a server error did not spend is used again, unless errors are seen to count",
          "[http][adaptation]") {
  // A tenth of requests fail with 503 at a strict limit of 20/s, answered in 2 ms (a gateway
  // answers at once, before the next request goes: the slot is used again all but 2 ms of it).
  // Before, their slots were lost whoever failed them: 87% of the limit served (83-87% behind
  // nginx in benchmarks/goodput).
  for (bool counted : {false, true}) {
    for (std::size_t in_flight : {4u, 16u}) {
      clock_type::reset();
      asio::io_context io;
      limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(20 * 60)});
      weir::http::server_adaptation<clock_type> adapt(limits);
      failing_server server{{50ms}, 0.1, counted};
      const auto seen = drive(limits, adapt, server, 60s, 10s, 2ms, in_flight);
      INFO((counted ? "counted" : "not counted")
           << ", " << in_flight << " in flight: " << seen.served << " served, " << server.refusals
           << " refused");
      if (counted) {
        // Learned from the first two slots given back: no more 429s than that after it.
        CHECK(seen.served >= 0.85 * 20 * 50);
        CHECK(server.refusals <= 2);
      } else {
        CHECK(seen.served >= 0.95 * 20 * 50);
        CHECK(server.refusals <= 0.01 * seen.served);
      }
    }
  }
}

TEST_CASE("under a slow known limit, the pace comes back within seconds once refusals stop",
          "[http][adaptation]") {
  // Before: each success closed a twentieth of the gap, so a limit of 2/s took 20 s to come
  // back from one decrease (issue 30: "a restored limit is followed within 10 s").
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(2), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const double hold = 2 * 0.97;
  auto sent = clock_type::now();
  clock_type::advance(100ms);
  adapt.observe({weir::verdict::rate_limited, {}}, sent, clock_type::now());
  REQUIRE(adapt.state().rate.per_second == Approx(hold * 0.8));
  for (int i = 0; i < 16; ++i) {  // eight seconds of successes at about the paced rate
    clock_type::advance(400ms);
    sent = clock_type::now();
    clock_type::advance(100ms);
    adapt.observe({weir::verdict::success, {}}, sent, clock_type::now());
  }
  CHECK(adapt.state().rate.per_second >= 0.95 * hold);
}

TEST_CASE("a reported limit that rises is followed; a whole-second reset infers no window",
          "[http][adaptation]") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto report = [&](const char* limit) {
    adapt.observe(
        {weir::verdict::success, hints({{"RateLimit-Policy", fmt::format(R"("d";q={};w=1)", limit)},
                                        {"RateLimit", R"("d";r=5;t=1)"}})});
  };
  report("10");
  CHECK(adapt.state().ceiling->per_second == Approx(10));
  report("20");  // before: the ceiling stayed at 10, and the rate crept 2% per 100 successes
  CHECK(adapt.state().ceiling->per_second == Approx(20));
  for (int i = 0; i < 100; ++i) adapt.observe({weir::verdict::success, {}});
  CHECK(adapt.request_rate()->per_second > 0.95 * 20 * 0.97);
  report("10");  // a fall holds at once
  CHECK(adapt.request_rate()->per_second == Approx(10 * 0.97));

  // Anthropic's reset in whole seconds: a nearly full bucket says "+1 s" and would read as a
  // window 20 times too long, overriding the limit given.
  limits_type given(io.get_executor(), {.requests = weir::limit::per_minute(1200)});
  weir::http::server_adaptation<clock_type> anthropic(given);
  anthropic.observe({weir::verdict::success,
                     hints({{"anthropic-ratelimit-requests-limit", "1200"},
                            {"anthropic-ratelimit-requests-remaining", "1199"},
                            {"anthropic-ratelimit-requests-reset", "2026-11-28T12:00:01Z"}})});
  CHECK(anthropic.state().known->per_second == Approx(20));
}

TEST_CASE("a limit reported as a bare count is followed in proportion when the count changes",
          "[http][adaptation]") {
  // HAProxy (or a fixed window with no reset) says X-RateLimit-Limit and no period: the count
  // says nothing of the rate, but its change does. Before, a limit given as 12/s that fell to 6
  // was found by refusals alone: five decreases, 15-20 s (issue 30's "+change given").
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {.requests = weir::limit{weir::per_second(12), 1}});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto answer = [&](int count) {
    const auto sent = clock_type::now();
    clock_type::advance(100ms);
    adapt.observe({weir::verdict::success, hints({{"X-RateLimit-Limit", std::to_string(count)},
                                                  {"X-RateLimit-Remaining", "3"}})},
                  sent, clock_type::now());
  };
  answer(12);
  answer(12);
  CHECK(adapt.request_rate()->per_second == Approx(12 * 0.97));
  answer(6);  // one answer alone may be another server's: believed once a second one agrees
  CHECK(adapt.request_rate()->per_second == Approx(12 * 0.97));
  answer(6);
  CHECK(adapt.state().known->per_second == Approx(6));
  CHECK(adapt.request_rate()->per_second == Approx(6 * 0.97));
  answer(12);
  answer(12);  // restored: climbed back to by recovery, never above the limit the user gave
  CHECK(adapt.state().known->per_second == Approx(12));
  for (int i = 0; i < 40; ++i) answer(12);  // four seconds of answers
  CHECK(adapt.request_rate()->per_second >= 0.95 * 12 * 0.97);
  answer(24);
  answer(24);
  CHECK(adapt.state().known->per_second == Approx(12));
}

TEST_CASE("a bucket's whole-second resets read while it drains give its window within 3%",
          "[http][adaptation]") {
  // Anthropic-style: 68 requests per 10 s refilled continuously, the reset an RFC 3339 moment
  // rounded up to the second. Drained at 200/s from full, then paced under the limit, it never
  // drains again: what is read while it drains is all the client learns.
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const double limit = 68, per_second = 6.8;
  double level = limit;
  auto wall = noon + 300ms;  // the phase makes the reset read up to 0.7 s long
  for (int i = 0; i < 80 && level >= 1; ++i) {
    level = std::min(limit, level + per_second * 0.005) - 1;
    const double to_full = (limit - level) / per_second;
    const auto moment = std::chrono::ceil<std::chrono::seconds>(
        wall + std::chrono::duration_cast<sys::duration>(std::chrono::duration<double>(to_full)));
    const auto sent = clock_type::now();
    clock_type::advance(1ms);
    adapt.observe(
        {weir::verdict::success,
         hints({{"anthropic-ratelimit-requests-limit", "68"},
                {"anthropic-ratelimit-requests-remaining",
                 std::to_string(static_cast<int>(std::floor(level)))},
                {"anthropic-ratelimit-requests-reset",
                 fmt::format(
                     "2026-11-28T12:00:{:02}Z",
                     std::chrono::duration_cast<std::chrono::seconds>(moment - noon).count())}},
               wall)},
        sent, clock_type::now());
    clock_type::advance(4ms);
    wall += 5ms;
  }
  // Before, only the reads of ten seconds or more were taken: 6.57/s, 96.6% of the rate.
  REQUIRE(adapt.state().known);
  CHECK(adapt.state().known->per_second <= per_second);
  CHECK(adapt.state().known->per_second >= 0.97 * per_second);
}

TEST_CASE("a generous bucket's resets of a millisecond or two do not hold its pace down",
          "[http][adaptation]") {
  // A million requests a minute: one unit outstanding comes back in 60 us, which the server
  // writes as "1ms" (rounded up). Read as a window, that was 1 ms x 10^6 / 1 = 1 000 s: the pace
  // fell from 16 667/s to about 1 000/s (the gateway's benchmark saw 850/s against its mock).
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto report = [&](const char* remaining, const char* reset) {
    adapt.observe({weir::verdict::success, hints({{"x-ratelimit-limit-requests", "1000000"},
                                                  {"x-ratelimit-remaining-requests", remaining},
                                                  {"x-ratelimit-reset-requests", reset}})});
    clock_type::advance(10ms);
  };
  report("998000", "120ms");  // 2 000 out: a read to within 1%
  REQUIRE(adapt.state().known);
  CHECK(adapt.state().known->per_second == Approx(1e6 / 60));
  for (int i = 0; i < 100; ++i) report(i % 2 ? "999999" : "999998", i % 2 ? "1ms" : "2ms");
  CHECK(adapt.state().known->per_second == Approx(1e6 / 60));

  limits_type fresh(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> unread(fresh);
  unread.observe({weir::verdict::success, hints({{"x-ratelimit-limit-requests", "1000000"},
                                                 {"x-ratelimit-remaining-requests", "999999"},
                                                 {"x-ratelimit-reset-requests", "1ms"}})});
  CHECK_FALSE(unread.state().known);  // nothing read: the rate is still to be found
}

TEST_CASE("one answer that says remaining 0 for a day does not hold the pace down for good",
          "[http][adaptation]") {
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto report = [&](const char* remaining, const char* reset) {
    adapt.observe({weir::verdict::success, hints({{"x-ratelimit-limit-requests", "600"},
                                                  {"x-ratelimit-remaining-requests", remaining},
                                                  {"x-ratelimit-reset-requests", reset}})});
    clock_type::advance(100ms);
  };
  report("599", "100ms");
  CHECK(adapt.state().known->per_second == Approx(10));
  report("0", "24h");  // an outlier: a window of a day, 600 a day
  CHECK(adapt.state().known->per_second == Approx(600.0 / 86400));
  // Ordinary answers that follow contradict it: a day's window would have given back nothing.
  // Before, the sample with the most units outstanding was kept for good (0.007/s after 500).
  for (int i = 0; i < 500; ++i) report("599", "100ms");
  CHECK(adapt.state().known->per_second == Approx(10));
  CHECK(adapt.state().ceiling->per_second == Approx(10));
}

TEST_CASE("an unknown limit that doubles is found within seconds, as TCP CUBIC finds bandwidth",
          "[http][adaptation]") {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  strict_server server{std::chrono::duration_cast<ns>(1s / 10.0)};
  drive(limits, adapt, server, 40s, 40s, 50ms, 32);
  server.interval = std::chrono::duration_cast<ns>(1s / 20.0);
  // Counted from 6 s after the change to 10 s after it.
  const auto seen = drive(limits, adapt, server, 10s, 6s, 50ms, 32);
  INFO(seen.served << " served, " << seen.refused << " refused, 6–10 s after the limit doubled");
  CHECK(seen.served >= 0.8 * 20 * 4);
  CHECK(seen.refused <= 0.1 * (seen.served + seen.refused));
}

TEST_CASE("an unknown slow limit that fell and came back is probed for within seconds",
          "[http][adaptation]") {
  // Before: the pace came back to the hold point at a twentieth of the gap per success, and a
  // probe waited for sixteen successes there: a limit restored from 2/s to 4/s was still paced
  // at 2/s ten seconds later (issue 30's "+change discovered").
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  strict_server server{std::chrono::duration_cast<ns>(1s / 4.0)};
  drive(limits, adapt, server, 60s, 60s, 50ms, 8);
  server.interval = std::chrono::duration_cast<ns>(1s / 2.0);
  drive(limits, adapt, server, 30s, 30s, 50ms, 8);
  REQUIRE(adapt.state().ceiling->per_second < 3);
  server.interval = std::chrono::duration_cast<ns>(1s / 4.0);
  // Issue 30's property: followed (paced at 80% of it at least) within 10 s.
  const auto seen = drive(limits, adapt, server, 10s, 0s, 50ms, 8);
  INFO(seen.served << " served, " << seen.refused << " refused in the 10 s after it came back");
  CHECK(adapt.state().rate.per_second >= 0.8 * 4);
  CHECK(seen.refused <= 0.1 * (seen.served + seen.refused));
}

namespace {
// A strict server whose requests arrive up to `jitter` late, at random, as over a real network:
// two requests sent one interval apart may arrive closer than that.
struct jittery_strict_server {
  strict_server inner;
  ns jitter;
  std::mt19937_64 rng{7};

  weir::classification answer(clock_type::time_point t) {
    return inner.answer(t + std::uniform_int_distribution<ns::rep>(0, jitter.count())(rng) * 1ns);
  }
};
}  // namespace

TEST_CASE("told a strict limit, network jitter costs a step of headroom, not a tenth of the rate",
          "[http][adaptation]") {
  clock_type::reset();
  asio::io_context io;
  const double limit = 19;
  limits_type limits(io.get_executor(), {.requests = weir::limit::per_minute(limit * 60)});
  weir::http::server_adaptation<clock_type> adapt(limits);
  jittery_strict_server server{{std::chrono::duration_cast<ns>(1s / limit)}, 2ms};
  const auto seen = drive(limits, adapt, server, 120s, 20s, 250ms, 48);
  INFO(seen.served << " served, " << seen.refused << " refused over 100 s");
  CHECK(seen.served >= 0.95 * limit * 100);
  CHECK(seen.refused <= 0.01 * (seen.served + seen.refused));
}

namespace {
// HAProxy's `sc_http_req_rate(0) gt N` over a one-second period: every request counts, refused
// or not, and the rate is this period's count plus the last one's, weighted by what is left of
// this one. A refusal says Retry-After 1 and nothing left, so the client pauses a second.
struct sliding_window_server {
  int limit;
  std::int64_t period = -2, current = 0, previous = 0;

  weir::classification answer(clock_type::time_point t) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch());
    const auto index = ms.count() / 1000;
    if (index != period) {
      previous = index == period + 1 ? current : 0;
      current = 0;
      period = index;
    }
    const auto rate = ++current + previous * (1000 - ms.count() % 1000) / 1000;
    const bool ok = rate <= limit;
    std::vector<std::pair<std::string, std::string>> headers = {
        {"X-RateLimit-Limit", std::to_string(limit)},
        {"X-RateLimit-Remaining", std::to_string(ok ? limit - rate : 0)}};
    if (!ok) headers.emplace_back("Retry-After", "1");
    return weir::http::judge_status(ok ? 200 : 429, headers, {}, {});
  }
};

struct discovery {
  counts seen;                     // what the server decided from 10 s on
  weir::http::pacing_state state;  // what the adaptation believed at the end
};

// An adaptation told nothing, against `server` for `length`.
template <class Server>
discovery told_nothing(Server server, ns length, ns rtt, std::size_t in_flight) {
  clock_type::reset();
  asio::io_context io;
  limits_type limits(io.get_executor(), {});
  weir::http::server_adaptation<clock_type> adapt(limits);
  const auto seen = drive(limits, adapt, server, length, 10s, rtt, in_flight);
  return {seen, adapt.state()};
}
}  // namespace

TEST_CASE("an unknown sliding-window limit that pauses each refusal a second is held under",
          "[http][adaptation]") {
  // Before: after a refusal's one-second pause, the pace came back at the rate it was refused
  // at, above the limit, and the window refused it again within a second: the ceiling fell by a
  // few percent per refusal, and a refused probe was not taken as one. 80% of a real HAProxy's
  // limit (benchmarks/goodput), 77-93% here (now 91-98%). Now the ceiling is what the window saw.
  for (int limit : {20, 40}) {
    for (std::size_t in_flight : {8u, 32u}) {
      const auto seen = told_nothing(sliding_window_server{limit}, 70s, 20ms, in_flight).seen;
      INFO(limit << "/s, " << in_flight << " in flight: " << seen.served << " served, "
                 << seen.refused << " refused after 10 s");
      CHECK(seen.served >= 0.9 * limit * 60);
      CHECK(seen.refused <= 0.03 * (seen.served + seen.refused));
    }
  }
}

namespace {
// nginx's `limit_req` with `burst=B nodelay`: a leaky bucket of B requests over the rate, in
// whole milliseconds as nginx keeps it, that answers at once; a refusal costs it nothing.
struct nodelay_server {
  double per_second;
  double burst;
  double excess = 0;          // requests over the rate, as nginx's `excess` (in requests)
  std::int64_t last_ms = -1;  // the last admission, in whole milliseconds; none yet

  weir::classification answer(clock_type::time_point t) {
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
    const double now_excess =
        last_ms < 0
            ? 1
            : std::max(0.0, excess - per_second * static_cast<double>(ms - last_ms) / 1000) + 1;
    if (now_excess > burst + 1) return {weir::verdict::rate_limited, {.retry_after = 1s}};
    excess = now_excess;
    last_ms = ms;
    return {weir::verdict::success, {}};
  }
};
}  // namespace

TEST_CASE("told nothing, a limit with a burst that slow start overshoots is held with few refusals",
          "[http][adaptation]") {
  // Slow start runs through nginx's burst (burst=10 nodelay) to twice the limit. Before, the
  // refusals that ended it were as large a share of the answers after the decrease as before
  // (the burst refills), which the decrease's verdict read as noise: undone, back into slow
  // start, again. A real nginx answered 8% of requests with 429s (benchmarks/goodput, 8 in
  // flight; 0.5% before such verdicts existed); this model 5% at 32 in flight (now 2%).
  for (double limit : {20.0, 50.0}) {
    for (std::size_t in_flight : {8u, 32u}) {
      const auto seen = told_nothing(nodelay_server{limit, 10}, 30s, 2ms, in_flight).seen;
      INFO(limit << "/s, " << in_flight << " in flight: " << seen.served << " served, "
                 << seen.refused << " refused after 10 s");
      CHECK(seen.served >= 0.9 * limit * 20);
      CHECK(seen.refused <= 0.03 * (seen.served + seen.refused));
    }
  }
}

TEST_CASE("told nothing, a sliding second that reports its count is paced as if it were given",
          "[http][adaptation]") {
  // HAProxy's X-RateLimit-Limit has no window. Before, each refusal paused the client a second
  // and the ceiling came down by what each window counted (31, 27, 25, 23, 21 per second for a
  // limit of 20): 83-90% of a real HAProxy's limit (benchmarks/goodput), 84% here at 20/s with
  // 8 in flight. Now a count that refused a client that alone sent that many over the last
  // 0.5-1.5 s is read per second.
  for (int limit : {20, 40, 100}) {
    for (std::size_t in_flight : {8u, 32u}) {
      const auto [seen, state] = told_nothing(sliding_window_server{limit}, 30s, 2ms, in_flight);
      INFO(limit << "/s, " << in_flight << " in flight: " << seen.served << " served, "
                 << seen.refused << " refused after 10 s");
      CHECK(seen.served >= 0.95 * limit * 20);
      CHECK(seen.refused <= 0.01 * (seen.served + seen.refused));
      REQUIRE(state.known);
      CHECK(state.known->per_second == Approx(limit));
    }
  }
}

TEST_CASE("clients that each hear a whole limit they share pace at their part of it",
          "[http][adaptation]") {
  // A fixed window of 20 a second, reported with its window, that `others` + 1 clients spend
  // alike: between two of this client's answers, `remaining` falls by one for each of them.
  const auto paced = [](int others) {
    asio::io_context io;
    limits_type limits(io.get_executor(), {});
    weir::http::server_adaptation<clock_type> adapt(limits);
    int used = 0;
    for (int answer = 0; answer < 200; ++answer) {
      if (answer % 10 == 0) used = 0;  // ten answers a second: a new window
      used += 1 + others;
      const auto remaining = std::to_string(std::max(0, 20 - used));
      adapt.observe({weir::verdict::success,
                     hints({{"RateLimit-Policy", R"("d";q=20;w=1)"},
                            {"RateLimit", fmt::format(R"("d";r={};t=1)", remaining)}})});
      clock_type::advance(100ms);
    }
    return adapt.request_rate()->per_second;
  };
  // Alone, the whole limit under its headroom; with one other, half of it: before, each of two
  // paced at all of it, and the window's refusals had to bring them down.
  CHECK(paced(0) == Approx(20 * 0.97));
  CHECK(paced(1) == Approx(10 * 0.97).epsilon(0.05));
}
