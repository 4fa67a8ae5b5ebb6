// Reads every provider's rate-limit headers into one weir::rate_limit_hint:
//   Retry-After, retry-after-ms                               retry_after
//   x-ratelimit-{limit,remaining,reset}-{requests,tokens}    OpenAI, Groq, Azure
//   anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}
//   RateLimit / RateLimit-Policy (IETF httpapi draft, structured fields q, w, r, t)
//   RateLimit-{Limit,Remaining,Reset} and X-RateLimit-{Limit,Remaining,Reset} (older forms)
// and Gemini's 429 body (RESOURCE_EXHAUSTED with a RetryInfo retryDelay).
//
// Names are matched without regard to case and values are trimmed. When a header repeats or two
// forms disagree, the most cautious reading wins: the longest wait, the smallest limit and
// remainder. Malformed values are ignored, never guessed at.
#pragma once

#include <weir/core/outcome.hpp>
#include <weir/http/parse.hpp>

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace weir::http {

namespace detail {

inline void merge_min(std::optional<std::int64_t>& into, std::optional<std::int64_t> v) {
  if (v) into = into ? std::min(*into, *v) : *v;
}
inline void merge_max(std::optional<std::chrono::nanoseconds>& into,
                      std::optional<std::chrono::nanoseconds> v) {
  if (v) into = into ? std::max(*into, *v) : *v;
}

// One member of an RFC 8941 list with the parameters the IETF draft uses.
struct ratelimit_item {
  std::string name;
  std::optional<std::int64_t> q, w, r, t;
  std::string quota_unit;  // qu; empty means requests
};

// Splits a structured-field list into items; members that do not parse are skipped.
inline std::vector<ratelimit_item> parse_ratelimit_list(std::string_view s) {
  std::vector<ratelimit_item> items;
  std::size_t i = 0;
  auto skip_space = [&] {
    while (i < s.size() && is_space(s[i])) ++i;
  };
  // A string ("..." with \-escapes) or a token; returns the text without quotes.
  auto bare = [&]() -> std::optional<std::string_view> {
    if (i < s.size() && s[i] == '"') {
      const auto start = ++i;
      while (i < s.size() && s[i] != '"') i += (s[i] == '\\' && i + 1 < s.size()) ? 2 : 1;
      if (i >= s.size()) return std::nullopt;
      return s.substr(start, i++ - start);
    }
    const auto start = i;
    while (i < s.size() && s[i] != ';' && s[i] != ',' && !is_space(s[i]) && s[i] != '=') ++i;
    return s.substr(start, i - start);
  };
  while (i < s.size()) {
    skip_space();
    ratelimit_item item;
    bool ok = false;
    if (auto name = bare()) {
      item.name.assign(*name);
      ok = true;
    }
    while (ok && i < s.size() && s[i] == ';') {
      ++i;
      skip_space();
      auto key = bare();
      if (!key || key->empty()) {
        ok = false;
        break;
      }
      std::string_view value;
      if (i < s.size() && s[i] == '=') {
        ++i;
        auto v = bare();
        if (!v) {
          ok = false;
          break;
        }
        value = *v;
      }
      if (*key == "q")
        item.q = parse_count(value);
      else if (*key == "w")
        item.w = parse_count(value);
      else if (*key == "r")
        item.r = parse_count(value);
      else if (*key == "t")
        item.t = parse_count(value);
      else if (*key == "qu")
        item.quota_unit.assign(value);
    }
    // Skip to the next member, whatever is left of this one.
    while (i < s.size() && s[i] != ',') ++i;
    if (i < s.size()) ++i;
    if (ok) items.push_back(item);
  }
  return items;
}

}  // namespace detail

// Feed it a response's header fields one by one, then read hint() and should_retry().
class hint_parser {
 public:
  // `now` turns dates (HTTP-date, RFC 3339, epoch seconds) into waits.
  explicit hint_parser(std::chrono::system_clock::time_point now = std::chrono::system_clock::now())
      : now_(now) {}
  // When the answer came, as given.
  std::chrono::system_clock::time_point now() const noexcept { return now_; }

  void add(std::string_view name, std::string_view value) {
    using detail::iequals;
    if (iequals(name, "retry-after")) {
      detail::merge_max(retry_after_, parse_retry_after(value, now_));
    } else if (iequals(name, "retry-after-ms")) {
      detail::merge_max(retry_after_ms_, parse_retry_after_ms(value));
    } else if (iequals(name, "x-should-retry")) {
      if (auto v = parse_should_retry(value))
        should_retry_ = should_retry_ ? (*should_retry_ && *v) : *v;
    } else if (starts_with(name, "x-ratelimit-") && add_openai(name.substr(12), value)) {
      // read; a plain x-ratelimit-limit falls through to the legacy forms below
    } else if (starts_with(name, "anthropic-ratelimit-") && add_anthropic(name.substr(20), value)) {
      // read
    } else if (iequals(name, "ratelimit")) {
      for (const auto& item : detail::parse_ratelimit_list(value)) current_.push_back(item);
    } else if (iequals(name, "ratelimit-policy")) {
      for (const auto& item : detail::parse_ratelimit_list(value)) policies_.push_back(item);
    } else {
      add_legacy(name, value);
    }
  }

  // Everything read so far, merged.
  rate_limit_hint hint() const {
    rate_limit_hint h = hint_;
    // retry-after-ms is the more precise of the two when both are sent (Azure, OpenAI).
    h.retry_after = retry_after_ms_ ? retry_after_ms_ : retry_after_;
    // The IETF fields: each RateLimit item with the policy of its name, whose w is the window.
    const auto read_ietf = [&](const detail::ratelimit_item* current,
                               const detail::ratelimit_item* policy) {
      const auto& unit_of = policy && !policy->quota_unit.empty() ? policy : current;
      if (unit_of && !unit_of->quota_unit.empty() && unit_of->quota_unit != "requests")
        return;  // bytes or concurrency: not ours to pace
      limit_snapshot s;
      if (current) {
        s.remaining = current->r;
        if (current->t) {
          s.reset_after = std::chrono::seconds(std::min<std::int64_t>(*current->t, 86400));
          s.reset_rounded_to = std::chrono::seconds(1);
        }
      }
      if (policy) {
        s.limit = policy->q;
        if (policy->w && *policy->w > 0)
          s.window = std::chrono::seconds(std::min<std::int64_t>(*policy->w, 86400));
      }
      merge(h.requests, s);
    };
    // Policies by name, looked up once per item: a long list on both fields stays n log n.
    std::vector<const detail::ratelimit_item*> by_name;
    by_name.reserve(policies_.size());
    for (const auto& p : policies_) by_name.push_back(&p);
    std::stable_sort(by_name.begin(), by_name.end(),
                     [](const auto* a, const auto* b) { return a->name < b->name; });
    for (const auto& r : current_) read_ietf(&r, find_policy(by_name, r.name));
    if (current_.empty())
      for (const auto& p : policies_) read_ietf(nullptr, &p);
    return h;
  }

  // x-should-retry, when the server said; it overrides the status-code rule.
  std::optional<bool> should_retry() const noexcept { return should_retry_; }

 private:
  static bool starts_with(std::string_view s, std::string_view prefix) {
    return s.size() >= prefix.size() && detail::iequals(s.substr(0, prefix.size()), prefix);
  }

  // The most cautious reading: the smallest limit and remainder, the longest reset and window,
  // and a fixed window over a continuous refill.
  static void merge(limit_snapshot& into, const limit_snapshot& s) {
    detail::merge_min(into.limit, s.limit);
    detail::merge_min(into.remaining, s.remaining);
    detail::merge_max(into.reset_after, s.reset_after);
    detail::merge_max(into.window, s.window);
    detail::merge_max(into.reset_rounded_to, s.reset_rounded_to);
    detail::merge_max(into.reset_precision, s.reset_precision);
    if (into.refill == refill::unknown || s.refill == refill::fixed_window) into.refill = s.refill;
    into.reset_is_instant = into.reset_is_instant || s.reset_is_instant;
  }

  // The first policy named `name` in `by_name` (sorted by name, stably); the only one when there
  // is a single policy.
  const detail::ratelimit_item* find_policy(
      const std::vector<const detail::ratelimit_item*>& by_name, std::string_view name) const {
    const auto at = std::lower_bound(by_name.begin(), by_name.end(), name,
                                     [](const auto* p, std::string_view n) { return p->name < n; });
    if (at != by_name.end() && (*at)->name == name) return *at;
    return policies_.size() == 1 ? &policies_.front() : nullptr;
  }

  limit_snapshot* dimension(std::string_view name) {
    using detail::iequals;
    if (iequals(name, "requests")) return &hint_.requests;
    if (iequals(name, "tokens")) return &hint_.tokens;
    if (iequals(name, "input-tokens")) return &hint_.input_tokens;
    if (iequals(name, "output-tokens")) return &hint_.output_tokens;
    return nullptr;
  }

  // {limit,remaining,reset}-{requests,tokens}: reset is a Go-style duration, the time until the
  // limit is full again; OpenAI's limits refill continuously ("Rate limits" guide).
  bool add_openai(std::string_view rest, std::string_view value) {
    const auto dash = rest.find('-');
    if (dash == std::string_view::npos) return false;
    auto* dim = dimension(rest.substr(dash + 1));
    if (!dim) return false;
    limit_snapshot s{.refill = refill::continuous};
    const auto field = rest.substr(0, dash);
    if (detail::iequals(field, "limit"))
      s.limit = parse_count(value);
    else if (detail::iequals(field, "remaining"))
      s.remaining = parse_count(value);
    else if (detail::iequals(field, "reset")) {
      // Go writes every digit of a duration but trailing zeros ("2s" may be 2.000 s), and resets
      // come rounded to the millisecond ("12ms"): none is taken as finer than its last digit, or
      // coarser than a millisecond.
      if (const auto reset = parse_written_duration(value)) {
        s.reset_after = reset->value;
        s.reset_precision =
            std::min<std::chrono::nanoseconds>(reset->precision, std::chrono::milliseconds(1));
      }
    } else {
      return false;
    }
    merge(*dim, s);
    return true;
  }

  // {requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}: reset is RFC 3339, when
  // the limit is full again; Anthropic's limits are token buckets, replenished continuously
  // ("Rate limits" in its API docs).
  bool add_anthropic(std::string_view rest, std::string_view value) {
    const auto dash = rest.rfind('-');
    if (dash == std::string_view::npos) return false;
    auto* dim = dimension(rest.substr(0, dash));
    if (!dim) return false;
    limit_snapshot s{.refill = refill::continuous};
    const auto field = rest.substr(dash + 1);
    if (detail::iequals(field, "limit"))
      s.limit = parse_count(value);
    else if (detail::iequals(field, "remaining"))
      s.remaining = parse_count(value);
    else if (detail::iequals(field, "reset")) {
      s.reset_after = until(parse_rfc3339(value));
      s.reset_is_instant = true;
      // Anthropic writes whole seconds ("...T12:00:01Z"): a reset rounded up, as above.
      if (s.reset_after && detail::trim(value).find('.') == std::string_view::npos)
        s.reset_rounded_to = std::chrono::seconds(1);
    } else {
      return false;
    }
    merge(*dim, s);
    return true;
  }

  // RateLimit-* and X-RateLimit-* without a dimension: requests. Reset may be delta seconds,
  // epoch seconds (told apart by magnitude) or an HTTP-date.
  void add_legacy(std::string_view name, std::string_view value) {
    using detail::iequals;
    if (starts_with(name, "x-")) name.remove_prefix(2);
    if (!starts_with(name, "ratelimit-")) return;
    const auto field = name.substr(10);
    limit_snapshot s;
    if (iequals(field, "limit")) {
      // Draft-03 lists ("10, 10;w=1, 50;w=60"): the first member is the one in force.
      s.limit = parse_count(value.substr(0, std::min(value.find(','), value.find(';'))));
    } else if (iequals(field, "remaining")) {
      s.remaining = parse_count(value);
    } else if (iequals(field, "reset")) {
      if (auto n = parse_count(value)) {
        constexpr std::int64_t epoch_threshold = 1'000'000'000;  // 2001: no delta is that long
        // Seconds since the epoch are compared in floating point: a hostile 2^53 must not overflow.
        const double now_s = std::chrono::duration<double>(now_.time_since_epoch()).count();
        const double seconds = static_cast<double>(*n);
        s.reset_after = detail::clamp_seconds(*n >= epoch_threshold ? seconds - now_s : seconds);
        s.reset_rounded_to = std::chrono::seconds(1);
        s.reset_is_instant = *n >= epoch_threshold;
      } else if (auto date = parse_http_date(value)) {
        s.reset_after = until(std::chrono::sys_time<std::chrono::nanoseconds>(*date));
        s.reset_rounded_to = std::chrono::seconds(1);
        s.reset_is_instant = true;
      }
    } else {
      return;
    }
    merge(hint_.requests, s);
  }

  std::optional<std::chrono::nanoseconds> until(
      std::optional<std::chrono::sys_time<std::chrono::nanoseconds>> t) const {
    if (!t) return std::nullopt;
    return detail::clamp_seconds(std::chrono::duration<double>(*t - now_).count());
  }

  std::chrono::system_clock::time_point now_;
  rate_limit_hint hint_;
  std::optional<std::chrono::nanoseconds> retry_after_, retry_after_ms_;
  std::optional<bool> should_retry_;
  std::vector<detail::ratelimit_item> current_, policies_;
};

// Gemini's 429 body: {"error": {"status": "RESOURCE_EXHAUSTED", "details": [{"@type":
// "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}. Returns the retryDelay of
// a RESOURCE_EXHAUSTED error; a tolerant scan, so a truncated or odd body is just nullopt.
inline std::optional<std::chrono::nanoseconds> parse_gemini_retry_delay(std::string_view body) {
  if (body.find("RESOURCE_EXHAUSTED") == std::string_view::npos) return std::nullopt;
  const auto key = body.find("\"retryDelay\"");
  if (key == std::string_view::npos) return std::nullopt;
  std::size_t i = key + 12;
  auto skip_space = [&] {
    while (i < body.size() && (detail::is_space(body[i]) || body[i] == '\n' || body[i] == '\r'))
      ++i;
  };
  skip_space();
  if (i >= body.size() || body[i] != ':') return std::nullopt;
  ++i;
  skip_space();
  if (i >= body.size() || body[i] != '"') return std::nullopt;
  const auto start = ++i;
  const auto end = body.find('"', start);
  if (end == std::string_view::npos) return std::nullopt;
  const auto delay = body.substr(start, end - start);
  // Protobuf Duration JSON: decimal seconds with an "s" suffix.
  if (delay.size() < 2 || delay.back() != 's') return std::nullopt;
  if (auto seconds = detail::parse_decimal(delay.substr(0, delay.size() - 1)))
    return detail::clamp_seconds(*seconds);
  return std::nullopt;
}

}  // namespace weir::http
