// The vocabulary that lets policies judge a call without knowing HTTP: an outcome (value, error
// code or exception), the server's rate-limit hint, and the classifier's verdict.
#pragma once

#include <weir/core/error.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/multiple_exceptions.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace weir {

// How a server gives a limit back, which decides what "nothing left until the reset" means.
enum class refill {
  unknown,       // read as fixed_window: the cautious reading
  continuous,    // a token bucket: one unit comes back every window / limit (OpenAI, Anthropic)
  fixed_window,  // everything comes back at once at the reset (many X-RateLimit-* APIs)
};

// One dimension of a server's limit as it reported it (e.g. requests or tokens per minute).
struct limit_snapshot {
  std::optional<std::int64_t> limit{};
  std::optional<std::int64_t> remaining{};
  std::optional<std::chrono::nanoseconds> reset_after{};  // until the window is full again
  // The period `limit` is per, when the server said so (the IETF policy's w). A limit reported
  // without one says nothing about its period: weir never assumes a minute.
  std::optional<std::chrono::nanoseconds> window{};
  weir::refill refill = refill::unknown;
  // The reset was rounded up to a whole number of these (a second, for resets sent as delta or
  // epoch seconds or an HTTP-date): the window may open up to this much sooner.
  std::optional<std::chrono::nanoseconds> reset_rounded_to{};
  // The reset was sent as a moment (epoch seconds, a date), not a delay: every answer in one
  // window names the same moment, whenever it was sent and however long it travelled.
  bool reset_is_instant = false;
  // The reset was written to within this much (a millisecond for OpenAI's: "12ms" is 11 to 13
  // ms, however it was rounded): a reset of a few of these says little of the window.
  std::optional<std::chrono::nanoseconds> reset_precision{};

  bool empty() const noexcept { return !limit && !remaining && !reset_after && !window; }
  // The server said this dimension has nothing left.
  bool exhausted() const noexcept { return remaining && *remaining == 0; }

  // How long until the next unit is there when nothing is left: the whole reset for a fixed
  // window; for a continuously refilling limit one unit's share of it (reset / limit), since the
  // reset is the time until the limit is *full* again. nullopt when the reset is unknown. A reset
  // rounded up is an upper bound: the earliest the window can open is one rounding sooner (a
  // server that says "1" of a window that opens in 30 ms would otherwise cost a whole second).
  std::optional<std::chrono::nanoseconds> next_unit_after() const noexcept {
    if (!reset_after) return std::nullopt;
    if (refill == refill::continuous && limit && *limit > 0)
      return std::chrono::nanoseconds(reset_after->count() / *limit);
    if (reset_rounded_to)
      return std::max(std::chrono::nanoseconds::zero(), *reset_after - *reset_rounded_to);
    return reset_after;
  }

  friend bool operator==(const limit_snapshot&, const limit_snapshot&) = default;
};

// Everything a response said about when to come back and how much room is left.
struct rate_limit_hint {
  std::optional<std::chrono::nanoseconds> retry_after{};
  limit_snapshot requests{};
  limit_snapshot tokens{};
  limit_snapshot input_tokens{};
  limit_snapshot output_tokens{};

  bool empty() const noexcept {
    return !retry_after && requests.empty() && tokens.empty() && input_tokens.empty() &&
           output_tokens.empty();
  }
  // Some dimension has nothing left: a refusal is about the whole quota, not one request.
  bool exhausted() const noexcept {
    return requests.exhausted() || tokens.exhausted() || input_tokens.exhausted() ||
           output_tokens.exhausted();
  }
  // When the quota has room again: the longest wait among the exhausted dimensions and the
  // Retry-After (nullopt when nothing is exhausted).
  std::optional<std::chrono::nanoseconds> exhausted_for() const noexcept {
    if (!exhausted()) return std::nullopt;
    auto wait = retry_after.value_or(std::chrono::nanoseconds::zero());
    for (const auto* s : {&requests, &tokens, &input_tokens, &output_tokens})
      if (s->exhausted()) wait = std::max(wait, s->next_unit_after().value_or(wait));
    return wait;
  }
  friend bool operator==(const rate_limit_hint&, const rate_limit_hint&) = default;
};

// What a classifier decided about one outcome.
enum class verdict {
  success,       // done; hand the value to the caller
  retryable,     // a transient failure; trying again may succeed
  rate_limited,  // the server (or a limiter) asked us to slow down; the hint says how long
  fatal,         // trying again cannot help (bad request, cancellation, ...)
  exhausted,     // a quota or the account's credit is spent: nothing passes until it resets or is
                 // paid for, so it is never retried (the reason says which and when)
};

// What a refusal said beyond its status, read from the provider's error body.
enum class refusal_cause : std::uint8_t {
  none,
  overloaded,  // the provider is short of capacity for everyone: retryable, a sign to send less
  quota,       // a per-period quota is spent: it comes back at the period's reset
  billing,     // the account's credit or spend limit is spent: it comes back when someone pays
               // (or, for a monthly limit, with the month)
};

// The dialect of the error body that said so.
enum class provider_shape : std::uint8_t { unknown, openai, anthropic, gemini, groq, openrouter };

// Why a server refused, when its body said more than "slow down". Never holds body text: `code`
// is one of weir's literals naming the provider's short code ("insufficient_quota").
struct refusal_reason {
  refusal_cause cause = refusal_cause::none;
  provider_shape shape = provider_shape::unknown;
  std::string_view code{};
  // From the answer until the quota comes back, where the provider's rule says (Gemini's per-day
  // quotas at midnight Pacific); nullopt when nothing but payment brings it back, or unknown.
  std::optional<std::chrono::nanoseconds> resets_after{};

  friend bool operator==(const refusal_reason&, const refusal_reason&) = default;
};

namespace detail {
inline const char* name_of(refusal_cause c) {
  switch (c) {
    case refusal_cause::none: return "none";
    case refusal_cause::overloaded: return "overloaded";
    case refusal_cause::quota: return "quota exhausted";
    case refusal_cause::billing: return "credit exhausted";
  }
  return "?";
}
inline const char* name_of(provider_shape s) {
  switch (s) {
    case provider_shape::unknown: return "unknown";
    case provider_shape::openai: return "openai";
    case provider_shape::anthropic: return "anthropic";
    case provider_shape::gemini: return "gemini";
    case provider_shape::groq: return "groq";
    case provider_shape::openrouter: return "openrouter";
  }
  return "?";
}
}  // namespace detail

struct classification {
  verdict kind = verdict::success;
  rate_limit_hint hint{};
  refusal_reason reason{};
  // The HTTP status answered; 0 when none was (a transport error, an error inside a stream).
  unsigned status = 0;

  bool is_success() const noexcept { return kind == verdict::success; }
  bool is_failure() const noexcept { return kind != verdict::success; }
};

// A failure that carries its own judgement, for what a client throws instead of returning it as
// a value: an HTTP error status met before a stream's first chunk (weir::http::status_error),
// with the hint its headers gave. Every weir classifier judges it as it says.
class judged_failure : public std::runtime_error {
 public:
  judged_failure(classification judged, const std::string& what)
      : std::runtime_error(what), judged_(judged) {}
  const classification& judged() const noexcept { return judged_; }

 private:
  classification judged_;
};

// A value that carries what its response's headers said (a weir::stream: the headers came
// before its first chunk), so a classifier can hand the limits and what remains of them to the
// pacing as it does for a whole response.
template <class T>
concept carries_server_hint = !std::is_void_v<T> && requires(const T& v) {
  { v.server_hint() } -> std::convertible_to<rate_limit_hint>;
};

// A value that carries its own judgement (weir::curl::response: an HTTP answer judged by its
// status and headers), so that the default classifier fails a 429 without being told how to read
// one. A classifier of the caller's own still decides as it likes.
template <class T>
concept carries_judgement = !std::is_void_v<T> && requires(const T& v) {
  { v.judged() } -> std::convertible_to<classification>;
};

// A cancellation as Asio reports it: operation_aborted, or errc::operation_canceled.
inline bool is_cancellation(const error_code& ec) noexcept {
  return ec == boost::asio::error::operation_aborted ||
         ec == boost::system::errc::operation_canceled;
}

inline bool is_cancellation(const std::exception_ptr& e) {
  if (!e) return false;
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return is_cancellation(x.code());
  } catch (const boost::asio::multiple_exceptions& x) {
    return is_cancellation(x.first_exception());
  } catch (...) {
    return false;
  }
}

// The codes only weir's own policies produce, before a call is sent.
inline bool is_local_refusal(const error_code& ec) noexcept {
  return ec == error::queue_full || ec == error::circuit_open || ec == error::shut_down ||
         ec == error::evicted || ec == error::over_budget;
}

// What came back from one call: a value, an error_code or an exception. `outcome<void>` holds
// std::monostate in place of a value.
template <class T>
class outcome {
 public:
  using value_type = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

  static outcome from_value(value_type value) {
    return outcome(std::in_place_index<0>, std::move(value));
  }
  static outcome from_error(error_code ec) { return outcome(std::in_place_index<1>, ec); }
  static outcome from_exception(std::exception_ptr e) {
    return outcome(std::in_place_index<2>, std::move(e));
  }

  bool has_value() const noexcept { return state_.index() == 0; }
  bool has_error() const noexcept { return state_.index() == 1; }
  bool has_exception() const noexcept { return state_.index() == 2; }

  value_type& value() & { return std::get<0>(state_); }
  const value_type& value() const& { return std::get<0>(state_); }
  const error_code& error() const { return std::get<1>(state_); }
  const std::exception_ptr& exception() const { return std::get<2>(state_); }

  // The value, or the failure thrown: the exception as it was, an error_code as a system_error.
  value_type get() && {
    if (has_error()) throw boost::system::system_error(error());
    if (has_exception()) std::rethrow_exception(exception());
    return std::move(value());
  }

  // Whether the call was cancelled (operation_aborted or operation_canceled, as an error code, a
  // system_error, or the first of Asio's multiple_exceptions): such an outcome says nothing about
  // the provider.
  bool cancelled() const {
    if (has_error()) return is_cancellation(error());
    if (!has_exception()) return false;
    return is_cancellation(exception());
  }

  // Whether a weir policy refused the call before it was sent (see exception::refusal): queue
  // full, circuit open, shut down, or a limiter's refusal.
  bool refused_locally() const {
    if (has_error()) return is_local_refusal(error());
    if (!has_exception()) return false;
    try {
      std::rethrow_exception(exception());
    } catch (const weir::exception& x) {
      return x.refused_locally() || is_local_refusal(x.code());
    } catch (const boost::system::system_error& x) {
      return is_local_refusal(x.code());
    } catch (...) {
      return false;
    }
  }

  // Neither a cancellation nor a local refusal: the provider answered (or failed to).
  bool reached_provider() const { return !cancelled() && !refused_locally(); }

  // The failure's error code: the error, or a system_error's (so a weir::exception's) code;
  // empty for a value or for another exception.
  error_code code() const {
    if (has_error()) return error();
    if (!has_exception()) return {};
    try {
      std::rethrow_exception(exception());
    } catch (const boost::system::system_error& x) {
      return x.code();
    } catch (...) {
      return {};
    }
  }

  // The failure as an exception_ptr (empty for a value), for attaching as a cause.
  std::exception_ptr failure() const {
    if (has_exception()) return exception();
    if (has_error()) return std::make_exception_ptr(boost::system::system_error(error()));
    return {};
  }

 private:
  template <std::size_t I, class Arg>
  outcome(std::in_place_index_t<I> index, Arg&& arg) : state_(index, std::forward<Arg>(arg)) {}

  std::variant<value_type, error_code, std::exception_ptr> state_;
};

// A classifier turns an outcome into a verdict, like Polly's ShouldHandle predicate.
template <class C, class T>
concept classifier_for = requires(const C& c, const outcome<T>& o) {
  { c(o) } -> std::convertible_to<classification>;
};

// The classifier used when none is given: values succeed, unless they carry their own judgement
// (carries_judgement: a response that says 429 is rate-limited); cancellation and weir's own
// rejections (queue full, budget spent, ...) are fatal, since repeating them only adds load;
// a weir::rate_limited or circuit_open failure is rate-limited with its retry_after; any other
// error or exception is retryable. HTTP-aware classifiers live in weir/http.
struct default_classifier {
  template <class T>
  classification operator()(const outcome<T>& o) const {
    if (o.has_value()) {
      if constexpr (carries_judgement<T>) return o.value().judged();
      if constexpr (carries_server_hint<T>) return {verdict::success, o.value().server_hint()};
      return {};
    }
    if (o.has_error()) return classify(o.error(), std::nullopt);
    return classify(o.exception());
  }

  static classification classify(const error_code& ec,
                                 std::optional<std::chrono::nanoseconds> retry_after) {
    classification c;
    c.hint.retry_after = retry_after;
    if (is_cancellation(ec)) {
      c.kind = verdict::fatal;
    } else if (ec.category() == error_category()) {
      switch (static_cast<error>(ec.value())) {
        case error::rate_limited:
        case error::circuit_open: c.kind = verdict::rate_limited; break;
        case error::timeout: c.kind = verdict::retryable; break;
        default: c.kind = verdict::fatal; break;
      }
    } else {
      c.kind = verdict::retryable;
    }
    return c;
  }

  static classification classify(const std::exception_ptr& e) {
    try {
      std::rethrow_exception(e);
    } catch (const weir::exception& x) {
      // Retries that ran out failed as their last attempt did: a breaker outside the retry
      // counts a call whose every attempt failed as a failure, not as a weir error.
      // So does a stream that broke after its first chunk: a reset mid-stream is the provider's
      // failure (nothing can retry it: the stream was delivered).
      if ((x.code() == error::retries_exhausted || x.code() == error::stream_broken) && x.cause()) {
        auto c = classify(x.cause());
        if (x.retry_after()) c.hint.retry_after = x.retry_after();
        return c;
      }
      return classify(x.code(), x.retry_after());
    } catch (const judged_failure& x) {
      return x.judged();
    } catch (const boost::system::system_error& x) {
      return classify(x.code(), std::nullopt);
    } catch (const boost::asio::multiple_exceptions& x) {
      return classify(x.first_exception());
    } catch (...) {
      return {verdict::retryable, {}};
    }
  }
};

// Whether a classifier calls every value a success, so that a policy may hand a value straight
// back without building an outcome (a saving on every successful call). Specialise it for your
// own classifiers that never fail a value; a value that carries_judgement is judged all the same.
template <class Classifier>
inline constexpr bool every_value_succeeds = false;
template <>
inline constexpr bool every_value_succeeds<default_classifier> = true;

// Whether `Classifier` calls every value of type T a success.
template <class Classifier, class T>
inline constexpr bool every_value_of_succeeds =
    every_value_succeeds<Classifier> && !carries_judgement<T>;

static_assert(classifier_for<default_classifier, int>);
static_assert(classifier_for<default_classifier, void>);

namespace detail {
template <class T>
struct awaitable_value;
template <class T, class Executor>
struct awaitable_value<boost::asio::awaitable<T, Executor>> {
  using type = T;
};
}  // namespace detail

// The T of an asio::awaitable<T>.
template <class Awaitable>
using awaitable_value_t = typename detail::awaitable_value<std::remove_cvref_t<Awaitable>>::type;

// Awaits `op` and captures whatever it produced, value or exception, as an outcome.
template <class T, class Executor>
boost::asio::awaitable<outcome<T>, Executor> capture(boost::asio::awaitable<T, Executor> op) {
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(op);
      co_return outcome<T>::from_value({});
    } else {
      co_return outcome<T>::from_value(co_await std::move(op));
    }
  } catch (...) {
    co_return outcome<T>::from_exception(std::current_exception());
  }
}

}  // namespace weir
