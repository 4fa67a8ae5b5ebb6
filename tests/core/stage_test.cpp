// Specifications of weir/core/stage.hpp: the protocol a stage of one's own follows, as a pipeline
// runs it (so built with the composition tests, whose helpers it uses: see tests/CMakeLists.txt).
#include "../support/common.hpp"
#include "../support/composition.hpp"

#include <optional>
#include <string>
#include <vector>

namespace {

// A stage of one's own that writes each hook the pipeline calls into `log`. It admits at once,
// unless it waits (`waits_for`, on the virtual clock) or refuses; its exit may ask to run the
// inside again after `again_after` (the first attempt only) or turn a value into a failure.
struct recorder {
  using clock_type = ::clock_type;
  struct slot {};

  std::string label;
  std::vector<std::string>* log = nullptr;
  ns waits_for{0};
  bool refuses = false;
  std::optional<ns> again_after{};
  bool fails_values = false;

  bool try_enter(slot&, weir::stage_context<clock_type>& c) {
    log->push_back(fmt::format("{} enters attempt {}", label, c.attempt));
    if (refuses) weir::throw_refusal(weir::error::rate_limited, "recorder");
    return waits_for == 0ns;
  }
  asio::awaitable<void> wait_enter(slot&, weir::stage_context<clock_type>&) {
    asio::basic_waitable_timer<clock_type> t(co_await asio::this_coro::executor, waits_for);
    co_await t.async_wait(asio::use_awaitable);
    log->push_back(label + " admits after its wait");
  }
  template <class Outcome>
  weir::stage_action exit(slot&, weir::stage_context<clock_type>& c, const Outcome& o) {
    log->push_back(fmt::format("{} leaves attempt {} with {}", label, c.attempt,
                               o.has_value() ? "a value" : "a failure"));
    if (!o.has_value() && again_after && c.attempt == 1) return {.retry_after = *again_after};
    if (o.has_value() && fails_values)
      return {.replace = std::make_exception_ptr(
                  weir::exception(weir::error::invalid_argument, "the value was refused"))};
    return {};
  }
  void abandon(slot&) { log->push_back(label + " abandoned"); }
  std::string_view name() const { return label; }
};
static_assert(weir::stage<recorder, clock_type>);
static_assert(!weir::stage<flaky, clock_type>);

}  // namespace

TEST_CASE("stages are entered outermost first and left innermost first, on every attempt",
          "[stage][pipeline]") {
  asio::io_context io;
  std::vector<std::string> log;
  weir::retry<clock_type> retry({.max_attempts = 2, .backoff = weir::backoff::constant(1s)});
  auto guarded = weir::pipeline(retry, recorder{.label = "outer", .log = &log},
                                recorder{.label = "inner", .log = &log});
  flaky op{.failures = 1};
  CHECK(run_to_end(io, guarded(op())) == 2);
  CHECK(log == std::vector<std::string>{
                   "outer enters attempt 1",
                   "inner enters attempt 1",
                   "inner leaves attempt 1 with a failure",
                   "outer leaves attempt 1 with a failure",
                   "outer enters attempt 2",
                   "inner enters attempt 2",
                   "inner leaves attempt 2 with a value",
                   "outer leaves attempt 2 with a value",
               });
}

TEST_CASE("a stage's exit may run the inside again after its wait, or make a value a failure",
          "[stage][pipeline]") {
  asio::io_context io;
  std::vector<std::string> log;
  // A retry of one's own: one more attempt, 3 s after a failure.
  auto own_retry = weir::pipeline(recorder{.label = "own", .log = &log, .again_after = 3s});
  flaky op{.failures = 1};
  weir_test::finished<int> call;
  call.start(io, own_retry(op()));
  advance<clock_type>(io, 3s - 1ns);
  CHECK(op.calls == 1);
  advance<clock_type>(io, 1ns);
  REQUIRE(call.done);
  CHECK(call.value == 2);
  CHECK(log.back() == "own leaves attempt 2 with a value");

  auto judging = weir::pipeline(recorder{.label = "judge", .log = &log, .fails_values = true});
  flaky answers;
  std::exception_ptr error;
  CHECK_FALSE(run_to_end(io, judging(answers()), &error));
  REQUIRE(weir_test::weir_exception(error));
  CHECK(weir_test::weir_exception(error)->code() == weir::error::invalid_argument);
}

TEST_CASE(
    "a stage that must wait is awaited and named in the throttled event; a refusal sends "
    "nothing; a call destroyed in a wait is abandoned by the stages it entered",
    "[stage][pipeline]") {
  asio::io_context io;
  std::vector<std::string> log, lines;
  const weir::pipeline_options watching{
      .watch = [&](const weir::event& e) { lines.push_back(fmt::format("{}", e)); }};
  const recorder outer{.label = "outer", .log = &log};
  auto gated =
      weir::pipeline(watching, outer, recorder{.label = "gate", .log = &log, .waits_for = 2s});
  flaky op;
  CHECK(run_to_end(io, gated(op()), nullptr, 2s) == 1);
  CHECK(lines.front() == "call: throttled for 2000.0 ms by gate");

  lines.clear();
  auto walled =
      weir::pipeline(watching, outer, recorder{.label = "wall", .log = &log, .refuses = true});
  std::exception_ptr error;
  CHECK_FALSE(run_to_end(io, walled(op()), &error));
  REQUIRE(weir_test::weir_exception(error));
  CHECK(weir_test::weir_exception(error)->code() == weir::error::rate_limited);
  CHECK(weir_test::weir_exception(error)->refused_locally());
  CHECK(lines == std::vector<std::string>{"call: rejected (rate limited) by wall"});
  CHECK(log.back() == "outer leaves attempt 1 with a failure");

  // Cancelled while the gate waits: the stages it entered leave with the cancellation; the gate,
  // which never admitted the call, is not left.
  log.clear();
  asio::cancellation_signal cancel;
  weir_test::finished<int> cancelled;
  cancelled.start(io, gated(op()), cancel.slot());
  advance<clock_type>(io, 1s);
  cancel.emit(asio::cancellation_type::terminal);
  weir::testing::run_ready(io);
  REQUIRE(cancelled.done);
  CHECK(weir::is_cancellation(cancelled.error));
  CHECK(log == std::vector<std::string>{"outer enters attempt 1", "gate enters attempt 1",
                                        "outer leaves attempt 1 with a failure"});

  // Destroyed while the gate waits (its io_context goes away): no outcome, so the stages it
  // entered are abandoned, and give back what they took.
  log.clear();
  {
    asio::io_context going;
    asio::co_spawn(going, gated(op()), asio::detached);
    advance<clock_type>(going, 1s);
  }
  CHECK(log == std::vector<std::string>{"outer enters attempt 1", "gate enters attempt 1",
                                        "outer abandoned"});
  CHECK(op.calls == 1);  // only the first, gated call was sent
}
