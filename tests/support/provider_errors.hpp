// Error bodies as the providers document them (OpenAI, Anthropic, Gemini, Groq, OpenRouter), for
// the tests of judge_status and of the router. Words of a prompt stand in the messages that may
// quote one: no error or event may show them.
#pragma once

#include <string_view>

namespace weir_test::provider_errors {

constexpr std::string_view openai_insufficient_quota = R"({
  "error": {
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota",
    "param": null,
    "code": "insufficient_quota"
  }
})";
constexpr std::string_view openai_rate_limit = R"({"error": {
  "message": "Rate limit reached for gpt-4o on requests per min (RPM): Limit 500, Used 500.",
  "type": "requests", "param": null, "code": "rate_limit_exceeded"}})";
constexpr std::string_view openai_slow_down = R"({"error": {"message": "Slow Down",
  "type": "service_unavailable_error", "code": "slow_down"}})";
constexpr std::string_view anthropic_billing = R"({"type": "error", "error": {"type":
  "billing_error", "message": "There is an issue with your billing: the secret plan"},
  "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})";
constexpr std::string_view anthropic_credit_low = R"({"type":"error","error":{
  "type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic
  API. Please go to Plans & Billing to upgrade or purchase credits."}})";
constexpr std::string_view anthropic_spend_limit = R"({"type": "error", "error": {
  "type": "rate_limit_error", "message": "You have reached your monthly spend limit.",
  "details": {"error_code": "enforced_spend_limit_reached"}}})";
constexpr std::string_view anthropic_overloaded =
    R"({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})";
constexpr std::string_view anthropic_rate_limit = R"({"type":"error","error":{
  "type":"rate_limit_error","message":"Number of request tokens has exceeded your rate limit"}})";
constexpr std::string_view gemini_per_day = R"({
  "error": {
    "code": 429,
    "message": "You exceeded your current quota. Please retry in 22.2s.",
    "status": "RESOURCE_EXHAUSTED",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
          {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"}
          },
          {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
            "quotaValue": "250"
          }
        ]
      },
      {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s"}
    ]
  }
})";
constexpr std::string_view gemini_per_minute = R"({"error": {"code": 429, "status":
  "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
  "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
  {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s"}]}})";
constexpr std::string_view groq_flex = R"({"error":{"message":"flex tier capacity exceeded",
  "type":"capacity_exceeded","code":"capacity_exceeded"}})";
constexpr std::string_view openrouter_credits = R"({"error": {"code": 402, "message":
  "Insufficient credits. Add more using https://openrouter.ai/credits", "metadata": {}}})";

}  // namespace weir_test::provider_errors
