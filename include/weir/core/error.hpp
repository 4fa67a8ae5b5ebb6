// weir's typed errors: an error_code enum for Asio completion signatures and a thin exception on
// top.
#pragma once

#include <fmt/format.h>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace weir {

using boost::system::error_code;

// Every way a weir policy can refuse or give up on a request.
enum class error {
  rate_limited = 1,       // a limiter (local or the server's) refused; see retry_after
  circuit_open,           // the circuit breaker rejects calls until its break ends
  queue_full,             // the request queue is at max_queued
  retries_exhausted,      // every allowed attempt failed; the last failure is attached
  no_provider_available,  // the router found no provider that can take the request
  timeout,                // a deadline passed before the operation completed
  budget_exhausted,       // the shared retry budget allows no more retries right now
  invalid_argument,       // a policy was configured or called with values that make no sense
  shut_down,              // the policy was shut down while the request waited
  unavailable,            // a shared store (e.g. Redis) the policy needs cannot be reached
  evicted,                // a full request_queue made room for a request of higher priority
  over_budget,            // the call's estimated cost would pass a spend budget; see retry_after
  stream_broken,          // a stream failed after its first chunk: the caller has partial output,
                          // so it is not retried; the cause says why
  limit_exceeded,         // a response passed a limit its client sets (headers, body, an SSE line
                          // or event, transfer time): the same request would again, so it is fatal
};

}  // namespace weir

// Before anything converts a weir::error to an error_code.
template <>
struct boost::system::is_error_code_enum<weir::error> : std::true_type {};

template <>
struct std::is_error_code_enum<weir::error> : std::true_type {};

namespace weir {

namespace detail {

class error_category_impl final : public boost::system::error_category {
 public:
  constexpr error_category_impl() noexcept
      : boost::system::error_category(0x77656972'6572726full) {}

  const char* name() const noexcept override { return "weir"; }

  std::string message(int value) const override { return describe(value); }

  char const* message(int value, char* buffer, std::size_t size) const noexcept override {
    // Every message is a string literal, so the buffer is never needed.
    (void)buffer;
    (void)size;
    return describe(value);
  }

  static const char* describe(int value) noexcept {
    switch (static_cast<error>(value)) {
      case error::rate_limited: return "rate limited";
      case error::circuit_open: return "circuit breaker is open";
      case error::queue_full: return "request queue is full";
      case error::retries_exhausted: return "all retry attempts failed";
      case error::no_provider_available: return "no provider available";
      case error::timeout: return "operation timed out";
      case error::budget_exhausted: return "retry budget exhausted";
      case error::invalid_argument: return "invalid argument";
      case error::shut_down: return "policy was shut down";
      case error::unavailable: return "shared limiter unavailable";
      case error::evicted: return "evicted from the queue by a request of higher priority";
      case error::over_budget: return "spend budget exceeded";
      case error::stream_broken: return "stream broke after its first chunk (not retried)";
      case error::limit_exceeded: return "a response passed a limit the client sets";
    }
    return "unknown weir error";
  }
};

}  // namespace detail

// The category of every weir::error; compare codes with `ec == weir::error::timeout`.
inline const boost::system::error_category& error_category() noexcept {
  static constexpr detail::error_category_impl instance;
  return instance;
}

inline error_code make_error_code(error e) noexcept {
  return error_code(static_cast<int>(e), error_category());
}

// An exception for callers that prefer them to error codes. Besides the code it carries what
// the server said about when to come back, how many attempts were made, and the last
// underlying failure (an exception_ptr, which may itself hold a weir::exception).
class exception : public boost::system::system_error {
 public:
  explicit exception(error_code code, std::string detail = {},
                     std::optional<std::chrono::nanoseconds> retry_after = {},
                     std::exception_ptr cause = {}, unsigned attempts = 0)
      : boost::system::system_error(code, detail),
        retry_after_(retry_after),
        cause_(std::move(cause)),
        attempts_(attempts) {}

  explicit exception(error e, std::string detail = {},
                     std::optional<std::chrono::nanoseconds> retry_after = {},
                     std::exception_ptr cause = {}, unsigned attempts = 0)
      : exception(make_error_code(e), std::move(detail), retry_after, std::move(cause), attempts) {}

  // How long the server (or a local limiter) asked to wait before trying again, if it said.
  std::optional<std::chrono::nanoseconds> retry_after() const noexcept { return retry_after_; }

  // The failure that led to this one, e.g. the last attempt's error for retries_exhausted.
  const std::exception_ptr& cause() const noexcept { return cause_; }

  // The number of attempts made before giving up (0 when not applicable).
  unsigned attempts() const noexcept { return attempts_; }

  // A weir policy refused the call before it was sent (a full queue, an open circuit, a limiter
  // whose wait would pass the deadline): the provider never saw it, so no breaker, monitor or
  // pacing counts it as the provider's answer. A server's 429 is never a local refusal.
  static exception refusal(error e, std::string detail,
                           std::optional<std::chrono::nanoseconds> retry_after = {}) {
    exception x(e, std::move(detail), retry_after);
    x.local_ = true;
    return x;
  }
  static exception refusal(error_code code, std::string detail,
                           std::optional<std::chrono::nanoseconds> retry_after = {}) {
    exception x(code, std::move(detail), retry_after);
    x.local_ = true;
    return x;
  }
  bool refused_locally() const noexcept { return local_; }
  // This failure as a local refusal: e.g. a deadline that passed before the call was sent.
  exception as_refusal() const {
    exception x = *this;
    x.local_ = true;
    return x;
  }

 private:
  std::optional<std::chrono::nanoseconds> retry_after_;
  std::exception_ptr cause_;
  unsigned attempts_;
  bool local_ = false;
};

namespace detail {
// A duration as fmt/chrono.h writes it ("1500000000ns", "0.25s"), for the messages that name
// one: the common headers leave fmt/chrono.h out, which weighs on every program that includes
// them.
inline std::string duration_text(std::chrono::nanoseconds d) {
  return fmt::format("{}ns", d.count());
}
inline std::string duration_text(std::chrono::duration<double> d) {
  return fmt::format("{}s", d.count());
}

[[noreturn]] inline void throw_invalid_option(std::string_view who, std::string_view field,
                                              std::string_view value, std::string_view rule) {
  throw weir::exception(error::invalid_argument,
                        fmt::format("{}: {} is {}; it must {}", who, field, value, rule));
}

// A misconfiguration, named by its field and value as the catalog's messages are:
// "retry: max_attempts is 0; it must be at least 1". Only the value is formatted per type; the
// message is built once, out of the template.
template <class Value>
[[noreturn]] void invalid_option(std::string_view who, std::string_view field, const Value& value,
                                 std::string_view rule) {
  if constexpr (requires {
                  typename Value::rep;
                  typename Value::period;
                }) {
    // In seconds, as a person writes them: "-1s", "0.25s".
    throw_invalid_option(who, field, duration_text(std::chrono::duration<double>(value)), rule);
  } else {
    throw_invalid_option(who, field, fmt::format("{}", value), rule);
  }
}
}  // namespace detail

}  // namespace weir

template <>
struct fmt::formatter<weir::error> : fmt::formatter<fmt::string_view> {
  template <class FormatContext>
  auto format(weir::error e, FormatContext& ctx) const {
    return fmt::formatter<fmt::string_view>::format(
        weir::detail::error_category_impl::describe(static_cast<int>(e)), ctx);
  }
};
