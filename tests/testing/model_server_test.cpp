// Specifications of the model-server referee (weir/testing/model_server.hpp), on virtual time.
#include "../support/admission.hpp"

namespace {
// `clients` callers that each send, wait for the answer, and send again until `until`; their
// latencies are kept.
struct closed_loop {
  std::vector<std::chrono::nanoseconds> latencies;
  std::uint64_t refused = 0;

  void start(asio::io_context& io, server_type& server, int clients, clock_type::time_point until) {
    for (int c = 0; c < clients; ++c)
      asio::co_spawn(
          io,
          [&, until]() -> asio::awaitable<void> {
            while (clock_type::now() < until) {
              const auto sent = clock_type::now();
              const unsigned status = co_await server.serve();
              if (status == 503)
                ++refused;
              else
                latencies.push_back(clock_type::now() - sent);
            }
          },
          asio::detached);
  }
};
}  // namespace

TEST_CASE("a model server serves `workers` at once and queues the rest: latency grows with load",
          "[model_server]") {
  for (int clients : {4, 8}) {
    weir::testing::manual_clock::reset();
    asio::io_context io;
    server_type server(io.get_executor(),
                       {.workers = 4, .service = weir::testing::fixed_service(100ms)});
    closed_loop load;
    load.start(io, server, clients, clock_type::now() + 10s);
    advance<clock_type>(io, 11s);
    const auto s = server.stats();
    // 4 workers × 10 s / 100 ms: the capacity, whatever the load (requests queued before the
    // end are served after it)
    CHECK(s.served >= 400);
    CHECK(s.served <= 404);
    CHECK(s.busy == static_cast<std::int64_t>(s.served) * 100ms);
    // Four clients never wait; eight wait one service each.
    CHECK(load.latencies.back() == (clients == 4 ? 100ms : 200ms));
    CHECK(s.longest_queue == static_cast<std::size_t>(clients - 4));
  }
}

TEST_CASE("a model server answers 503 once its queue is full", "[model_server]") {
  asio::io_context io;
  server_type server(io.get_executor(),
                     {.workers = 1, .max_queue = 2, .service = weir::testing::fixed_service(1s)});
  std::vector<unsigned> statuses;
  for (int i = 0; i < 5; ++i)
    asio::co_spawn(io, server.serve(),
                   [&](std::exception_ptr, unsigned s) { statuses.push_back(s); });
  advance<clock_type>(io, 5s);
  std::sort(statuses.begin(), statuses.end());
  CHECK(statuses == std::vector<unsigned>{200, 200, 200, 503, 503});
  CHECK(server.stats().refused == 2);
}

TEST_CASE("a client that gives up leaves the queue, or frees its worker", "[model_server]") {
  asio::io_context io;
  server_type server(io.get_executor(),
                     {.workers = 1, .service = weir::testing::fixed_service(1s)});
  asio::cancellation_signal serving, waiting;
  weir_test::finished<unsigned> first, second, third;
  first.start(io, server.serve(), serving.slot());
  second.start(io, server.serve(), waiting.slot());
  third.start(io, server.serve());
  run_ready(io);
  waiting.emit(asio::cancellation_type::terminal);  // gives up in the queue
  advance<clock_type>(io, 500ms);
  serving.emit(asio::cancellation_type::terminal);  // gives up half way: the worker is free
  run_ready(io);
  CHECK(first.done);
  CHECK(second.done);
  CHECK_FALSE(third.done);
  advance<clock_type>(io, 1s);
  CHECK(third.value == 200u);
  const auto s = server.stats();
  CHECK(s.served == 1);
  CHECK(s.abandoned == 2);
  CHECK(s.busy == 1500ms);
}
