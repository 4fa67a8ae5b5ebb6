// Specifications of weir/core/events.hpp: one line per event, and observers fanned out. (The
// order in which a pipeline emits its events is pipeline_test.cpp's; each policy's own events
// are read in its tests.)
#include "../support/core.hpp"

#include <string>
#include <vector>

TEST_CASE("the router's events read as one line each, naming the operation or else \"call\"",
          "[events]") {
  const auto line = [](const weir::event& e) { return fmt::format("{}", e); };
  CHECK(line(weir::route_chosen{.operation = "chat",
                                .provider = "openai",
                                .model = "gpt-4o",
                                .attempt = 2,
                                .estimated_cost = 0.0125}) ==
        "chat: attempt 2 routed to openai/gpt-4o (est. $0.012500)");
  CHECK(
      line(weir::route_fallback{
          .operation = {}, .provider = "a", .model = "m", .cause = weir::verdict::rate_limited}) ==
      "call: a/m failed (rate-limited), falling back");
  CHECK(line(weir::route_fallback{
            .operation = {}, .provider = "a", .model = "m", .context_exceeded = true}) ==
        "call: a/m context window too small, trying a larger one");
  CHECK(line(weir::route_fallback{
            .operation = {}, .provider = "a", .model = "m", .refused_locally = true}) ==
        "call: a/m has no room here, falling back");
  CHECK(line(weir::fleet_connection{.operation = "router", .reachable = false}) ==
        "router: the fleet is unreachable: routing on local state");
  CHECK(line(weir::fleet_connection{.operation = "router", .reachable = true}) ==
        "router: the fleet is reachable again");
  // A breaker's first report (the router's, at its construction) is its state alone.
  CHECK(line(weir::breaker_changed{.operation = "router",
                                   .from = weir::breaker_state::closed,
                                   .to = weir::breaker_state::closed,
                                   .policy = "openai"}) ==
        "router: circuit breaker closed (openai)");
  CHECK(line(weir::model_call_ended{.operation = "chat",
                                    .provider = "a",
                                    .model = "m",
                                    .error_type = "429",
                                    .duration = 1500us}) == "chat: a/m 429 in 1.5 ms");
  CHECK(
      line(weir::model_call_ended{
          .operation = {}, .provider = "a", .model = "m", .duration = 20ms, .input_tokens = 120}) ==
      "call: a/m answered in 20.0 ms, 120 in + 0 out tokens");
}

TEST_CASE("fan_out hands every event to each observer in turn; a traced line ends with its ids",
          "[events][trace]") {
  std::vector<std::string> heard;
  const auto writing_as = [&heard](std::string who) {
    return [&heard, who](const weir::event& e) { heard.push_back(fmt::format("{} {}", who, e)); };
  };
  const weir::observer both = weir::fan_out(writing_as("first"), writing_as("second"));
  both(weir::attempt_started{.operation = "chat"});
  both(weir::hedge_started{.operation = {}, .attempt = 1, .after = 250ms});
  CHECK(heard == std::vector<std::string>{
                     "first chat: attempt 1 started", "second chat: attempt 1 started",
                     "first call: hedge 1 after 250.0 ms", "second call: hedge 1 after 250.0 ms"});

  // The ids in lowercase hex, the span's only when the event belongs to an attempt.
  weir::trace_ids ids;
  ids.trace.fill(0xab);
  std::string hexes;
  for (int i = 0; i < 16; ++i) hexes += "ab";
  CHECK(fmt::format("{}", weir::event{weir::fleet_connection{
                              .operation = {}, .reachable = true, .trace = ids}}) ==
        "call: the fleet is reachable again trace_id=" + hexes);
  ids.span.fill(0x0f);
  CHECK(fmt::format("{}", weir::event{weir::attempt_started{.operation = "chat", .trace = ids}}) ==
        "chat: attempt 1 started trace_id=" + hexes + " span_id=0f0f0f0f0f0f0f0f");
}
