// Specifications of weir/core/trace.hpp: traceparent read and written as W3C Trace Context level 1
// says, and a traced call's attempts as spans of the caller's trace, on virtual time.
#include "../support/common.hpp"
#include "../support/composition.hpp"

#include <weir/core/trace.hpp>

#include <set>

namespace {
constexpr std::string_view spec_example = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

weir::trace_context example_context(std::string_view tracestate = {}) {
  auto c = weir::trace_context::parse(spec_example, tracestate);
  REQUIRE(c);
  return *c;
}

// What each attempt of a traced operation was given, and the events of the call.
struct traced_attempts {
  std::vector<weir::trace_context> given{};
  std::vector<weir::event> events{};
  int failures = 0;  // the first attempts fail with a connection reset

  auto operation() {
    return [this](const weir::trace_context& attempt) -> asio::awaitable<int> {
      given.push_back(attempt);
      if (static_cast<int>(given.size()) <= failures)
        throw boost::system::system_error(asio::error::connection_reset);
      co_return static_cast<int>(given.size());
    };
  }
  weir::observer watch() {
    return [this](const weir::event& e) { events.push_back(e); };
  }
};

const weir::trace_ids& ids_of(const weir::event& e) {
  return std::visit([](const auto& v) -> const weir::trace_ids& { return v.trace; }, e);
}
}  // namespace

TEST_CASE("traceparent: the spec's example is read field by field and written back the same",
          "[trace]") {
  const auto c = example_context();
  CHECK(weir::detail::to_hex(c.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736");
  CHECK(weir::detail::to_hex(c.parent_id) == "00f067aa0ba902b7");
  CHECK(c.flags == 1);
  CHECK(c.sampled());
  CHECK(c.traceparent() == spec_example);
  const auto unsampled =
      weir::trace_context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
  REQUIRE(unsampled);
  CHECK_FALSE(unsampled->sampled());
  CHECK(unsampled->traceparent().ends_with("-00"));
  // No context writes nothing.
  CHECK(weir::trace_context{}.traceparent().empty());
  CHECK_FALSE(weir::trace_context{});
}

TEST_CASE("traceparent: anything but a valid value is no context, never part of one", "[trace]") {
  const std::string ok(spec_example);
  const std::vector<std::pair<std::string, const char*>> invalid = {
      {"", "empty"},
      {ok.substr(0, 54), "one character short"},
      {ok + "0", "version 00 one character long"},
      {ok + "-extra", "version 00 with a field after its flags"},
      {"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "an uppercase trace id"},
      {"00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01", "an uppercase parent id"},
      {"0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "an uppercase version"},
      {"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A", "uppercase flags"},
      {"00-00000000000000000000000000000000-00f067aa0ba902b7-01", "an all-zero trace id"},
      {"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "an all-zero parent id"},
      {"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version ff"},
      {"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", "a trace id one digit short"},
      {"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-701", "a parent id one digit short"},
      {"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", "no dashes"},
      {"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g", "a flag that is not hex"},
      {"00-4bf92f3577b34da6a3ce929z0e0e4736-00f067aa0ba902b7-01", "a trace id that is not hex"},
      {"0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01a", "a one-digit version"},
      {"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what-the-future-will-be-like",
       "a later version whose flags are not followed by a dash"},
      {"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "a later version too short"},
      {std::string("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0") + '\0', "a NUL"},
  };
  for (const auto& [value, why] : invalid) {
    INFO(why << ": '" << value << "'");
    CHECK_FALSE(weir::trace_context::parse(value));
  }
}

TEST_CASE("traceparent: a later version is read for the fields this one knows, then sent as 00",
          "[trace]") {
  for (const std::string value :
       {"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like"}) {
    INFO(value);
    const auto c = weir::trace_context::parse(value);
    REQUIRE(c);
    CHECK(c->traceparent() == spec_example);
  }
}

TEST_CASE("traceparent: flags keep the sampled bit only; whitespace around the value is not in it",
          "[trace]") {
  const auto all_flags =
      weir::trace_context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff");
  REQUIRE(all_flags);
  CHECK(all_flags->flags == 0x01);
  CHECK(all_flags->traceparent() == spec_example);  // the reserved bits go out as zero
  const auto other_bit =
      weir::trace_context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-08");
  REQUIRE(other_bit);
  CHECK_FALSE(other_bit->sampled());
  std::string padded_value = " \t";  // built in steps: g++ 12 warns wrongly on a + chain here
  padded_value.append(spec_example).append(" ");
  const auto padded = weir::trace_context::parse(padded_value);
  REQUIRE(padded);
  CHECK(padded->traceparent() == spec_example);
}

TEST_CASE("tracestate goes along unchanged, unless it could split a header or is too long",
          "[trace]") {
  CHECK(example_context("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").tracestate ==
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
  CHECK(example_context("congo=t61rc\r\nx-api-key: stolen").tracestate.empty());
  CHECK(example_context(std::string(513, 'a')).tracestate.empty());
  CHECK(example_context(std::string(512, 'a')).tracestate.size() == 512);
  // An invalid traceparent takes its tracestate with it.
  CHECK_FALSE(weir::trace_context::parse("00-bad", "congo=t61rcWkgMzE"));
}

TEST_CASE("span ids are random and never zero; a child keeps the trace, flags and tracestate",
          "[trace]") {
  std::set<weir::span_id> seen;
  for (int i = 0; i < 10'000; ++i) {
    const auto id = weir::new_span_id();
    CHECK(id != weir::span_id{});
    seen.insert(id);
  }
  CHECK(seen.size() == 10'000);
  const auto parent = example_context("congo=t61rcWkgMzE");
  const auto span = weir::new_span_id();
  const auto child = parent.child(span);
  CHECK(child.trace_id == parent.trace_id);
  CHECK(child.parent_id == span);
  CHECK(child.flags == parent.flags);
  CHECK(child.tracestate == parent.tracestate);
  CHECK(child.ids() == weir::trace_ids{parent.trace_id, span});
}

TEST_CASE("a traced call: every retry is a new span of the caller's trace, and its events say so",
          "[trace][pipeline]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  traced_attempts op{.failures = 2};
  auto guarded = weir::pipeline(weir::pipeline_options{.watch = op.watch()}, retry);
  const auto caller = example_context("congo=t61rcWkgMzE");
  context ctx{.operation = "chat", .trace = caller};
  CHECK(run_to_end(io, guarded(ctx, op.operation())) == 3);

  REQUIRE(op.given.size() == 3);
  std::set<weir::span_id> spans;
  for (const auto& attempt : op.given) {
    CHECK(attempt.valid());
    CHECK(attempt.trace_id == caller.trace_id);
    CHECK(attempt.parent_id != caller.parent_id);  // the attempt's own span, not the caller's
    CHECK(attempt.flags == caller.flags);
    CHECK(attempt.tracestate == caller.tracestate);
    spans.insert(attempt.parent_id);
  }
  CHECK(spans.size() == 3);

  // Every event carries the trace id and the span of the attempt it belongs to.
  std::vector<weir::span_id> started, failed, retried;
  for (const auto& e : op.events) {
    const auto& ids = ids_of(e);
    CHECK(ids.trace == caller.trace_id);
    if (std::holds_alternative<weir::attempt_started>(e)) started.push_back(ids.span);
    if (std::holds_alternative<weir::attempt_failed>(e)) failed.push_back(ids.span);
    if (std::holds_alternative<weir::retry_scheduled>(e)) retried.push_back(ids.span);
  }
  const std::vector<weir::span_id> sent = {op.given[0].parent_id, op.given[1].parent_id,
                                           op.given[2].parent_id};
  CHECK(started == sent);
  CHECK(failed == std::vector<weir::span_id>(sent.begin(), sent.begin() + 2));
  CHECK(retried == failed);
  // The event's line names them, to be joined with the provider's and the caller's logs.
  const auto line = fmt::format("{}", op.events.front());
  CHECK(line == fmt::format("chat: attempt 1 started trace_id={} span_id={}",
                            weir::detail::to_hex(caller.trace_id), weir::detail::to_hex(sent[0])));
}

TEST_CASE("a call without a trace context gives its attempts none, and its events carry none",
          "[trace][pipeline]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 2, .backoff = weir::backoff::constant(1s)});
  traced_attempts op{.failures = 1};
  auto guarded = weir::pipeline(weir::pipeline_options{.watch = op.watch()}, retry);
  context ctx{.operation = "chat"};
  CHECK(run_to_end(io, guarded(ctx, op.operation())) == 2);
  REQUIRE(op.given.size() == 2);
  for (const auto& attempt : op.given) {
    CHECK_FALSE(attempt);
    CHECK(attempt.traceparent().empty());
  }
  REQUIRE_FALSE(op.events.empty());
  for (const auto& e : op.events) CHECK_FALSE(ids_of(e));
  CHECK(fmt::format("{}", op.events.front()) == "chat: attempt 1 started");
}

TEST_CASE("an operation that takes no trace context still runs in a traced call", "[trace]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 2});
  flaky op{.failures = 0};
  std::vector<weir::event> events;
  auto guarded = weir::pipeline(
      weir::pipeline_options{.watch = [&](const weir::event& e) { events.push_back(e); }}, retry);
  context ctx{.trace = example_context()};
  CHECK(run_to_end(io, guarded(ctx, op())) == 1);
  REQUIRE_FALSE(events.empty());
  CHECK(ids_of(events.front()).trace == ctx.trace.trace_id);
}

TEST_CASE("hedged in a pipeline, each attempt of a traced call is a span of its own",
          "[trace][hedging]") {
  asio::io_context io;
  weir::hedging<clock_type> hedge({.delay = 1s});
  auto guarded = weir::pipeline(hedge, weir::retry<clock_type>({.max_attempts = 1}));
  std::vector<weir::trace_context> given;
  context ctx{.trace = example_context()};
  auto slow_then_fast = [&](const weir::trace_context& attempt) -> asio::awaitable<int> {
    given.push_back(attempt);
    asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor);
    t.expires_after(given.size() == 1 ? 10s : 100ms);
    co_await t.async_wait(asio::use_awaitable);
    co_return static_cast<int>(given.size());
  };
  CHECK(run_to_end(io, guarded(ctx, slow_then_fast)) == 2);
  REQUIRE(given.size() == 2);
  CHECK(given[0].trace_id == ctx.trace.trace_id);
  CHECK(given[1].trace_id == ctx.trace.trace_id);
  CHECK(given[0].parent_id != given[1].parent_id);
}
