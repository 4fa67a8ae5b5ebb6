// Judging any HTTP client's response from its status and its header pairs, with no HTTP library
// needed: libcurl's headers collected by a header callback, cpr's, a gateway's. Beast's responses
// go through the same rule (beast.hpp).
//
//     std::vector<std::pair<std::string, std::string>> headers = ...;  // as the client gave them
//     auto judged = weir::http::judge_status(status, headers);
//     // judged.kind: success, retryable, rate_limited, exhausted or fatal;
//     // judged.hint: Retry-After, limits; judged.reason: a quota or credit spent, an overload
#pragma once

#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/http/hints.hpp>
#include <weir/http/refusals.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace weir::http {

// Every rate-limit header among `headers`, a range of name/value pairs (anything with `first`
// and `second` that convert to std::string_view), merged (see hints.hpp).
template <class Headers>
hint_parser read_header_pairs(const Headers& headers, std::chrono::system_clock::time_point now =
                                                          std::chrono::system_clock::now()) {
  hint_parser parser(now);
  for (const auto& [name, value] : headers)
    parser.add(std::string_view(name), std::string_view(value));
  return parser;
}

// The rule, from the status and what the body says (refusals.hpp), before x-should-retry:
//   2xx (and 1xx, 3xx)      success
//   a quota or credit spent exhausted, never retried (OpenAI insufficient_quota, Anthropic
//                           billing, Gemini per-day quota, 402): reason says whose, when it resets
//   429                     rate_limited, with the parsed hint
//   408, 409, 5xx, 498      retryable (a hint, e.g. Retry-After on a 503, is kept); the reason
//                           says overloaded for Anthropic 529, Groq 498, OpenAI 503 Slow Down
//   other 4xx               fatal, unless listed in `retryable_statuses`
// x-should-retry: true makes any failure but exhausted retryable (a 429 stays rate_limited);
// false makes it fatal. `body` is read for the refusal and for Gemini's retryDelay on a 429
// without Retry-After; nothing of it is kept but weir's name for the provider's short code.
inline classification judge_status(unsigned status, const hint_parser& parsed,
                                   std::string_view body = {},
                                   std::span<const unsigned> retryable_statuses = {}) {
  // Successes carry hints too (limits, remaining): that is how the limiter stops before a 429.
  if (status < 400) return {verdict::success, parsed.hint(), {}, status};
  classification c{verdict::fatal, parsed.hint(), read_refusal(status, body, parsed.now()), status};
  const auto cause = c.reason.cause;
  if (cause == refusal_cause::quota || cause == refusal_cause::billing) {
    c.kind = verdict::exhausted;
    return c;
  }
  if (status == 429) {
    c.kind = verdict::rate_limited;
    if (!c.hint.retry_after && !body.empty()) c.hint.retry_after = parse_gemini_retry_delay(body);
  } else if (status == 408 || status == 409 || status >= 500 ||
             cause == refusal_cause::overloaded ||
             std::find(retryable_statuses.begin(), retryable_statuses.end(), status) !=
                 retryable_statuses.end()) {
    c.kind = verdict::retryable;
  }
  if (auto should = parsed.should_retry()) {
    if (!*should)
      c.kind = verdict::fatal;
    else if (c.kind == verdict::fatal)
      c.kind = verdict::retryable;
  }
  return c;
}

// A response from any client: its status and its header pairs.
template <class Headers>
classification judge_status(
    unsigned status, const Headers& headers, std::string_view body = {},
    std::span<const unsigned> retryable_statuses = {},
    std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) {
  return judge_status(status, read_header_pairs(headers, now), body, retryable_statuses);
}

// Whether an error response says the prompt did not fit the model's context window, as OpenAI
// ("context_length_exceeded"), Anthropic ("prompt is too long") and OpenAI-compatible servers
// ("maximum context length") word it. For router_options::context_exceeded.
inline bool context_length_exceeded(unsigned status, std::string_view body) {
  if (status != 400 && status != 413) return false;
  for (std::string_view marker :
       {"context_length_exceeded", "prompt is too long", "maximum context length"})
    if (body.find(marker) != std::string_view::npos) return true;
  return false;
}

namespace detail {
// ": overloaded (anthropic overloaded_error), resets in 9h12m", or nothing for no reason.
inline std::string describe_refusal(const refusal_reason& why) {
  if (why.cause == refusal_cause::none) return {};
  auto text = fmt::format(": {} ({} {})", weir::detail::name_of(why.cause),
                          weir::detail::name_of(why.shape), why.code);
  if (why.resets_after)
    text +=
        fmt::format(", resets in {}s",
                    std::chrono::duration_cast<std::chrono::seconds>(*why.resets_after).count());
  return text;
}

// The status a provider answers an error of this type or code with when it can still choose one
// (before a stream's headers): OpenAI's and Anthropic's documented types and codes; a number
// between 400 and 599 (OpenRouter's code) is the status itself.
inline std::optional<unsigned> status_of_error_type(std::string_view type) {
  static constexpr std::pair<std::string_view, unsigned> known[] = {
      {"invalid_request_error", 400}, {"authentication_error", 401},
      {"permission_error", 403},      {"not_found_error", 404},
      {"request_too_large", 413},     {"rate_limit_error", 429},
      {"rate_limit_exceeded", 429},   {"insufficient_quota", 429},
      {"billing_error", 402},         {"api_error", 500},
      {"server_error", 500},          {"slow_down", 503},
      {"timeout_error", 504},         {"overloaded_error", 529}};
  for (const auto& [name, status] : known)
    if (type == name) return status;
  if (type.size() == 3 && type >= "400" && type <= "599" &&
      std::all_of(type.begin(), type.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return static_cast<unsigned>(std::stoul(std::string(type)));
  return std::nullopt;
}
}  // namespace detail

// An error the server sent inside a stream that had begun with a 200 (OpenAI's
// `data: {"error":...}`, Anthropic's `event: error`), judged as the answer with the status its
// type stands for would be (judge_status): before the stream's first chunk it fails the call,
// after it breaks the stream. Its message names the type and the verdict, never the server's
// message, which may quote the request.
class stream_error : public judged_failure {
 public:
  stream_error(std::string_view type, classification judged)
      : judged_failure(judged, fmt::format("the stream sent an error event ({}): {}{}", type,
                                           weir::detail::name_of(judged.kind),
                                           detail::describe_refusal(judged.reason))) {}

  // Judges `error`, the JSON the event carried (`{"error":{"type":...}}` or Anthropic's
  // `{"type":"error","error":{...}}`), by the first type or code in it that the providers
  // document (detail::status_of_error_type); one of no known type as a server error (500,
  // retryable).
  static stream_error from(std::string_view error, std::chrono::system_clock::time_point now =
                                                       std::chrono::system_clock::now()) {
    std::optional<unsigned> status;
    std::string_view type = "of an unknown type";
    for (std::string_view key : {"type", "code"}) {
      if (status) break;
      detail::for_each_json_value(error, key, [&](std::string_view value) {
        status = detail::status_of_error_type(value);
        if (status) type = value;
        return status.has_value();
      });
    }
    auto judged = judge_status(status.value_or(500), hint_parser(now), error);
    judged.status = 0;  // the server answered 200: the request was counted as any other
    return stream_error(type, judged);
  }
};

// An HTTP error status a client throws instead of returning, as a stream does for a status that
// comes before its first chunk: judged by judge_status from the response's headers and body (a
// 429's Retry-After is the hint), so retry, breaker and router treat it as they would the
// response. Its message names the status and the refusal's reason only: never a body, which may
// quote the request.
class status_error : public judged_failure {
 public:
  status_error(unsigned status, classification judged, bool context_exceeded = false)
      : judged_failure(judged, describe(status, judged.reason)),
        status_(status),
        context_exceeded_(context_exceeded) {}

  // From the status, the response's header pairs and its body (read for Gemini's retryDelay and
  // for a context overflow, kept by neither).
  template <class Headers>
  static status_error from(unsigned status, const Headers& headers, std::string_view body = {}) {
    return status_error(status, judge_status(status, headers, body),
                        context_length_exceeded(status, body));
  }

  unsigned status() const noexcept { return status_; }
  // The server said the prompt does not fit the model's context window (for the router's
  // context_exceeded).
  bool context_exceeded() const noexcept { return context_exceeded_; }

 private:
  // "HTTP status 429: quota exhausted (gemini RESOURCE_EXHAUSTED), resets in 9h12m"
  static std::string describe(unsigned status, const refusal_reason& why) {
    return "HTTP status " + std::to_string(status) + detail::describe_refusal(why);
  }

  unsigned status_;
  bool context_exceeded_;
};

}  // namespace weir::http
