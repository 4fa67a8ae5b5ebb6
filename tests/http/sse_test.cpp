// Specifications of weir/http/sse.hpp: the bounded SSE parser and in-band error events.
#include "../support/http.hpp"

TEST_CASE("the SSE parser's line and event are bounded: past them, limit_exceeded",
          "[http][sse][issue36]") {
  auto code_of = [](auto f) {
    try {
      f();
    } catch (const weir::exception& e) {
      return e.code();
    }
    return weir::error_code{};
  };
  const weir::http::response_limits limits{.max_sse_line_bytes = 1024, .max_sse_event_bytes = 4096};
  SECTION("one endless line, fed in pieces") {
    weir::http::sse::parser p(limits);
    CHECK(code_of([&] {
            for (int i = 0; i < 1000; ++i) p.feed(std::string(100, 'x'));
          }) == weir::error::limit_exceeded);
  }
  SECTION("an event of many short data lines") {
    weir::http::sse::parser p(limits);
    CHECK(code_of([&] {
            for (int i = 0; i < 1000; ++i) p.feed("data: " + std::string(100, 'x') + "\n");
          }) == weir::error::limit_exceeded);
  }
  SECTION("within the limits, events pass as before") {
    weir::http::sse::parser p(limits);
    p.feed("data: " + std::string(1000, 'x') + "\n\n");
    const auto e = p.next();
    REQUIRE(e);
    CHECK(e->data.size() == 1000);
  }
}

TEST_CASE("an error event inside a stream is told from content and judged by its type",
          "[http][sse][issue31]") {
  using weir::http::sse::event;
  const auto ev = [](std::string type, std::string data) {
    event e;
    e.type = std::move(type);
    e.data = std::move(data);
    return e;
  };
  using weir::verdict;
  struct row {
    event e;
    std::optional<verdict> judged;  // nullopt: not an error
  };
  const std::string gemini_per_day =
      R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":)"
      R"("type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":)"
      R"("GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}})";
  for (const auto& [e, judged] : {
           row{ev("message", R"({"error":{"type":"tokens","code":"rate_limit_exceeded"}})"),
               verdict::rate_limited},
           row{ev("message", R"(  {"error" : {"type":"server_error","code":null}})"),
               verdict::retryable},
           row{ev("message", R"({"error":{"type":"insufficient_quota"}})"), verdict::exhausted},
           row{ev("error", R"({"type":"error","error":{"type":"overloaded_error"}})"),
               verdict::retryable},
           row{ev("error", R"({"type":"error","error":{"type":"rate_limit_error"}})"),
               verdict::rate_limited},
           row{ev("error", R"({"type":"error","error":{"type":"invalid_request_error"}})"),
               verdict::fatal},
           row{ev("error", R"({"type":"error","error":{"type":"something_new"}})"),
               verdict::retryable},
           // OpenRouter's code is the status; Gemini's per-day quota is spent till midnight.
           row{ev("message", R"({"error":{"code":502,"message":"Provider returned error"}})"),
               verdict::retryable},
           row{ev("message", gemini_per_day), verdict::exhausted},
           // Content that mentions an error is content.
           row{ev("message", R"({"choices":[{"delta":{"content":"{\"error\": 1}"}}]})"),
               std::nullopt},
           row{ev("message", R"({"choices":[{"delta":{"content":"error"}}]})"), std::nullopt},
           row{ev("message", "[DONE]"), std::nullopt},
       }) {
    INFO(e.type << ": " << e.data);
    const auto failure = weir::http::sse::in_band_error(e);
    REQUIRE(bool(failure) == judged.has_value());
    if (!judged) continue;
    CHECK(weir::default_classifier{}(weir::outcome<int>::from_exception(failure)).kind == *judged);
  }
  const auto overloaded = weir::http::stream_error::from(
      R"({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})");
  CHECK(overloaded.judged().reason.cause == weir::refusal_cause::overloaded);
  CHECK(std::string(overloaded.what()).find("Overloaded") == std::string::npos);  // not the text

  using weir::http::sse::opens_answer;
  CHECK(opens_answer(ev("message_start", R"({"type":"message_start"})")));
  CHECK(
      opens_answer(ev("message", R"({"choices":[{"delta":{"role":"assistant","content":""}}]})")));
  CHECK(opens_answer(
      ev("message", R"({"choices":[{"delta":{"role":"assistant","content":null}}]})")));
  CHECK_FALSE(opens_answer(
      ev("message", R"({"choices":[{"delta":{"role":"assistant","content":"Hi"}}]})")));
  CHECK_FALSE(opens_answer(
      ev("message", R"({"choices":[{"delta":{"role":"assistant","tool_calls":[{"id":"c"}]}}]})")));
  CHECK_FALSE(opens_answer(ev("message", R"({"choices":[{"delta":{"content":""}}]})")));
  CHECK_FALSE(opens_answer(ev("content_block_delta", R"({"delta":{"text":"Hi"}})")));
}
