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
