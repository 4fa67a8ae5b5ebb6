// Specifications of weir/request_queue.hpp.
#include "support/throttling.hpp"

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
