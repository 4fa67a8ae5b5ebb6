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
