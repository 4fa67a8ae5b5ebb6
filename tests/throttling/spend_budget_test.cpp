#include "../support/admission.hpp"

using budget = weir::spend_budget<clock_type>;

namespace {
// The manual clock's epoch read as the Unix epoch, as the budget reads it.
clock_type::time_point at(std::chrono::sys_seconds t) {
  return clock_type::time_point(
      std::chrono::duration_cast<clock_type::duration>(t.time_since_epoch()));
}
std::chrono::sys_seconds utc(int y, unsigned m, unsigned d, int h = 0) {
  using namespace std::chrono;
  return sys_days{year{y} / month{m} / day{d}} + hours{h};
}
const weir::exception* over_budget(const std::function<void()>& f) {
  static std::optional<weir::exception> kept;
  try {
    f();
  } catch (const weir::exception& e) {
    kept.emplace(e);
    return &*kept;
  }
  return nullptr;
}
}  // namespace

TEST_CASE("a daily budget reserves, settles, and refuses what would pass it until midnight",
          "[budget]") {
  clock_type::set(at(utc(2026, 11, 30, 16)));
  budget daily({.name = "daily", .limit = 1.00, .window = weir::budget_window::daily()});
  auto first = daily.reserve("", 0.60);
  CHECK_FALSE(daily.fits("", 0.50));  // 0.60 is held while the call is in flight
  first.settle(0.30);                 // it cost less
  CHECK(daily.fits("", 0.70));
  CHECK_FALSE(daily.fits("", 0.71));
  const auto* refusal = over_budget([&] { daily.reserve("", 0.80); });
  REQUIRE(refusal);
  CHECK(refusal->code() == weir::error::over_budget);
  CHECK(refusal->refused_locally());
  CHECK(refusal->retry_after() == std::chrono::hours(8));  // midnight UTC
  CHECK_THAT(refusal->what(), Catch::Matchers::Contains("daily") &&
                                  Catch::Matchers::Contains("room again in 28800 s"));
  const auto* never = over_budget([&] { daily.reserve("", 1.50); });
  REQUIRE(never);
  CHECK_FALSE(never->retry_after());
  CHECK_THAT(never->what(), Catch::Matchers::Contains("never fits"));

  clock_type::set(at(utc(2026, 12, 1)));
  CHECK(daily.fits("", 1.00));
  const auto s = daily.status();
  REQUIRE(s.size() == 1);
  CHECK(s[0].spent == 0);
  CHECK(s[0].resets_in == std::chrono::hours(24));
}

TEST_CASE("an hourly and a monthly budget reset on the calendar, in UTC", "[budget]") {
  clock_type::set(at(utc(2027, 1, 31, 23)));
  budget monthly({.limit = 10, .window = weir::budget_window::monthly()});
  budget hourly({.limit = 1, .window = weir::budget_window::hourly()});
  monthly.reserve("", 10).settle(10);
  hourly.reserve("", 1).settle(1);
  CHECK(monthly.room_in("", 1) == std::chrono::hours(1));
  clock_type::advance(std::chrono::minutes(59));
  CHECK_FALSE(monthly.fits("", 1));
  CHECK_FALSE(hourly.fits("", 1));
  clock_type::advance(std::chrono::minutes(1));  // February 1st, 00:00
  CHECK(monthly.fits("", 10));
  CHECK(hourly.fits("", 1));
  monthly.reserve("", 4).settle(4);
  CHECK(monthly.room_in("", 7) == std::chrono::days(28));  // to March 1st
}

TEST_CASE("a rolling budget forgets spend only once the whole window has passed", "[budget]") {
  budget rolling({.limit = 1, .window = weir::budget_window::rolling(std::chrono::hours(1))});
  rolling.reserve("", 0.7).settle(0.7);
  clock_type::advance(std::chrono::minutes(30));
  rolling.reserve("", 0.3).settle(0.3);
  CHECK_FALSE(rolling.fits("", 0.5));
  const auto wait = rolling.room_in("", 0.5);
  REQUIRE(wait);
  // The first 0.7 leaves between 60 and 61 minutes after it was spent.
  CHECK(*wait > std::chrono::minutes(30));
  CHECK(*wait <= std::chrono::minutes(31));
  clock_type::advance(std::chrono::minutes(29));
  CHECK_FALSE(rolling.fits("", 0.5));
  clock_type::advance(*wait - std::chrono::minutes(29));
  CHECK(rolling.fits("", 0.7));
  CHECK_FALSE(rolling.fits("", 0.71));
}

TEST_CASE("per-tenant limits, and alerts at each threshold once per window", "[budget]") {
  clock_type::set(at(utc(2026, 11, 30, 12)));
  std::vector<std::string> alerts;
  budget tenants({.name = "tenants",
                  .limit = 1,
                  .limit_of = [](std::string_view t) { return t == "big" ? 10.0 : 1.0; },
                  .per = weir::budget_scope::tenant,
                  .watch = [&](const weir::event& e) { alerts.push_back(fmt::format("{}", e)); }});
  tenants.reserve("small", 0.4).settle(0.4);
  CHECK(alerts.empty());
  tenants.reserve("small", 0.2).settle(0.2);
  tenants.reserve("small", 0.3).settle(0.3);
  tenants.reserve("big", 0.9).settle(0.9);
  CHECK(alerts ==
        std::vector<std::string>{"budget tenants for small: $0.6000 of $1.00 spent (50%)",
                                 "budget tenants for small: $0.9000 of $1.00 spent (80%)"});
  tenants.reserve("small", 0.1).settle(0.1);
  CHECK(alerts.size() == 3);
  CHECK(alerts.back() == "budget tenants for small: $1.0000 of $1.00 spent (100%)");
  CHECK_FALSE(tenants.fits("small", 0.01));
  CHECK(tenants.fits("big", 9.1));
  clock_type::advance(std::chrono::hours(12));
  tenants.reserve("small", 0.5).settle(0.5);
  CHECK(alerts.size() == 4);  // a new day: armed again

  std::string page;
  weir::write_prometheus(page, tenants.status());
  CHECK_THAT(page, Catch::Matchers::Contains(
                       "weir_budget_spent_usd{budget=\"tenants\",key=\"small\"} 0.5"));
  CHECK_THAT(page,
             Catch::Matchers::Contains("weir_budget_limit_usd{budget=\"tenants\",key=\"big\"} 10"));
}

TEST_CASE("a budget's options are checked", "[budget]") {
  auto invalid = [](weir::spend_budget_options o) {
    try {
      budget b(std::move(o));
    } catch (const weir::exception& e) {
      return e.code() == weir::error::invalid_argument;
    }
    return false;
  };
  CHECK(invalid({.limit = -1}));
  CHECK(invalid({.limit = std::nan("")}));
  CHECK(
      invalid({.limit = 1, .window = weir::budget_window::rolling(std::chrono::nanoseconds(10))}));
  CHECK(invalid({.limit = 1, .alert_at = {0.5, -1}}));
  budget ok({.limit = 1});
  CHECK_THROWS_AS(ok.reserve("", -0.5), weir::exception);
}

TEST_CASE("an agent in a loop cannot spend past its budget, however many run at once", "[budget]") {
  // 64 agents loop on calls estimated at 1000 input and up to 500 output tokens; each call takes
  // 10 to 200 ms of virtual time and reports between 100 and 500 output tokens. They stop at the
  // first refusal. Whatever the interleaving, the settled spend stays within the budget.
  for (unsigned seed : {1u, 2u, 3u}) {
    clock_type::set(at(utc(2026, 11, 30, 9)));
    asio::io_context io;
    budget tenants({.name = "tenants", .limit = 0.05, .per = weir::budget_scope::tenant});
    const weir::price gpt{.input_per_million = 2.5, .output_per_million = 10};  // $0.0075 max/call
    auto guarded = weir::pipeline(tenants.stage(gpt));
    std::mt19937 random(seed);
    double billed = 0;
    int refused = 0, calls = 0;
    auto agent = [&]() -> asio::awaitable<void> {
      for (;;) {
        weir::basic_call_context<clock_type> ctx{
            .input_tokens = 1000, .output_tokens = 500, .tenant = "runaway"};
        const auto took = std::chrono::milliseconds(10 + random() % 190);
        const auto output = 100 + random() % 401;
        try {
          co_await guarded(ctx, [&]() -> asio::awaitable<int> {
            asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor, took);
            co_await t.async_wait(asio::use_awaitable);
            ctx.actual_input_tokens = 1000;
            ctx.actual_output_tokens = output;
            billed += gpt.of(1000, output);
            ++calls;
            co_return 0;
          });
        } catch (const weir::exception& e) {
          CHECK(e.code() == weir::error::over_budget);
          ++refused;
          co_return;
        }
      }
    };
    for (int i = 0; i < 64; ++i) asio::co_spawn(io, agent(), asio::detached);
    advance<clock_type>(io, std::chrono::seconds(10));
    CHECK(refused == 64);
    CHECK(calls >= 6);
    CHECK(billed <= 0.05 + 1e-12);
    const auto s = tenants.status();
    REQUIRE(s.size() == 1);
    CHECK(s[0].spent == Approx(billed));
    CHECK(s[0].reserved == Approx(0).margin(1e-12));
  }
}

TEST_CASE("a budget stage releases what an inner refusal never sent and charges a cancelled call",
          "[budget]") {
  clock_type::set(at(utc(2026, 11, 30, 9)));
  asio::io_context io;
  budget overall({.limit = 1});
  weir::request_queue full(io.get_executor(), {.max_concurrent = 1, .max_queued = 0});
  auto held = full.try_admit();
  auto guarded = weir::pipeline(overall.stage({.input_per_million = 1e6}), full);
  weir::basic_call_context<clock_type> ctx{.input_tokens = 1};  // $1
  weir_test::finished<int> refused;
  refused.start(io, guarded(ctx, [] { return []() -> asio::awaitable<int> { co_return 1; }(); }));
  run_ready(io);
  CHECK(refused.code() == weir::error::queue_full);
  CHECK(overall.fits("", 1));  // released: the call was never sent
  held.release();

  asio::cancellation_signal cancel;
  weir_test::finished<int> cancelled;
  cancelled.start(io, guarded(ctx, [] { return weir_test::slow_answer<clock_type>(1s); }),
                  cancel.slot());
  run_ready(io);
  cancel.emit(asio::cancellation_type::terminal);
  run_ready(io);
  CHECK(cancelled.done);
  CHECK_FALSE(overall.fits("", 0.01));  // charged: it may have been sent
}

namespace {
// The fake provider's classifier for its responses, the default one for anything else.
struct by_status {
  template <class T>
  weir::classification operator()(const weir::outcome<T>& o) const {
    if constexpr (std::is_same_v<T, weir::testing::fake_response>)
      return weir::testing::fake_classifier{}(o);
    else
      return weir::default_classifier{}(o);
  }
};

// Anthropic's rates for a $3 model: reads $0.30, 5-minute writes $3.75 per million.
const weir::price sonnet{.input_per_million = 3,
                         .output_per_million = 15,
                         .cached_input_per_million = 0.3,
                         .cache_write_per_million = 3.75};

asio::awaitable<weir::testing::fake_response> answer_with(unsigned status) {
  weir::testing::fake_response r;
  r.status = status;
  co_return r;
}
}  // namespace

TEST_CASE("a budget stage charges as the router does: usage, else the estimate for a success",
          "[budget]") {
  clock_type::set(at(utc(2026, 11, 30, 9)));
  asio::io_context io;
  budget overall({.limit = 10});
  auto guarded = weir::pipeline(weir::basic_pipeline_options<by_status>{},
                                overall.stage({.input_per_million = 1e6}));
  const auto call = [&](unsigned status, std::optional<std::uint64_t> used) {
    weir::basic_call_context<clock_type> ctx{.input_tokens = 1};  // $1 estimated
    if (used) ctx.actual_input_tokens = *used;
    weir_test::finished<weir::testing::fake_response> f;
    f.start(io, guarded(ctx, [status] { return answer_with(status); }));
    run_ready(io);
    return overall.status().at(0).spent;
  };
  CHECK(call(200, std::nullopt) == Approx(1));  // a success that reports nothing: the estimate
  CHECK(call(200, 3) == Approx(4));             // what it reported
  CHECK(call(500, std::nullopt) == Approx(4));  // a failure that reports nothing: nothing
  CHECK(call(500, 2) == Approx(6));             // a failure that reports usage: that
  CHECK(overall.status().at(0).reserved == Approx(0));
}

TEST_CASE(
    "a success that reports nothing is charged its estimate at the list price, not the "
    "reservation's cache-write price",
    "[budget][cache]") {
  clock_type::set(at(utc(2026, 11, 30, 9)));
  asio::io_context io;
  budget overall({.limit = 10});
  // Reserved at the dearer cache-write rate ($1.25), charged at the input rate ($1), as the
  // router charges it (settle_spend).
  auto guarded =
      weir::pipeline(overall.stage({.input_per_million = 1e6, .cache_write_per_million = 1.25e6}));
  weir::basic_call_context<clock_type> ctx{.input_tokens = 1};
  weir_test::finished<int> f;
  f.start(io, guarded(ctx, []() -> asio::awaitable<int> { co_return 1; }));
  run_ready(io);
  CHECK(overall.status().at(0).spent == Approx(1));
  CHECK(overall.status().at(0).reserved == Approx(0));
}

TEST_CASE("a budget stage charges cache reads and writes at their own prices", "[budget][cache]") {
  clock_type::set(at(utc(2026, 11, 30, 9)));
  asio::io_context io;
  budget overall({.limit = 100});
  auto guarded = weir::pipeline(overall.stage(sonnet));
  const auto call = [&](std::uint64_t read, std::uint64_t written) {
    const double before = overall.status().empty() ? 0 : overall.status().at(0).spent;
    weir::basic_call_context<clock_type> ctx{.input_tokens = 1'000'000, .output_tokens = 0};
    weir_test::finished<int> f;
    f.start(io, guarded(ctx, [&]() -> asio::awaitable<int> {
              ctx.actual_input_tokens = 1'000'000;
              ctx.actual_output_tokens = 0;
              if (read) ctx.actual_cache_read_tokens = read;
              if (written) ctx.actual_cache_write_tokens = written;
              co_return 0;
            }));
    run_ready(io);
    return overall.status().at(0).spent - before;
  };
  CHECK(call(0, 0) == Approx(3.0));               // a million fresh input tokens
  CHECK(call(900'000, 0) == Approx(0.3 + 0.27));  // 100k fresh, 900k read
  CHECK(call(0, 1'000'000) == Approx(3.75));      // all written
  CHECK(call(500'000, 500'000) == Approx(0.15 + 1.875));
  // Without cache prices, cached tokens cost the input price: never under-charged.
  CHECK(weir::price{.input_per_million = 3}.of(weir::token_usage{
            .input_tokens = 1'000'000, .cache_read_tokens = 900'000}) == Approx(3.0));
}

TEST_CASE("a budget is never passed by calls that write their whole prompt to the cache",
          "[budget][cache]") {
  clock_type::set(at(utc(2026, 11, 30, 9)));
  asio::io_context io;
  // Room for three calls at the input price ($3 each), but each writes its million tokens to
  // the cache at $3.75: reserved at the input price, all three went in and spent $11.25.
  budget overall({.limit = 9.5});
  auto guarded = weir::pipeline(overall.stage(sonnet));
  // Three calls in flight at once: each reserves before any settles.
  std::vector<std::unique_ptr<weir::basic_call_context<clock_type>>> calls;
  std::vector<std::unique_ptr<weir_test::finished<int>>> results;
  asio::steady_timer gate(io, std::chrono::steady_clock::time_point::max());
  for (int i = 0; i < 3; ++i) {
    calls.push_back(std::make_unique<weir::basic_call_context<clock_type>>(
        weir::basic_call_context<clock_type>{.input_tokens = 1'000'000, .output_tokens = 0}));
    results.push_back(std::make_unique<weir_test::finished<int>>());
    auto& ctx = *calls.back();
    results.back()->start(io, guarded(ctx, [&]() -> asio::awaitable<int> {
                            co_await gate.async_wait(asio::as_tuple(asio::use_awaitable));
                            ctx.actual_input_tokens = 1'000'000;
                            ctx.actual_output_tokens = 0;
                            ctx.actual_cache_write_tokens = 1'000'000;
                            co_return 0;
                          }));
  }
  run_ready(io);
  gate.cancel();
  run_ready(io);
  int answered = 0;
  for (auto& r : results) answered += r->value ? 1 : 0;
  CHECK(answered == 2);
  CHECK(overall.status().at(0).spent == Approx(7.5));
  CHECK(overall.status().at(0).spent <= 9.5);
}

TEST_CASE("four threads reserving from one budget never pass it together",
          "[budget][concurrency]") {
  budget shared({.limit = 1.0, .per = weir::budget_scope::tenant});
  std::atomic<int> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 2'000; ++i) {
        auto r = shared.try_reserve("acme", 0.001);
        if (!r) continue;
        ++admitted;
        if (i % 2) r->settle(0.001);  // the others settle their estimate when destroyed
      }
    });
  for (auto& t : threads) t.join();
  CHECK(admitted.load() == 1000);
  const auto s = shared.status();
  REQUIRE(s.size() == 1);
  CHECK(s[0].spent <= 1.0 + 1e-9);
  CHECK(s[0].reserved == Approx(0).margin(1e-9));
}

TEST_CASE("a fair queue shared by four threads admits each request exactly once",
          "[request_queue][concurrency]") {
  asio::io_context io(4);
  weir::request_queue queue(
      io.get_executor(), {.max_concurrent = 3, .max_queued = 10'000, .fair_between_tenants = true});
  std::atomic<int> admitted{0}, refused{0};
  const std::array<std::string, 5> tenants{"a", "b", "c", "d", "e"};
  for (int i = 0; i < 2'000; ++i)
    asio::post(io, [&, i] {
      queue.async_admit(weir::priority::normal, tenants[static_cast<std::size_t>(i) % 5],
                        [&](weir::error_code ec, weir::permit p) {
                          if (ec) return void(++refused);
                          ++admitted;
                          p.release();
                        });
    });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(admitted.load() == 2'000);
  CHECK(refused.load() == 0);
  CHECK(queue.in_flight() == 0);
  CHECK(queue.queued() == 0);
}

TEST_CASE("keyed waits from four threads, some cancelled, leave each key exact",
          "[keyed][concurrency]") {
  asio::io_context io(4);
  weir::keyed_limiter<> limits(io.get_executor(),
                               {.limit = {.rate = weir::per_second(2'000), .burst = 5}});
  std::atomic<int> admitted{0}, aborted{0};
  // A wait and its cancellation run on one strand (a cancellation slot is not thread-safe);
  // the four strands run on four threads.
  std::vector<asio::strand<asio::io_context::executor_type>> strands;
  for (int k = 0; k < 4; ++k) strands.push_back(asio::make_strand(io));
  std::vector<std::unique_ptr<asio::cancellation_signal>> signals;
  for (int i = 0; i < 400; ++i) signals.push_back(std::make_unique<asio::cancellation_signal>());
  for (int i = 0; i < 400; ++i) {
    auto& strand = strands[static_cast<std::size_t>(i % 4)];
    auto& signal = *signals[static_cast<std::size_t>(i)];
    asio::post(strand, [&, i] {
      limits.async_acquire(
          fmt::format("k{}", i % 4), 1,
          asio::bind_cancellation_slot(
              signal.slot(),
              asio::bind_executor(strand, [&](weir::error_code ec, std::chrono::nanoseconds) {
                (ec ? aborted : admitted)++;
              })));
      if (i % 3 == 0) asio::post(strand, [&] { signal.emit(asio::cancellation_type::terminal); });
    });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(admitted.load() + aborted.load() == 400);
  CHECK(admitted.load() >= 400 - 134);
}
