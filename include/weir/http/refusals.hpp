// Reading a provider's error body for what its status cannot say: whether a refusal is a quota or
// the account's credit spent (no retry helps), or a provider short of capacity (retry, slower).
//
//     auto reason = weir::http::read_refusal(429, body);
//     // reason.cause: quota, billing, overloaded or none; reason.shape: whose body said so;
//     // reason.resets_after: when a spent quota comes back, where the provider's rule says
//
// The shapes read, as the providers document them:
//   OpenAI       429 {"error":{"type":"insufficient_quota",...}}          billing
//                503 "Slow Down" / code "slow_down"                        overloaded
//   Anthropic    402 (or any status) {"error":{"type":"billing_error"}}   billing
//                400 invalid_request_error "credit balance is too low"     billing
//                429 details.error_code "enforced_spend_limit_reached"    billing, till the 1st UTC
//                529 {"error":{"type":"overloaded_error"}}                 overloaded
//   Gemini       429 RESOURCE_EXHAUSTED, a QuotaFailure with a per-day     quota, midnight Pacific
//                quotaId (whatever its RetryInfo says)
//   Groq         498 capacity_exceeded (flex tier)                         overloaded
//   OpenRouter   402 {"error":{"code":402,...}}                            billing
#pragma once

#include <weir/core/outcome.hpp>

#include <chrono>
#include <string_view>

namespace weir::http {

namespace detail {

// The raw value after each `"key":` in a JSON text, in order: a string's content without its
// quotes (escapes left as they are), or a bare token (a number, true). Enough to compare with a
// provider's short codes; what it finds is never handed on.
template <class Visit>
void for_each_json_value(std::string_view json, std::string_view key, Visit&& visit) {
  std::size_t from = 0;
  while (from < json.size()) {
    const auto at = json.find(key, from);
    if (at == std::string_view::npos) return;
    from = at + key.size();
    // The key must be quoted: "key", not the tail of "other_key".
    if (at == 0 || json[at - 1] != '"' || from >= json.size() || json[from] != '"') continue;
    std::size_t i = from + 1;
    auto skip_space = [&] {
      while (i < json.size() &&
             (json[i] == ' ' || json[i] == '\t' || json[i] == '\n' || json[i] == '\r'))
        ++i;
    };
    skip_space();
    if (i >= json.size() || json[i] != ':') continue;
    ++i;
    skip_space();
    if (i >= json.size()) return;
    std::size_t end;
    if (json[i] == '"') {
      ++i;
      end = i;
      while (end < json.size() && json[end] != '"') end += json[end] == '\\' ? 2 : 1;
      if (end >= json.size()) return;  // unterminated
    } else {
      end = json.find_first_of(",}] \t\r\n", i);
      if (end == std::string_view::npos) end = json.size();
    }
    if (visit(json.substr(i, end - i))) return;
    from = end;
  }
}

// Whether some `"key": value` in `json` has exactly `value`.
inline bool json_has(std::string_view json, std::string_view key, std::string_view value) {
  bool found = false;
  for_each_json_value(json, key, [&](std::string_view v) { return found = v == value; });
  return found;
}

// US Pacific time's offset from UTC at `t`: daylight time (-7 h) from the second Sunday of March
// at 2:00 standard time to the first Sunday of November at 2:00 daylight time, else -8 h.
inline std::chrono::hours pacific_offset(std::chrono::system_clock::time_point t) {
  using namespace std::chrono;
  const year y = year_month_day(floor<days>(t)).year();
  const auto daylight_from = sys_days(y / March / Sunday[2]) + hours(10);
  const auto daylight_to = sys_days(y / November / Sunday[1]) + hours(9);
  return t >= daylight_from && t < daylight_to ? hours(-7) : hours(-8);
}

// The first midnight in US Pacific time after `now`, as a UTC instant.
inline std::chrono::system_clock::time_point next_pacific_midnight(
    std::chrono::system_clock::time_point now) {
  using namespace std::chrono;
  const auto offset = pacific_offset(now);
  const auto midnight = floor<days>(now + offset) + days(1);  // local
  const auto at = system_clock::time_point(midnight) - offset;
  // Daylight time may begin or end between now and that midnight (at 2:00 the morning before).
  const auto then = pacific_offset(at);
  return then == offset ? at : system_clock::time_point(midnight) - then;
}

// The first day of the month after `now`'s, 00:00 UTC.
inline std::chrono::system_clock::time_point next_month_utc(
    std::chrono::system_clock::time_point now) {
  using namespace std::chrono;
  const year_month_day today(floor<days>(now));
  const year_month next = year_month(today.year(), today.month()) + months(1);
  return sys_days(next / day(1));
}

inline std::chrono::nanoseconds until(std::chrono::system_clock::time_point from,
                                      std::chrono::system_clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(to - from);
}

}  // namespace detail

// What an error response's status and body say beyond "slow down": a spent quota or credit (see
// the table above), a provider short of capacity, or nothing (cause none). `now` is when the
// answer came, for the reset of a per-period quota. Reads at most what the table names; a body
// in any other shape (or none) leaves only what the status says (402 billing, 498 and 529
// overloaded).
inline refusal_reason read_refusal(
    unsigned status, std::string_view body,
    std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) {
  using detail::json_has;
  if (status < 400) return {};
  const auto billing = [](provider_shape shape, std::string_view code) {
    return refusal_reason{refusal_cause::billing, shape, code, std::nullopt};
  };
  const auto overloaded = [](provider_shape shape, std::string_view code) {
    return refusal_reason{refusal_cause::overloaded, shape, code, std::nullopt};
  };
  if (json_has(body, "type", "billing_error"))
    return billing(provider_shape::anthropic, "billing_error");
  if (json_has(body, "type", "overloaded_error"))
    return overloaded(provider_shape::anthropic, "overloaded_error");
  switch (status) {
    case 400:
      if (json_has(body, "type", "invalid_request_error") &&
          body.find("credit balance is too low") != std::string_view::npos)
        return billing(provider_shape::anthropic, "credit balance is too low");
      break;
    case 402:
      if (json_has(body, "code", "402")) return billing(provider_shape::openrouter, "402");
      return billing(provider_shape::unknown, "payment required");
    case 429: {
      if (json_has(body, "type", "insufficient_quota") ||
          json_has(body, "code", "insufficient_quota"))
        return billing(provider_shape::openai, "insufficient_quota");
      if (json_has(body, "error_code", "enforced_spend_limit_reached"))
        return {refusal_cause::billing, provider_shape::anthropic, "enforced_spend_limit_reached",
                detail::until(now, detail::next_month_utc(now))};
      if (!json_has(body, "status", "RESOURCE_EXHAUSTED")) break;
      bool per_day = false;
      detail::for_each_json_value(body, "quotaId", [&](std::string_view id) {
        return per_day = id.find("PerDay") != std::string_view::npos;
      });
      if (per_day)
        return {refusal_cause::quota, provider_shape::gemini, "RESOURCE_EXHAUSTED",
                detail::until(now, detail::next_pacific_midnight(now))};
      break;
    }
    case 498: return overloaded(provider_shape::groq, "capacity_exceeded");
    case 503:
      if (json_has(body, "code", "slow_down") || body.find("Slow Down") != std::string_view::npos)
        return overloaded(provider_shape::openai, "slow_down");
      break;
    case 529: return overloaded(provider_shape::anthropic, "overloaded_error");
    default: break;
  }
  return {};
}

}  // namespace weir::http
