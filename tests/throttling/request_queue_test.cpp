// Specifications of weir/throttling/request_queue.hpp.
#include "../support/throttling.hpp"

// ---- request_queue --------------------------------------------------------------------------

namespace {
struct admission {
  std::optional<weir::error_code> result;
  weir::permit held;
  auto handler() {
    return [this](weir::error_code ec, weir::permit p) {
      result = ec;
      held = std::move(p);
    };
  }
};
}  // namespace

TEST_CASE("request_queue admits up to max_concurrent and rejects beyond max_queued at once",
          "[request_queue]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 2, .max_queued = 1});
  admission a, b, c, d;
  queue.async_admit(a.handler());
  queue.async_admit(b.handler());
  queue.async_admit(c.handler());
  queue.async_admit(d.handler());
  run_ready(io);
  CHECK(a.held);
  CHECK(b.held);
  CHECK_FALSE(c.result);  // waiting
  REQUIRE(d.result);
  CHECK(*d.result == weir::error::queue_full);
  CHECK(queue.in_flight() == 2);
  CHECK(queue.queued() == 1);

  a.held.release();  // the slot passes straight to the waiter
  run_ready(io);
  CHECK(c.held);
  CHECK(queue.in_flight() == 2);
  CHECK(queue.queued() == 0);
}

TEST_CASE("permits return their slot on success, exception and cancellation", "[request_queue]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
  auto guarded = [&](bool fail) -> asio::awaitable<void> {
    auto p = co_await queue.async_admit(asio::use_awaitable);
    if (fail) throw std::runtime_error("the call failed");
  };
  int failures = 0;
  for (bool fail : {false, true, false, true})
    asio::co_spawn(io, guarded(fail), [&](std::exception_ptr e) { failures += e != nullptr; });
  run_ready(io);
  CHECK(failures == 2);
  CHECK(queue.in_flight() == 0);

  auto held = queue.try_admit();
  REQUIRE(held);
  asio::cancellation_signal cancel;
  admission waiting;
  queue.async_admit(asio::bind_cancellation_slot(cancel.slot(), waiting.handler()));
  run_ready(io);
  cancel.emit(asio::cancellation_type::terminal);
  run_ready(io);
  REQUIRE(waiting.result);
  CHECK(*waiting.result == asio::error::operation_aborted);
  CHECK(queue.queued() == 0);
  held.release();
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("interactive requests are admitted before batch ones, FIFO within a priority",
          "[request_queue]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 10});
  auto first = queue.try_admit();
  std::vector<std::string> order;
  std::vector<weir::permit> permits;
  auto record = [&](std::string name) {
    return [&, name](weir::error_code ec, weir::permit p) {
      if (!ec) order.push_back(name);
      p.release();
    };
  };
  queue.async_admit(weir::priority::batch, record("batch-1"));
  queue.async_admit(weir::priority::interactive, record("interactive-1"));
  queue.async_admit(weir::priority::batch, record("batch-2"));
  queue.async_admit(weir::priority::interactive, record("interactive-2"));
  run_ready(io);
  first.release();
  run_ready(io);
  CHECK(order == std::vector<std::string>{"interactive-1", "interactive-2", "batch-1", "batch-2"});
}

TEST_CASE("shutdown completes every waiter with shut_down and refuses later admissions",
          "[request_queue]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 10});
  auto held = queue.try_admit();
  std::vector<admission> waiting(5);
  for (auto& w : waiting) queue.async_admit(w.handler());
  run_ready(io);
  queue.shutdown();
  run_ready(io);
  for (auto& w : waiting) CHECK(w.result == weir::error_code(weir::error::shut_down));
  admission late;
  queue.async_admit(late.handler());
  run_ready(io);
  CHECK(late.result == weir::error_code(weir::error::shut_down));
  CHECK_FALSE(queue.try_admit());
  held.release();
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("a request_queue without room for a single request is invalid_argument",
          "[request_queue]") {
  asio::io_context io;
  CHECK_THROWS_AS(weir::request_queue(io.get_executor(), {.max_concurrent = 0}), weir::exception);
}

TEST_CASE("request_queue never exceeds max_concurrent on a 4-thread io_context",
          "[request_queue][concurrency]") {
  asio::io_context io(4);
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 3, .max_queued = 1000});
  std::atomic<int> inside{0}, most{0}, done{0};
  for (int i = 0; i < 400; ++i)
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          auto p = co_await queue.async_admit(asio::use_awaitable);
          const int now = ++inside;
          int seen = most.load();
          while (now > seen && !most.compare_exchange_weak(seen, now)) {
          }
          co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
          --inside;
          ++done;
        },
        asio::detached);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(done == 400);
  CHECK(most <= 3);
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("a sender that honours pacing_delay eases into the limit without crossing it",
          "[request_queue]") {
  monitor_type monitor({.window = 60s, .buckets = 60, .requests_limit = weir::per_minute(100)});
  std::uint64_t most_in_window = 0, sent = 0;
  const auto end = clock_type::now() + 10min;
  while (clock_type::now() < end) {
    // Unpaced, this sender would send every 50 ms: 12 times the limit.
    clock_type::advance(std::max<std::chrono::nanoseconds>(50ms, monitor.pacing_delay()));
    monitor.record({});
    ++sent;
    most_in_window = std::max(most_in_window, monitor.totals().requests);
  }
  CHECK(most_in_window <= 100);
  CHECK(sent >= 900);  // ≥ 90% of the 1000 the limit allows in 10 minutes
}

TEST_CASE("with an executor that names a default token, the queue's operations need none",
          "[request_queue]") {
  asio::io_context io;
  using awaiting = asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>;
  weir::basic_request_queue<awaiting> queue(awaiting(io.get_executor()),
                                            {.max_concurrent = 1, .max_queued = 1});
  static_assert(std::is_same_v<decltype(queue.get_executor()), const awaiting&>);
  int admitted = 0;
  auto body = [&]() -> asio::awaitable<void> {
    weir::permit p = co_await queue.async_admit();
    ++admitted;
    p.release();
    p = co_await queue.admit();
    ++admitted;
  };
  asio::co_spawn(io, body(), asio::detached);
  io.run();
  CHECK(admitted == 2);
  CHECK(queue.in_flight() == 0);
}

// ---- fairness between tenants -----------------------------------------------------------------

namespace {
// Admissions in the order the queue gave them, by tenant.
struct admission_log {
  std::vector<std::string> order;
  std::vector<weir::permit> held;
  std::vector<weir::error_code> refused;
  auto handler(std::string tenant) {
    return [this, tenant](weir::error_code ec, weir::permit p) {
      if (ec) return refused.push_back(ec);
      order.push_back(tenant);
      held.push_back(std::move(p));
    };
  }
  // Gives back the oldest slot held, so the next waiter is admitted.
  void release_one(asio::io_context& io) {
    held.erase(held.begin());
    run_ready(io);
  }
};
}  // namespace

TEST_CASE("a fair queue serves a lone tenant's request after one slot of a flooding tenant's",
          "[request_queue]") {
  for (bool fair : {true, false}) {
    asio::io_context io;
    weir::request_queue queue(
        io.get_executor(), {.max_concurrent = 1, .max_queued = 2000, .fair_between_tenants = fair});
    admission_log log;
    auto first = queue.try_admit();
    for (int i = 0; i < 1000; ++i)
      queue.async_admit(weir::priority::normal, "flood", log.handler("flood"));
    run_ready(io);
    first.release();
    run_ready(io);
    queue.async_admit(weir::priority::normal, "quiet", log.handler("quiet"));
    run_ready(io);
    std::size_t turns = 0;
    while (std::find(log.order.begin(), log.order.end(), "quiet") == log.order.end()) {
      log.release_one(io);
      ++turns;
    }
    // The first release ends the flooder's call in flight when the lone request came.
    if (fair)
      CHECK(turns == 2);  // then one turn of the flooder's, then the lone request
    else
      CHECK(turns == 1000);  // in arrival order: behind all of them
  }
}

TEST_CASE("weights share a fair queue's turns in proportion", "[request_queue]") {
  asio::io_context io;
  weir::request_queue queue(
      io.get_executor(), {.max_concurrent = 1,
                          .max_queued = 200,
                          .fair_between_tenants = true,
                          .weight_of = [](std::string_view t) { return t == "big" ? 3.0 : 1.0; }});
  admission_log log;
  auto first = queue.try_admit();
  for (int i = 0; i < 80; ++i) {
    queue.async_admit(weir::priority::normal, "big", log.handler("big"));
    queue.async_admit(weir::priority::normal, "small", log.handler("small"));
  }
  run_ready(io);
  first.release();
  run_ready(io);
  for (int i = 0; i < 39; ++i) log.release_one(io);
  const auto big = std::count(log.order.begin(), log.order.end(), "big");
  CHECK(log.order.size() == 40);
  CHECK(big == 30);

  CHECK_THROWS_AS(
      [&] {
        weir::request_queue bad(io.get_executor(),
                                {.max_concurrent = 1,
                                 .fair_between_tenants = true,
                                 .weight_of = [](std::string_view) { return 0.0; }});
        auto held = bad.try_admit();
        bad.async_admit(weir::priority::normal, "t", [](weir::error_code, weir::permit) {});
      }(),
      weir::exception);
}

TEST_CASE("priorities hold across tenants in a fair queue", "[request_queue]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(),
                            {.max_concurrent = 1, .max_queued = 100, .fair_between_tenants = true});
  admission_log log;
  auto first = queue.try_admit();
  for (int i = 0; i < 5; ++i)
    queue.async_admit(weir::priority::batch, "quiet", log.handler("quiet-batch"));
  for (int i = 0; i < 5; ++i)
    queue.async_admit(weir::priority::interactive, "flood", log.handler("flood-interactive"));
  run_ready(io);
  first.release();
  run_ready(io);
  for (int i = 0; i < 9; ++i) log.release_one(io);
  REQUIRE(log.order.size() == 10);
  for (int i = 0; i < 5; ++i) CHECK(log.order[i] == "flood-interactive");
}

TEST_CASE("a full queue evicts a lower-priority waiter for a higher one, when allowed",
          "[request_queue]") {
  for (bool evict : {true, false}) {
    asio::io_context io;
    weir::request_queue queue(io.get_executor(), {.max_concurrent = 1,
                                                  .max_queued = 3,
                                                  .fair_between_tenants = true,
                                                  .evict_lower_priority = evict});
    admission_log log;
    auto first = queue.try_admit();
    queue.async_admit(weir::priority::batch, "a", log.handler("a-batch-1"));
    queue.async_admit(weir::priority::batch, "a", log.handler("a-batch-2"));
    queue.async_admit(weir::priority::batch, "b", log.handler("b-batch"));
    queue.async_admit(weir::priority::batch, "c",
                      log.handler("c-batch"));  // full: never evicts its equal
    queue.async_admit(weir::priority::interactive, "c", log.handler("c-interactive"));
    run_ready(io);
    REQUIRE(log.refused.size() == 2);
    CHECK(log.refused[0] == weir::error::queue_full);
    if (!evict) {
      CHECK(log.refused[1] == weir::error::queue_full);
      continue;
    }
    CHECK(log.refused[1] == weir::error::evicted);  // a's newest: a waits the most
    CHECK(queue.queued() == 3);
    first.release();
    run_ready(io);
    log.release_one(io);
    log.release_one(io);
    CHECK(log.order == std::vector<std::string>{"c-interactive", "a-batch-1", "b-batch"});
  }
}

TEST_CASE("two tenants through a fair queue in a pipeline: the flood does not hold the other back",
          "[request_queue]") {
  // Each call takes 100 ms of virtual time on one of two slots. One tenant sends 400 calls at
  // once; the other sends one call every second. Fair, the lone tenant never waits more than one
  // call's length; in arrival order it would wait behind the whole flood.
  for (bool fair : {true, false}) {
    asio::io_context io;
    weir::basic_request_queue<> queue(
        io.get_executor(), {.max_concurrent = 2, .max_queued = 1000, .fair_between_tenants = fair});
    auto guarded = weir::pipeline(queue);
    auto call = [&] {
      return [&]() -> asio::awaitable<int> {
        asio::basic_waitable_timer<clock_type> t(io, 100ms);
        co_await t.async_wait(asio::use_awaitable);
        co_return 1;
      };
    };
    weir::call_context flood{.tenant = "flood"}, quiet{.tenant = "quiet"};
    int flood_done = 0;
    for (int i = 0; i < 400; ++i)
      asio::co_spawn(io, guarded(flood, call()), [&](std::exception_ptr, int) { ++flood_done; });
    std::vector<std::chrono::nanoseconds> waits;
    for (int i = 0; i < 10; ++i) {
      const auto sent = clock_type::now();
      asio::co_spawn(io, guarded(quiet, call()), [&, sent](std::exception_ptr e, int) {
        CHECK_FALSE(e);
        waits.push_back(clock_type::now() - sent - 100ms);
      });
      advance<clock_type>(io, 1s);
    }
    advance<clock_type>(io, 30s);
    CHECK(flood_done == 400);
    REQUIRE(waits.size() == 10);
    const auto longest = *std::max_element(waits.begin(), waits.end());
    if (fair)
      CHECK(longest <= 100ms);
    else
      CHECK(longest > 10s);
  }
}

TEST_CASE("max_concurrent changes at run time: raised, waiters go at once; lowered, slots drain",
          "[request_queue]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 2, .max_queued = 10});
  admission_log log;
  auto a = queue.try_admit(), b = queue.try_admit();
  for (int i = 0; i < 4; ++i) queue.async_admit(weir::priority::normal, log.handler("w"));
  run_ready(io);
  CHECK(log.order.empty());
  queue.set_max_concurrent(4);
  run_ready(io);
  CHECK(log.order.size() == 2);
  CHECK(queue.in_flight() == 4);
  CHECK(queue.max_concurrent() == 4);

  queue.set_max_concurrent(2);
  a.release();  // 3 in flight, over the new limit: the waiter stays
  run_ready(io);
  CHECK(log.order.size() == 2);
  CHECK(queue.in_flight() == 3);
  b.release();  // 2: still not under it
  run_ready(io);
  CHECK(log.order.size() == 2);
  log.release_one(io);  // 1 in flight: the next waiter goes
  CHECK(log.order.size() == 3);
  CHECK(queue.in_flight() == 2);
  CHECK_THROWS_AS(queue.set_max_concurrent(0), weir::exception);
}
