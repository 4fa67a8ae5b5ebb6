// Judging Boost.Beast responses: a classifier for retry, breaker and router, and the hint parser
// fed from a response's fields.
//
//     using beast_retry = weir::retry<std::chrono::steady_clock, weir::http::response_classifier>;
//     beast_retry retry({.max_attempts = 4});
//     auto res = co_await retry([&] { return exchange(stream, req); });  // a Beast response
#pragma once

#include <weir/core/outcome.hpp>
#include <weir/http/classify.hpp>
#include <weir/http/hints.hpp>

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

// Beast's responses judged by the status-code rule of classify.hpp (judge_status), with the
// hints of every field; a string body is read for Gemini's retryDelay on a 429.
struct response_classifier {
  std::vector<unsigned> retryable_statuses{};  // extra 4xx statuses worth retrying

  template <class Body, class Fields>
  classification judge(
      const beast_http::response<Body, Fields>& res,
      std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) const {
    std::string_view body;
    if constexpr (std::is_same_v<Body, beast_http::string_body>) body = res.body();
    return judge_status(res.result_int(), read_hints(res.base(), now), body, retryable_statuses);
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

template <class Fields>
bool context_length_exceeded(const beast_http::response<beast_http::string_body, Fields>& res) {
  return context_length_exceeded(res.result_int(), res.body());
}

}  // namespace weir::http
