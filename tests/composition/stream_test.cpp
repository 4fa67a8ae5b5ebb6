// Specifications of weir/composition/stream.hpp: streamed calls through a pipeline, on virtual
// time.
#include "../support/common.hpp"
#include "../support/composition.hpp"

#include <weir/composition/stream.hpp>
#include <weir/http/sse.hpp>
#include <weir/routing/router.hpp>

#include <deque>
#include <memory>

namespace {
// One chunk of a scripted stream: a token of text, or the final usage.
struct piece {
  std::string text;
  std::optional<weir::token_usage> usage{};
};
using piece_stream = weir::basic_stream<piece, clock_type>;

void count_pieces(const piece& p, weir::stream_tally& t) {
  if (p.usage) {
    t.reported_input_tokens = p.usage->input_tokens;
    t.reported_output_tokens = p.usage->output_tokens;
  } else {
    ++t.counted_output_tokens;
  }
}

// What a scripted server does next, after `after` on the virtual clock.
struct step {
  enum kind_type { chunk, usage, end, reset } kind = chunk;
  ns after = 100ms;
  weir::token_usage used{};
};

// A server's stream as a list of steps; each open() plays `scripts[n]` for the n-th attempt.
struct scripted {
  std::vector<std::vector<step>> scripts;
  int opened = 0;
  int pulls_cancelled = 0;

  static asio::awaitable<std::optional<piece>> play(std::shared_ptr<std::deque<step>> left,
                                                    int* cancelled) {
    if (left->empty()) co_return std::nullopt;
    const step s = left->front();
    left->pop_front();
    asio::basic_waitable_timer<clock_type> t(
        co_await asio::this_coro::executor,
        std::chrono::duration_cast<clock_type::duration>(s.after));
    auto [ec] = co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
    if (ec) {
      ++*cancelled;
      throw boost::system::system_error(ec);
    }
    switch (s.kind) {
      case step::chunk: co_return piece{"tok"};
      case step::usage: co_return piece{"", s.used};
      case step::end: co_return std::nullopt;
      case step::reset: throw boost::system::system_error(asio::error::connection_reset);
    }
    co_return std::nullopt;
  }

  // The operation a pipeline runs.
  auto operator()(weir::stream_options<piece> options = {.tally = count_pieces}) {
    return [this, options] {
      const auto& script = scripts[std::min<std::size_t>(opened, scripts.size() - 1)];
      ++opened;
      auto left = std::make_shared<std::deque<step>>(script.begin(), script.end());
      return weir::open_stream_on<piece, clock_type>(
          [left, c = &pulls_cancelled] { return play(left, c); }, options);
    };
  }
};

std::vector<step> tokens(int n, ns first = 100ms, ns between = 100ms) {
  std::vector<step> s{{step::chunk, first}};
  for (int i = 1; i < n; ++i) s.push_back({step::chunk, between});
  return s;
}

// Reads a stream to its end (or its failure), keeping what came.
struct reader {
  std::vector<std::string> texts;
  std::exception_ptr error;
  bool done = false;
  asio::awaitable<void> read(piece_stream& s) {
    try {
      while (auto p = co_await s.next()) texts.push_back(p->text);
    } catch (...) {
      error = std::current_exception();
    }
    done = true;
  }
};

using weir_test::weir_exception;
}  // namespace

TEST_CASE("a streamed call returns at its first chunk and holds its queue slot until it ends",
          "[stream]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  std::vector<weir::stream_ended> ended;
  auto guarded = weir::pipeline(
      weir::basic_pipeline_options<>{.watch =
                                         [&](const weir::event& e) {
                                           if (auto* s = std::get_if<weir::stream_ended>(&e))
                                             ended.push_back(*s);
                                         }},
      monitor, queue);
  scripted server;
  auto script = tokens(4, 300ms);
  script.push_back({step::usage, 100ms, {200, 40}});
  script.push_back({step::end, 10ms});
  server.scripts = {script};

  context ctx{.tokens = 1000, .operation = "chat"};
  weir_test::finished<piece_stream> first;
  first.start(io, guarded(ctx, server()));
  advance<clock_type>(io, 299ms);
  CHECK_FALSE(first.done);
  advance<clock_type>(io, 1ms);
  REQUIRE(first.value);  // at the first chunk, not the last
  CHECK(first.value->report().time_to_first_token == 300ms);
  CHECK(queue.in_flight() == 1);

  // A second call waits for the slot the stream holds.
  scripted other;
  other.scripts = {tokens(1)};
  context ctx2{.tokens = 10};
  weir_test::finished<piece_stream> second;
  second.start(io, guarded(ctx2, other()));
  advance<clock_type>(io, 10s);
  CHECK(other.opened == 0);
  CHECK(monitor.totals().requests == 0);  // the stream has not settled

  reader r;
  asio::co_spawn(io, r.read(*first.value), asio::detached);
  advance<clock_type>(io, 1s);
  REQUIRE(r.done);
  CHECK_FALSE(r.error);
  CHECK(r.texts.size() == 5);  // four tokens and the usage chunk
  const auto report = first.value->report();
  CHECK(report.end == weir::stream_end::completed);
  CHECK(report.tally.source() == weir::usage_source::reported);
  CHECK(monitor.totals().tokens == 240);  // settled to the reported usage, not the estimate
  REQUIRE(ended.size() == 1);
  CHECK(ended[0].tokens == 240);
  CHECK(ended[0].chunks == 5);
  CHECK(ended[0].source == weir::usage_source::reported);

  advance<clock_type>(io, 1s);
  CHECK(other.opened == 1);  // the slot came back at the stream's end
  CHECK(second.value);
}

TEST_CASE("no first token within first_token is a retryable timeout: the retry opens a new stream",
          "[stream]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  auto guarded = weir::pipeline(retry);
  scripted server;
  server.scripts = {tokens(3, 30s), tokens(3, 200ms)};
  weir_test::finished<piece_stream> call;
  context ctx{.tokens = 100};
  call.start(io, guarded(ctx, server({.first_token = 2s, .tally = count_pieces})));
  advance<clock_type>(io, 2s);
  CHECK_FALSE(call.done);
  CHECK(server.pulls_cancelled == 1);  // the slow first chunk's read was cancelled
  advance<clock_type>(io, 1s + 200ms);
  REQUIRE(call.value);
  CHECK(server.opened == 2);
  CHECK(call.value->report().time_to_first_token == 200ms);
}

TEST_CASE(
    "a stream broken after its first chunk is not retried; the error says so, and tokens "
    "settle to what was counted",
    "[stream]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 5, .backoff = weir::backoff::constant(1s)});
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .break_duration = 30s});
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  auto guarded = weir::pipeline(retry, breaker, monitor);
  scripted server;
  auto script = tokens(3);
  script.push_back({step::reset, 50ms});
  server.scripts = {script};

  context ctx{.input_tokens = 500, .output_tokens = 300};
  weir_test::finished<piece_stream> call;
  call.start(io, guarded(ctx, server()));
  advance<clock_type>(io, 100ms);
  REQUIRE(call.value);
  reader r;
  asio::co_spawn(io, r.read(*call.value), asio::detached);
  advance<clock_type>(io, 10s);
  REQUIRE(r.done);
  CHECK(r.texts.size() == 3);  // what came before the reset reached the caller
  const auto* broken = weir_exception(r.error);
  REQUIRE(broken);
  CHECK(broken->code() == weir::error::stream_broken);
  CHECK(std::string(broken->what()).find("not retried") != std::string::npos);
  CHECK(weir::detail::weir_code(broken->cause()) ==
        weir::error_code(asio::error::connection_reset));
  CHECK(server.opened == 1);  // never retried

  const auto report = call.value->report();
  CHECK(report.end == weir::stream_end::broken);
  CHECK(report.tally.source() == weir::usage_source::counted);
  CHECK(monitor.totals().tokens == 500 + 3);  // the estimated prompt and the three tokens seen
  CHECK(monitor.totals().errors == 1);
  CHECK(breaker.state() == weir::breaker_state::open);  // a reset mid-stream is a failure

  // Reading again gives the same error: a broken stream stays broken.
  reader again;
  asio::co_spawn(io, again.read(*call.value), asio::detached);
  advance<clock_type>(io, 1ms);
  CHECK(weir_exception(again.error));
}

TEST_CASE("a stream that stalls past its idle timeout, or runs past its total, breaks",
          "[stream]") {
  asio::io_context io;
  scripted server;
  auto stall = tokens(2);
  stall.push_back({step::chunk, 10s});
  server.scripts = {stall};
  auto guarded = weir::pipeline(weir::retry<clock_type>({.max_attempts = 3}));

  SECTION("idle") {
    context ctx{.tokens = 10};
    weir_test::finished<piece_stream> call;
    call.start(io, guarded(ctx, server({.idle = 1s, .tally = count_pieces})));
    advance<clock_type>(io, 100ms);
    REQUIRE(call.value);
    reader r;
    asio::co_spawn(io, r.read(*call.value), asio::detached);
    advance<clock_type>(io, 100ms + 999ms);
    CHECK_FALSE(r.done);
    advance<clock_type>(io, 1ms);
    REQUIRE(r.done);
    const auto* e = weir_exception(r.error);
    REQUIRE(e);
    CHECK(e->code() == weir::error::stream_broken);
    CHECK(weir::detail::weir_code(e->cause()) == weir::error_code(weir::error::timeout));
    CHECK(server.pulls_cancelled == 1);
  }
  SECTION("total") {
    context ctx{.tokens = 10};
    weir_test::finished<piece_stream> call;
    call.start(io, guarded(ctx, server({.idle = 30s, .total = 3s, .tally = count_pieces})));
    advance<clock_type>(io, 100ms);
    REQUIRE(call.value);
    reader r;
    asio::co_spawn(io, r.read(*call.value), asio::detached);
    advance<clock_type>(io, 2899ms);
    CHECK_FALSE(r.done);
    advance<clock_type>(io, 1ms);
    REQUIRE(r.done);
    CHECK(weir_exception(r.error));
    CHECK(r.texts.size() == 2);
  }
}

TEST_CASE(
    "a stream the caller stops reading is abandoned: its slot comes back, and it settles "
    "what it produced, or the estimate when nothing is known",
    "[stream]") {
  asio::io_context io;
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 4});
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  auto guarded = weir::pipeline(monitor, queue);
  scripted server;
  server.scripts = {tokens(10)};
  context ctx{.input_tokens = 100, .output_tokens = 50};

  SECTION("closed, with its chunks counted") {
    weir_test::finished<piece_stream> call;
    call.start(io, guarded(ctx, server()));
    advance<clock_type>(io, 100ms);
    REQUIRE(call.value);
    CHECK(queue.in_flight() == 1);
    call.value->close();
    CHECK(queue.in_flight() == 0);
    CHECK(call.value->report().end == weir::stream_end::abandoned);
    CHECK(call.value->report().tally.source() == weir::usage_source::counted);
    CHECK(monitor.totals().tokens == 100 + 1);
  }
  SECTION("destroyed, with no tally: the estimate") {
    {
      weir_test::finished<piece_stream> call;
      call.start(io, guarded(ctx, server({})));
      advance<clock_type>(io, 100ms);
      REQUIRE(call.value);
      CHECK(queue.in_flight() == 1);
    }
    CHECK(queue.in_flight() == 0);
    CHECK(monitor.totals().tokens == 150);
    CHECK(monitor.totals().errors == 0);  // the provider did nothing wrong
  }
  SECTION("a cancelled read") {
    weir_test::finished<piece_stream> call;
    call.start(io, guarded(ctx, server()));
    advance<clock_type>(io, 100ms);
    REQUIRE(call.value);
    asio::cancellation_signal stop;
    weir_test::finished<int> read;
    read.start(
        io,
        [](piece_stream& s) -> asio::awaitable<int> {
          int n = 0;
          while (co_await s.next()) ++n;
          co_return n;
        }(*call.value),
        stop.slot());
    advance<clock_type>(io, 250ms);  // the first chunk and two more
    stop.emit(asio::cancellation_type::terminal);
    advance<clock_type>(io, 1ms);
    REQUIRE(read.done);
    CHECK(read.code() == weir::error_code(asio::error::operation_aborted));
    CHECK(server.pulls_cancelled == 1);
    CHECK(queue.in_flight() == 0);
    CHECK(call.value->report().end == weir::stream_end::abandoned);
    CHECK(monitor.totals().tokens == 100 + 3);
  }
}

TEST_CASE("a stream that fails before its first chunk falls back; a hedge's first chunk wins",
          "[stream]") {
  asio::io_context io;
  SECTION("fallback") {
    scripted failing, spare;
    failing.scripts = {{{step::reset, 100ms}}};
    spare.scripts = {tokens(2)};
    weir::fallback to_spare([&](const weir::outcome<piece_stream>&) { return spare()(); });
    weir_test::finished<piece_stream> call;
    call.start(io, to_spare(failing()));
    advance<clock_type>(io, 1s);
    REQUIRE(call.value);
    CHECK(spare.opened == 1);
    CHECK(call.value->report().tally.chunks == 1);
  }
  SECTION("hedging") {
    scripted server;
    server.scripts = {tokens(3, 5s), tokens(3, 300ms)};
    weir::hedging<clock_type> hedge({.delay = 1s});
    weir_test::finished<piece_stream> call;
    call.start(io, hedge([&](unsigned) { return server()(); }));
    advance<clock_type>(io, 1s + 299ms);
    CHECK_FALSE(call.done);
    advance<clock_type>(io, 1ms);
    REQUIRE(call.value);
    CHECK(call.value->report().time_to_first_token == 300ms);
    CHECK(server.opened == 2);
    CHECK(server.pulls_cancelled == 1);  // the slow first attempt was cancelled
  }
}

namespace {
using stream_router = weir::routing::router<std::string, piece_stream, clock_type>;
weir::routing::catalog cheap_and_dear() {
  weir::routing::catalog c;
  c.add(weir::routing::model_spec{
      .provider = "a", .id = "a-small", .input_price = 1, .output_price = 2, .capability = 5});
  c.add(weir::routing::model_spec{
      .provider = "b", .id = "b-large", .input_price = 3, .output_price = 6, .capability = 8});
  return c;
}
}  // namespace

TEST_CASE(
    "the router falls back when a stream fails before its first chunk, and settles the "
    "stream it returned when that ends",
    "[stream][router]") {
  asio::io_context io;
  std::vector<std::string> seen;
  std::vector<weir::stream_ended> ended;
  stream_router::options_type o;
  o.adaptation.reset();
  o.watch = [&](const weir::event& e) {
    seen.push_back(fmt::format("{}", e));
    if (auto* s = std::get_if<weir::stream_ended>(&e)) ended.push_back(*s);
  };
  stream_router router(io.get_executor(), cheap_and_dear(), o);
  scripted a, b;
  a.scripts = {{{step::reset, 200ms}}};
  auto script = tokens(3, 400ms);
  script.push_back({step::reset, 50ms});
  b.scripts = {script};
  router.connect("a", [&](const weir::routing::model_spec&, const std::string&) { return a()(); });
  router.connect("b", [&](const weir::routing::model_spec&, const std::string&) { return b()(); });

  weir_test::finished<weir::routing::routed<piece_stream>> call;
  call.start(io, router.route("hi", {.input_tokens = 100, .output_tokens = 50}));
  advance<clock_type>(io, 599ms);
  CHECK_FALSE(call.done);
  advance<clock_type>(io, 1ms);
  REQUIRE(call.value);
  const auto& record = call.value->route;
  CHECK(record.model == "b-large");
  REQUIRE(record.steps.size() == 2);  // both attempts, the failed one first
  CHECK(record.steps[0].result == weir::verdict::retryable);
  CHECK(record.steps[1].latency == 400ms);  // to the first chunk
  CHECK(router.status()[1].errors == 0);    // b has not settled yet

  reader r;
  asio::co_spawn(io, r.read(call.value->response), asio::detached);
  advance<clock_type>(io, 1s);
  REQUIRE(r.done);
  CHECK(weir_exception(r.error));
  CHECK(a.opened == 1);
  CHECK(b.opened == 1);  // a stream broken after its first chunk is not routed again
  REQUIRE(ended.size() == 1);
  CHECK(ended[0].how == weir::stream_end::broken);
  CHECK(ended[0].source == weir::usage_source::counted);
  CHECK(ended[0].tokens == 100 + 3);
  const auto status = router.status();
  CHECK(status[1].errors == 1);  // the broken stream was b's failure
  CHECK(status[1].tokens_per_minute == Approx(103));
}

TEST_CASE("streams through a pipeline shared by four threads settle every slot and token",
          "[stream][concurrency]") {
  asio::io_context io(4);
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 8, .max_queued = 10'000});
  weir::usage_monitor<> monitor({.window = 1h, .buckets = 60});
  weir::circuit_breaker<> breaker({.consecutive_failures = 1'000'000});
  weir::rate_limits<> limits(io.get_executor(),
                             {.tokens = weir::limit::per_minute(6e10, 1'000'000)});
  weir::retry<> retry({.max_attempts = 2, .backoff = weir::backoff::constant(0ns)});
  auto guarded = weir::pipeline(retry, breaker, limits, monitor, queue);
  std::atomic<int> read_to_end{0}, broken{0}, abandoned{0};
  for (int i = 0; i < 1200; ++i)
    asio::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          weir::call_context ctx{.input_tokens = 10, .output_tokens = 10};
          // Five chunks, each after a trip through the executor; one stream in three breaks
          // after its third, one in three is closed by its reader after its first.
          // (Named before the co_await: g++ 12 destroys a temporary holding a shared_ptr twice
          // when its full expression has a co_await.)
          auto left = std::make_shared<int>(0);
          auto open = [left, i] {
            return weir::open_stream<piece>(
                [left, i]() -> asio::awaitable<std::optional<piece>> {
                  const auto ex = co_await asio::this_coro::executor;
                  co_await asio::post(ex, asio::use_awaitable);
                  const int n = (*left)++;
                  if (i % 3 == 1 && n == 3)
                    throw boost::system::system_error(asio::error::connection_reset);
                  if (n == 5) co_return std::nullopt;
                  co_return piece{"tok"};
                },
                {.tally = count_pieces});
          };
          auto s = co_await guarded(ctx, open);
          try {
            if (i % 3 == 2) {
              s.close();
              ++abandoned;
              co_return;
            }
            for (;;) {
              auto p = co_await s.next();
              if (!p) break;
            }
            ++read_to_end;
          } catch (const weir::exception&) {
            ++broken;
          }
        },
        asio::detached);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&] { io.run(); });
  for (auto& t : threads) t.join();
  CHECK(read_to_end == 400);
  CHECK(broken == 400);
  CHECK(abandoned == 400);
  CHECK(queue.in_flight() == 0);
  CHECK(monitor.totals().requests == 1200);
  CHECK(monitor.totals().errors == 400);
  // Settled to what was counted: 5, 3 and 1 output tokens over the estimated 10 of input.
  CHECK(monitor.totals().tokens == 400 * (10 + 5) + 400 * (10 + 3) + 400 * (10 + 1));
}

// ---- Errors inside a stream that began 200 (issue 31) -------------------------------------------

namespace {
namespace sse = weir::http::sse;
using event_stream = weir::basic_stream<sse::event, clock_type>;

sse::event anthropic_event(std::string type, std::string data) {
  sse::event e;
  e.type = std::move(type);
  e.data = std::move(data);
  return e;
}
sse::event openai_chunk(std::string data) { return anthropic_event("message", std::move(data)); }
sse::event openai_text(std::string_view text) {
  return openai_chunk(fmt::format(R"({{"choices":[{{"delta":{{"content":"{}"}}}}]}})", text));
}
const sse::event openai_role =
    openai_chunk(R"({"choices":[{"delta":{"role":"assistant","content":""}}]})");
// As OpenAI words them; the message quotes what the caller sent, which no error may repeat.
sse::event openai_error(std::string_view type, std::string_view code) {
  return openai_chunk(fmt::format(
      R"({{"error":{{"message":"about the secret prompt","type":"{}","param":null,"code":"{}"}}}})",
      type, code));
}
const sse::event message_start = anthropic_event(
    "message_start", R"({"type":"message_start","message":{"usage":{"input_tokens":25}}})");
sse::event anthropic_error(std::string_view type) {
  return anthropic_event(
      "error",
      fmt::format(R"({{"type":"error","error":{{"type":"{}","message":"secret prompt"}}}})", type));
}

// A server's event streams, one script per attempt, each event 100 ms after the one before.
struct scripted_events {
  std::vector<std::vector<sse::event>> scripts;
  int opened = 0;

  static asio::awaitable<std::optional<sse::event>> play(
      std::shared_ptr<std::deque<sse::event>> left) {
    asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor,
                                             std::chrono::milliseconds(100));
    co_await t.async_wait(asio::use_awaitable);
    if (left->empty()) co_return std::nullopt;
    std::optional<sse::event> e(std::move(left->front()));
    left->pop_front();
    co_return e;
  }

  auto operator()() {
    return [this] {
      const auto& script = scripts[std::min<std::size_t>(opened, scripts.size() - 1)];
      ++opened;
      auto left = std::make_shared<std::deque<sse::event>>(script.begin(), script.end());
      return weir::open_stream_on<sse::event, clock_type>([left] { return play(left); },
                                                          {.tally = sse::openai_tally,
                                                           .in_band_error = sse::in_band_error,
                                                           .opening = sse::opens_answer});
    };
  }
};

struct event_reader {
  std::vector<sse::event> events;
  std::exception_ptr error;
  bool done = false;
  asio::awaitable<void> read(event_stream& s) {
    try {
      while (auto e = co_await s.next()) events.push_back(std::move(*e));
    } catch (...) {
      error = std::current_exception();
    }
    done = true;
  }
};

weir::verdict verdict_of(const std::exception_ptr& e) {
  return weir::default_classifier{}(weir::outcome<int>::from_exception(e)).kind;
}

std::string what_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  }
}
}  // namespace

TEST_CASE(
    "an error event before the first content fails the call as its type says: a rate limit is "
    "retried, and the next attempt streams",
    "[stream][issue31]") {
  asio::io_context io;
  std::vector<weir::verdict> retried;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  auto guarded = weir::pipeline(
      weir::basic_pipeline_options<>{.watch =
                                         [&](const weir::event& e) {
                                           if (auto* r = std::get_if<weir::retry_scheduled>(&e))
                                             retried.push_back(r->cause);
                                         }},
      retry, monitor);
  scripted_events server;
  // OpenAI's first chunk names the role and carries no text; the error comes after it.
  server.scripts = {{openai_role, openai_error("requests", "rate_limit_exceeded")},
                    {openai_role, openai_text("Hi"), openai_text(" there")}};
  context ctx{.tokens = 100};
  weir_test::finished<event_stream> call;
  call.start(io, guarded(ctx, server()));
  advance<clock_type>(io, 200ms);
  CHECK_FALSE(call.done);
  CHECK(retried == std::vector{weir::verdict::rate_limited});
  CHECK(monitor.totals().rate_limited == 1);
  advance<clock_type>(io, 1s + 200ms);
  REQUIRE(call.value);
  CHECK(server.opened == 2);
  CHECK(call.value->report().time_to_first_token == 200ms);  // the text's, not the role's

  event_reader r;
  asio::co_spawn(io, r.read(*call.value), asio::detached);
  advance<clock_type>(io, 1s);
  REQUIRE(r.done);
  CHECK_FALSE(r.error);
  REQUIRE(r.events.size() == 3);  // the role chunk held back, then the text
  CHECK(r.events[0].data == openai_role.data);
  CHECK(r.events[1].data == openai_text("Hi").data);
  CHECK(call.value->report().end == weir::stream_end::completed);
}

TEST_CASE("Anthropic's overloaded error after message_start is retryable: the call is retried",
          "[stream][issue31]") {
  asio::io_context io;
  std::vector<weir::verdict> retried;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  auto guarded = weir::pipeline(
      weir::basic_pipeline_options<>{.watch =
                                         [&](const weir::event& e) {
                                           if (auto* r = std::get_if<weir::retry_scheduled>(&e))
                                             retried.push_back(r->cause);
                                         }},
      retry);
  scripted_events server;
  const auto delta = anthropic_event("content_block_delta",
                                     R"({"type":"content_block_delta","delta":{"text":"Hi"}})");
  server.scripts = {{message_start, anthropic_error("overloaded_error")}, {message_start, delta}};
  context ctx{.tokens = 100};
  weir_test::finished<event_stream> call;
  call.start(io, guarded(ctx, server()));
  advance<clock_type>(io, 200ms + 1s + 200ms);
  REQUIRE(call.value);
  CHECK(server.opened == 2);
  CHECK(retried == std::vector{weir::verdict::retryable});
}

TEST_CASE("an in-band error of a spent quota or a bad request is not retried, and says which",
          "[stream][issue31]") {
  struct answer {
    sse::event error;
    weir::verdict judged;
    const char* says;
  };
  for (const auto& [error, judged, says] :
       {answer{openai_error("insufficient_quota", "insufficient_quota"), weir::verdict::exhausted,
               "insufficient_quota"},
        answer{anthropic_error("billing_error"), weir::verdict::exhausted, "billing_error"},
        answer{openai_error("invalid_request_error", "null"), weir::verdict::fatal,
               "invalid_request_error"}}) {
    INFO(error.data);
    asio::io_context io;
    weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
    auto guarded = weir::pipeline(retry);
    scripted_events server;
    server.scripts = {{error}, {openai_text("Hi")}};
    context ctx{.tokens = 100};
    weir_test::finished<event_stream> call;
    call.start(io, guarded(ctx, server()));
    advance<clock_type>(io, 10s);
    REQUIRE(call.done);
    REQUIRE(call.error);
    CHECK(server.opened == 1);
    CHECK(verdict_of(call.error) == judged);
    const auto what = what_of(call.error);
    CHECK(what.find(says) != std::string::npos);
    CHECK(what.find("secret") == std::string::npos);
  }
}

TEST_CASE(
    "an error event after content breaks the stream with its verdict, settled as a failure and "
    "not retried",
    "[stream][issue31]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 5, .backoff = weir::backoff::constant(1s)});
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .break_duration = 30s});
  weir::usage_monitor<clock_type> monitor({.window = 60s, .buckets = 60});
  auto guarded = weir::pipeline(retry, breaker, monitor);
  scripted_events server;
  server.scripts = {{openai_role, openai_text("Hi"), openai_text(" there"),
                     openai_error("server_error", "null"), openai_text("never")}};
  context ctx{.tokens = 100};
  weir_test::finished<event_stream> call;
  call.start(io, guarded(ctx, server()));
  advance<clock_type>(io, 200ms);
  REQUIRE(call.value);
  event_reader r;
  asio::co_spawn(io, r.read(*call.value), asio::detached);
  advance<clock_type>(io, 10s);
  REQUIRE(r.done);
  CHECK(r.events.size() == 3);  // the error is not handed over as content
  const auto* broken = weir_exception(r.error);
  REQUIRE(broken);
  CHECK(broken->code() == weir::error::stream_broken);
  CHECK(verdict_of(r.error) == weir::verdict::retryable);  // a server error, as a 500 is
  CHECK(what_of(broken->cause()).find("server_error") != std::string::npos);
  CHECK(call.value->report().end == weir::stream_end::broken);
  CHECK(server.opened == 1);
  CHECK(monitor.totals().errors == 1);
  CHECK(breaker.state() == weir::breaker_state::open);
}
