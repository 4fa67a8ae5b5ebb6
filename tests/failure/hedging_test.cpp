// Specifications of weir/failure/hedging.hpp, on virtual time.
#include "../support/common.hpp"
#include "../support/composition.hpp"

#include <atomic>
#include <random>
#include <thread>

namespace {
using hedging_type = weir::hedging<clock_type>;

// A call that takes `d` and answers `v`; when cancelled, it says so in `aborted`.
asio::awaitable<int> takes(ns d, int v, int* aborted = nullptr) {
  asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor,
                                           std::chrono::duration_cast<clock_type::duration>(d));
  auto [ec] = co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  if (ec) {
    if (aborted) ++*aborted;
    throw boost::system::system_error(ec);
  }
  co_return v;
}
asio::awaitable<int> fails_after(ns d) {
  co_await takes(d, 0);
  throw boost::system::system_error(asio::error::connection_reset);
}

struct timed {
  std::optional<int> value;
  std::exception_ptr error;
  std::optional<ns> took;
};
template <class Awaitable>
timed run_timed(asio::io_context& io, Awaitable a, ns time = 1min) {
  timed t;
  const auto start = clock_type::now();
  asio::co_spawn(io, std::move(a), [&](std::exception_ptr e, int v) {
    t.took = clock_type::now() - start;
    if (e)
      t.error = e;
    else
      t.value = v;
  });
  advance<clock_type>(io, time);
  return t;
}
}  // namespace

TEST_CASE("a slow call is hedged after the delay; the first answer wins and the other is cancelled",
          "[hedging]") {
  asio::io_context io;
  std::vector<std::string> seen;
  hedging_type hedge({.delay = 1s, .operation = "chat", .watch = [&](const weir::event& e) {
                        seen.push_back(fmt::format("{}", e));
                      }});
  int aborted = 0;
  auto t = run_timed(io, hedge([&](unsigned attempt) {
                       return attempt == 0 ? takes(5s, 1, &aborted) : takes(100ms, 2, &aborted);
                     }));
  REQUIRE(t.value);
  CHECK(*t.value == 2);  // the hedge's
  CHECK(*t.took == 1100ms);
  CHECK(aborted == 1);  // the first attempt, cancelled and waited for
  CHECK(seen == std::vector<std::string>{"chat: hedge 1 after 1000.0 ms by hedging"});
  CHECK(hedge.hedges_in_flight() == 0);

  // A call that answers before the delay is never hedged.
  auto fast =
      run_timed(io, hedge([&](unsigned attempt) { return takes(300ms, int(attempt), nullptr); }));
  CHECK(fast.value == 0);
  CHECK(*fast.took == 300ms);
  CHECK(seen.size() == 1);
}

TEST_CASE("a failure hedges at once; when every attempt fails the call fails as the last did",
          "[hedging]") {
  asio::io_context io;
  hedging_type hedge({.delay = 1s, .max_hedges = 2});
  auto recovered = run_timed(io, hedge([&](unsigned attempt) {
                               return attempt == 0 ? fails_after(10ms) : takes(100ms, 7);
                             }));
  CHECK(recovered.value == 7);
  CHECK(*recovered.took == 110ms);  // the hedge started at the failure, not after the delay

  int calls = 0;
  auto hopeless = run_timed(io, hedge([&] {
                              ++calls;
                              return fails_after(10ms);
                            }));
  REQUIRE(hopeless.error);
  CHECK(calls == 3);  // the first and two hedges
  CHECK(*hopeless.took == 30ms);
}

TEST_CASE("hedges are bounded: in flight across calls, and by a budget's share of calls",
          "[hedging]") {
  asio::io_context io;
  hedging_type one_at_a_time({.delay = 100ms, .max_in_flight = 1});
  std::vector<timed> ends(2);
  int hedges = 0;
  for (auto& t : ends)
    asio::co_spawn(io, one_at_a_time([&](unsigned attempt) {
                     hedges += attempt > 0;
                     return takes(attempt == 0 ? 1s : 10ms, 1);
                   }),
                   [&t](std::exception_ptr, int v) { t.value = v; });
  advance<clock_type>(io, 5s);
  CHECK(hedges == 1);  // the second call's hedge found no room
  CHECK(ends[0].value == 1);
  CHECK(ends[1].value == 1);

  // A budget with nothing in reserve and no share: never a hedge.
  hedging_type none(
      {.delay = 100ms, .budget = weir::retry_budget({.ratio = 0, .reserve = 0, .capacity = 0})});
  int none_hedges = 0;
  auto t = run_timed(io, none([&](unsigned attempt) {
                       none_hedges += attempt > 0;
                       return takes(1s, 1);
                     }));
  CHECK(t.value == 1);
  CHECK(none_hedges == 0);
}

TEST_CASE("in a pipeline each attempt runs the policies after the hedge: its own queue slot",
          "[hedging][pipeline]") {
  asio::io_context io;
  hedging_type hedge({.delay = 1s});
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 4, .max_queued = 4});
  int calls = 0, aborted = 0;
  auto guarded = weir::pipeline(hedge, queue);
  std::optional<int> value;
  asio::co_spawn(io, guarded([&] {
                   ++calls;
                   return calls == 1 ? takes(10s, 1, &aborted) : takes(100ms, 2, &aborted);
                 }),
                 [&](std::exception_ptr, int v) { value = v; });
  advance<clock_type>(io, 1050ms);
  CHECK(queue.in_flight() == 2);  // the first attempt and the hedge
  advance<clock_type>(io, 1s);
  CHECK(value == 2);
  CHECK(aborted == 1);
  CHECK(queue.in_flight() == 0);  // the loser's slot came back with the call
}

TEST_CASE("a cancelled call cancels every attempt and waits for them", "[hedging]") {
  asio::io_context io;
  hedging_type hedge({.delay = 100ms});
  int aborted = 0;
  asio::cancellation_signal cancel;
  weir_test::finished<int> f;
  f.start(io, hedge([&](unsigned) { return takes(10s, 1, &aborted); }), cancel.slot());
  advance<clock_type>(io, 500ms);  // the first attempt and its hedge run
  cancel.emit(asio::cancellation_type::terminal);
  run_ready(io);
  REQUIRE(f.done);
  CHECK(f.code() == asio::error::operation_aborted);
  CHECK(aborted == 2);
  CHECK(hedge.hedges_in_flight() == 0);
}

TEST_CASE("used alone, a deadline before the delay sends no hedge and ends the call then (timeout)",
          "[hedging][issue36]") {
  asio::io_context io;
  hedging_type hedge({.delay = 1s});
  int calls = 0, aborted = 0;
  context ctx{.deadline = clock_type::now() + 300ms};
  weir_test::finished<int> f;
  f.start(io, hedge(ctx, [&](unsigned) {
            ++calls;
            return takes(10s, 1, &aborted);
          }));
  advance<clock_type>(io, 300ms - 1ns);
  CHECK_FALSE(f.done);
  advance<clock_type>(io, 1ns);
  REQUIRE(f.done);
  CHECK(f.code() == weir::error::timeout);
  CHECK(aborted == 1);  // the first attempt, cancelled and waited for
  advance<clock_type>(io, 5s);
  CHECK(calls == 1);
  CHECK(hedge.hedges_in_flight() == 0);
}

TEST_CASE("used alone, a failure at the deadline starts no hedge; timeout, the failure its cause",
          "[hedging][issue36]") {
  asio::io_context io;
  hedging_type hedge({.delay = 1s, .max_hedges = 2});
  int calls = 0;
  context ctx{.deadline = clock_type::now() + 300ms};
  weir_test::finished<int> f;
  // The first attempt fails at 100 ms and is hedged at once; the hedge fails at the deadline.
  f.start(io, hedge(ctx, [&](unsigned attempt) {
            ++calls;
            return fails_after(attempt == 0 ? 100ms : 200ms);
          }));
  advance<clock_type>(io, 300ms);
  REQUIRE(f.done);
  CHECK(f.code() == weir::error::timeout);
  REQUIRE(f.weir_error());
  CHECK(f.weir_error()->cause());
  advance<clock_type>(io, 5s);
  CHECK(calls == 2);
}

TEST_CASE("used alone, a deadline already passed sends nothing (timeout, a local refusal)",
          "[hedging][issue36]") {
  asio::io_context io;
  hedging_type hedge({.delay = 100ms});
  int calls = 0;
  context ctx{.deadline = clock_type::now()};
  weir_test::finished<int> f;
  f.start(io, hedge(ctx, [&](unsigned) {
            ++calls;
            return takes(1s, 1);
          }));
  run_ready(io);
  REQUIRE(f.done);
  CHECK(f.code() == weir::error::timeout);
  CHECK(weir::outcome<int>::from_exception(f.error).refused_locally());
  advance<clock_type>(io, 5s);
  CHECK(calls == 0);
}

TEST_CASE("in a pipeline, a hedge's events go to the pipeline's observer, named for the call",
          "[hedging][pipeline]") {
  asio::io_context io;
  std::vector<std::string> own, piped;
  const auto record = [](std::vector<std::string>& into) {
    return [&into](const weir::event& e) {
      if (std::holds_alternative<weir::hedge_started>(e)) into.push_back(fmt::format("{}", e));
    };
  };
  hedging_type hedge({.delay = 1s, .operation = "hedged", .watch = record(own)});
  context ctx{.operation = "chat"};
  int calls = 0;
  const auto slow_then_fast = [&] {
    ++calls;
    return calls % 2 == 1 ? takes(5s, 1) : takes(100ms, 2);
  };

  auto watched = weir::pipeline(weir::pipeline_options{.watch = record(piped)}, hedge);
  auto t = run_timed(io, watched(ctx, slow_then_fast));
  CHECK(t.value == 2);  // the hedge's
  CHECK(piped == std::vector<std::string>{"chat: hedge 1 after 1000.0 ms by hedging"});
  CHECK(own.empty());  // the pipeline's observer hears it instead

  // A pipeline nobody listens to leaves the events to the hedge's own watch.
  auto unwatched = weir::pipeline(hedge);
  CHECK(run_timed(io, unwatched(ctx, slow_then_fast)).value == 2);
  CHECK(own == std::vector<std::string>{"chat: hedge 1 after 1000.0 ms by hedging"});
  CHECK(piped.size() == 1);
}

namespace {
// Judges a negative answer a retryable failure, as a response classifier judges a 503.
struct negative_fails {
  template <class T>
  weir::classification operator()(const weir::outcome<T>& o) const {
    if constexpr (std::is_same_v<T, int>)
      if (o.has_value() && o.value() < 0) return {.kind = weir::verdict::retryable};
    return weir::default_classifier{}(o);
  }
};
}  // namespace

TEST_CASE("a hedge's classifier, an option as every policy's, can fail a value", "[hedging]") {
  asio::io_context io;
  weir::hedging<clock_type, negative_fails> hedge(
      weir::basic_hedging_options<negative_fails>{.delay = 1s, .classifier = {}});
  // The first attempt answers -1 at once: a failure, so the hedge starts then, not after 1 s.
  auto t = run_timed(
      io, hedge([](unsigned attempt) { return attempt == 0 ? takes(10ms, -1) : takes(100ms, 2); }));
  CHECK(t.value == 2);
  CHECK(t.took == 110ms);
}

TEST_CASE("against a slow tail, hedging at the observed p85 cuts the p99 many times", "[hedging]") {
  // One call in twenty takes 3 s instead of 100-200 ms, as a generation stuck behind a long one
  // (so a hedge of a slow call is itself slow once in twenty: 0.25% of calls, under the p99).
  const auto run = [](bool hedged) {
    asio::io_context io;
    std::mt19937_64 random(11);
    hedging_type hedge(
        {.delay_percentile = 0.85, .max_hedges = 1, .budget = weir::retry_budget({.ratio = 0.3})});
    std::vector<ns> latencies;
    const auto end = clock_type::now() + 120s;
    const auto call = [&](unsigned) {
      const bool slow = std::uniform_real_distribution<>(0, 1)(random) < 0.05;
      const auto d =
          slow ? ns(3s)
               : ns(std::uniform_int_distribution<std::int64_t>(100, 200)(random) * 1'000'000);
      return takes(d, 1);
    };
    for (int worker = 0; worker < 8; ++worker)
      asio::co_spawn(
          io,
          [&]() -> asio::awaitable<void> {
            while (clock_type::now() < end) {
              const auto start = clock_type::now();
              if (hedged)
                co_await hedge(call);
              else
                co_await call(0);
              latencies.push_back(clock_type::now() - start);
            }
          },
          asio::detached);
    advance<clock_type>(io, 130s);
    if (std::getenv("WEIR_TRACE"))
      fmt::print("calls {} delay {} ms\n", latencies.size(), hedge.current_delay().count() / 1e6);
    std::sort(latencies.begin(), latencies.end());
    return latencies.at(latencies.size() * 99 / 100);
  };
  const auto plain = run(false);
  const auto hedged = run(true);
  INFO("p99 plain " << plain.count() / 1e6 << " ms, hedged " << hedged.count() / 1e6 << " ms");
  CHECK(plain == 3s);
  CHECK(hedged < 600ms);
}

namespace {
asio::awaitable<int> yields_then(int v, int times) {
  for (int i = 0; i < times; ++i)
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  co_return v;
}
}  // namespace

TEST_CASE("a hedging policy shared by four threads ends every call once and holds no hedge after",
          "[hedging][concurrency]") {
  asio::io_context io(4);
  // No delay: every call is hedged at once (as far as max_in_flight allows), so the race runs
  // on every call.
  weir::hedging<> hedge({.delay = std::chrono::nanoseconds(0), .max_in_flight = 8});
  std::atomic<int> answered{0}, failed{0};
  for (int c = 0; c < 32; ++c)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          for (int i = 0; i < 40; ++i) {
            try {
              co_await hedge([](unsigned attempt) { return yields_then(1, attempt == 0 ? 5 : 2); });
              ++answered;
            } catch (const std::exception&) {
              ++failed;
            }
          }
        },
        asio::detached);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(answered.load() == 32 * 40);
  CHECK(failed.load() == 0);
  CHECK(hedge.hedges_in_flight() == 0);
}
