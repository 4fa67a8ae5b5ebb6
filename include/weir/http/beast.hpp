// Judging Boost.Beast responses: a classifier for retry, breaker and router, and the hint parser
// fed from a response's fields.
//
//     using beast_retry = weir::retry<std::chrono::steady_clock, weir::http::response_classifier>;
//     beast_retry retry({.max_attempts = 4});
//     auto res = co_await retry([&] { return exchange(stream, req); });  // a Beast response
#pragma once

#include <weir/http/hints.hpp>
#include <weir/outcome.hpp>

#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>

#include <algorithm>
#include <chrono>
#include <string_view>
#include <type_traits>
#include <vector>

namespace weir::http {

namespace beast_http = boost::beast::http;

// Every rate-limit header of a response, merged (see hints.hpp).
template <class Fields>
hint_parser read_hints(const Fields& fields, std::chrono::system_clock::time_point now =
                                                 std::chrono::system_clock::now()) {
  hint_parser parser(now);
  for (const auto& field : fields) parser.add(field.name_string(), field.value());
  return parser;
}

// The status-code rule, before x-should-retry:
//   2xx (and 1xx, 3xx)   success
//   429                  rate_limited, with the parsed hint
//   408, 409, 5xx, 529   retryable (a hint, e.g. Retry-After on a 503, is kept)
//   other 4xx            fatal, unless listed in `retryable_statuses`
// x-should-retry: true makes any failure retryable (a 429 stays rate_limited); false makes it
// fatal.
struct response_classifier {
  std::vector<unsigned> retryable_statuses{};  // extra 4xx statuses worth retrying

  template <class Body, class Fields>
  classification judge(
      const beast_http::response<Body, Fields>& res,
      std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) const {
    const unsigned status = res.result_int();
    // Successes carry hints too (limits, remaining): that is how the limiter stops before a 429.
    const auto parsed = read_hints(res.base(), now);
    if (status < 400) return {verdict::success, parsed.hint()};
    classification c{verdict::fatal, parsed.hint()};
    if constexpr (std::is_same_v<Body, beast_http::string_body>) {
      if (status == 429 && !c.hint.retry_after)
        c.hint.retry_after = parse_gemini_retry_delay(res.body());
    }
    if (status == 429) {
      c.kind = verdict::rate_limited;
    } else if (status == 408 || status == 409 || status >= 500 ||
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

  // As a classifier: responses are judged by status and headers, errors and exceptions as
  // default_classifier does.
  template <class T>
  classification operator()(const outcome<T>& o) const {
    if constexpr (is_response<T>::value) {
      if (o.has_value()) return judge(o.value());
    }
    return default_classifier{}(o);
  }

 private:
  template <class T>
  struct is_response : std::false_type {};
  template <class Body, class Fields>
  struct is_response<beast_http::response<Body, Fields>> : std::true_type {};
};

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

template <class Fields>
bool context_length_exceeded(const beast_http::response<beast_http::string_body, Fields>& res) {
  return context_length_exceeded(res.result_int(), res.body());
}

}  // namespace weir::http
