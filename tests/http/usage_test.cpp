// Specifications of weir/http/usage.hpp: the usage a response body reports.
#include "../support/http.hpp"

TEST_CASE("the usage a response body reports, in OpenAI's and Anthropic's forms", "[http][usage]") {
  using weir::http::reported_usage;
  const auto openai = reported_usage(
      R"({"id":"x","choices":[{"message":{"content":"\"prompt_tokens\": 999"}}],)"
      R"("usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46,)"
      R"( "prompt_tokens_details": {"cached_tokens": 0}}})");
  REQUIRE(openai);
  CHECK(openai->input_tokens == 12);
  CHECK(openai->output_tokens == 34);
  const auto anthropic = reported_usage(
      R"({"content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":7,"output_tokens":3}})");
  REQUIRE(anthropic);
  CHECK(anthropic->input_tokens == 7);
  CHECK(anthropic->output_tokens == 3);
  CHECK_FALSE(reported_usage(R"({"error":{"message":"rate limited"}})"));
  CHECK_FALSE(reported_usage(R"({"usage": {"prompt_tokens": "many"}})"));
  CHECK_FALSE(reported_usage(""));
}

TEST_CASE("an absurd reported usage is clamped, and estimates that would wrap saturate",
          "[http][usage][issue36]") {
  const auto used = weir::http::reported_usage(
      R"({"usage":{"prompt_tokens":1000000000000,"completion_tokens":5}})");
  REQUIRE(used);
  CHECK(used->input_tokens == weir::http::max_reported_tokens);
  CHECK(used->output_tokens == 5);

  weir::call_context huge{.input_tokens = 1ull << 63, .output_tokens = 1ull << 63};
  CHECK(huge.estimated_usage().tokens == UINT64_MAX);  // not 0, which would pass any limit
  huge.actual_input_tokens = UINT64_MAX;
  huge.actual_output_tokens = 2;
  CHECK(huge.actual_usage(huge.estimated_usage()).tokens == UINT64_MAX);
}

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

TEST_CASE("header values are checked at the boundary: control characters refused, by name",
          "[http][issue36]") {
  using weir::http::check_header;
  CHECK_NOTHROW(check_header("t", "authorization", "Bearer sk-1\tok é"));
  for (const std::string& bad : {std::string("k\r\nX-Evil: 1"), std::string("k\n"),
                                 std::string("k\r"), std::string("k\0", 2), std::string("k\x7f")}) {
    try {
      check_header("t", "x-api-key", bad);
      FAIL("taken");
    } catch (const weir::exception& e) {
      CHECK(e.code() == weir::error::invalid_argument);
      CHECK(std::string(e.what()).find("x-api-key") != std::string::npos);
      CHECK(std::string(e.what()).find("Evil") == std::string::npos);
    }
  }
  CHECK_THROWS_AS(check_header("t", "x api key", "v"), weir::exception);
  CHECK_THROWS_AS(check_header("t", "", "v"), weir::exception);
}

TEST_CASE("cached input is read from both dialects, within the input tokens",
          "[http][usage][cache]") {
  using weir::http::reported_usage;
  // OpenAI: prompt_tokens already count the cached ones.
  const auto openai = reported_usage(
      R"({"id":"chatcmpl-1","object":"chat.completion","usage":{"prompt_tokens":2006,)"
      R"("completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":)"
      R"({"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":)"
      R"({"reasoning_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}})");
  REQUIRE(openai);
  CHECK(openai->input_tokens == 2006);
  CHECK(openai->cache_read_tokens == 1920);
  CHECK(openai->cache_write_tokens == 0);
  CHECK(openai->output_tokens == 300);
  // Anthropic: input_tokens are only those after the last cache breakpoint.
  const auto anthropic =
      reported_usage(R"({"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],)"
                     R"("usage":{"input_tokens":21,"cache_creation_input_tokens":188,)"
                     R"("cache_read_input_tokens":1800,"output_tokens":393}})");
  REQUIRE(anthropic);
  CHECK(anthropic->input_tokens == 21 + 188 + 1800);
  CHECK(anthropic->cache_read_tokens == 1800);
  CHECK(anthropic->cache_write_tokens == 188);
  CHECK(anthropic->output_tokens == 393);
  // OpenAI's Responses API: input_tokens_details.cached_tokens, within input_tokens.
  const auto responses =
      reported_usage(R"({"object":"response","usage":{"input_tokens":3000,"input_tokens_details":)"
                     R"({"cached_tokens":2048},"output_tokens":50,"total_tokens":3050}})");
  REQUIRE(responses);
  CHECK(responses->input_tokens == 3000);
  CHECK(responses->cache_read_tokens == 2048);
  // A claim of more cached tokens than the prompt had is held to the prompt.
  const auto odd = reported_usage(R"({"usage":{"prompt_tokens":10,"completion_tokens":1,)"
                                  R"("prompt_tokens_details":{"cached_tokens":99}}})");
  REQUIRE(odd);
  CHECK(odd->cache_read_tokens == 10);
}

TEST_CASE("streamed usage carries the cached input: OpenAI's last chunk, Anthropic's events",
          "[http][usage][cache]") {
  namespace sse = weir::http::sse;
  const auto feed = [](auto tally_of, std::string_view bytes) {
    sse::parser p;
    p.feed(bytes);
    weir::stream_tally tally;
    while (auto e = p.next()) tally_of(*e, tally);
    return tally;
  };
  const auto openai =
      feed(sse::openai_tally,
           R"(data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}

data: {"id":"c1","choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":3,"total_tokens":2009,"prompt_tokens_details":{"cached_tokens":1920}}}

data: [DONE]

)");
  CHECK(openai.reported_input_tokens == 2006u);
  CHECK(openai.reported_cache_read_tokens == 1920u);
  CHECK(openai.reported_output_tokens == 3u);

  const auto anthropic = feed(sse::anthropic_tally, R"(event: message_start
data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":1800,"output_tokens":1}}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}

)");
  CHECK(anthropic.reported_input_tokens == 1925u);
  CHECK(anthropic.reported_cache_read_tokens == 1800u);
  CHECK(anthropic.reported_cache_write_tokens == 100u);
  CHECK(anthropic.reported_output_tokens == 15u);

  weir::call_context call{.input_tokens = 2000, .output_tokens = 100};
  anthropic.settle_into(call);
  CHECK(call.actual_input_tokens == 1925u);
  CHECK(call.actual_cache_read_tokens == 1800u);
  CHECK(call.actual_cache_write_tokens == 100u);
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
