// What weir's HTTP clients (Beast's in client.hpp, curl's in curl.hpp) and the SSE parser accept:
// request headers that cannot smuggle in headers of their own, checked before anything is sent,
// and responses within limits the user sets. Passing a limit is weir::error::limit_exceeded,
// judged fatal (the same request would pass it again); its message names the limit, never what
// the server sent.
#pragma once

#include <weir/core/error.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cstddef>
#include <string_view>

namespace weir::http {

struct response_limits {
  std::size_t max_header_bytes = 64 * 1024;       // status line and headers, interim 1xx included
  std::size_t max_body_bytes = 16 * 1024 * 1024;  // a body read whole (a stream's is not)
  std::size_t max_sse_line_bytes = 1024 * 1024;   // one line of an event stream
  std::size_t max_sse_event_bytes = 4 * 1024 * 1024;  // one event's data
  // A whole exchange, a streamed body to its end included. A transfer nobody reads any more
  // ends by then.
  std::chrono::nanoseconds max_transfer_time = std::chrono::minutes(10);
};

namespace detail {

// Throws limit_exceeded: `who`'s `what` passed `limit` (bytes, or a time).
template <class Limit>
[[noreturn]] void limit_passed(std::string_view who, std::string_view what, const Limit& limit) {
  throw weir::exception(error::limit_exceeded, fmt::format("{}: {} passed {}", who, what, limit));
}

// A token (RFC 9110): what a header's name may hold.
constexpr bool is_token_char(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  return std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

// A field value may hold visible characters, spaces, tabs and bytes ≥ 0x80; no CR, LF, NUL or
// other control character (CR LF would end the header and start one of the sender's choosing).
constexpr bool is_field_value_char(char c) {
  const auto u = static_cast<unsigned char>(c);
  return u == '\t' || (u >= 0x20 && u != 0x7f);
}

}  // namespace detail

// Throws weir::exception(invalid_argument) when `name` is not a token or `value` holds a control
// character; the message names the header (a valid name only), never its value, which may be a
// key.
inline void check_header(std::string_view who, std::string_view name, std::string_view value) {
  bool name_ok = !name.empty();
  for (const char c : name) name_ok = name_ok && detail::is_token_char(c);
  if (!name_ok)
    throw weir::exception(error::invalid_argument,
                          fmt::format("{}: a header name is empty or not a token", who));
  for (const char c : value)
    if (!detail::is_field_value_char(c))
      throw weir::exception(
          error::invalid_argument,
          fmt::format("{}: the value of header {} holds a control character (CR, LF, NUL, ...)",
                      who, name));
}

}  // namespace weir::http
