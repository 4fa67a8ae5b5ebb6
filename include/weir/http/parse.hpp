// Parsers for the values providers put in rate-limit headers. Pure functions: they never throw,
// never read out of bounds, and answer std::nullopt for anything absent or malformed. Durations
// are clamped to max_hint and counts to max_count, so a hostile value cannot overflow a caller.
#pragma once

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>
#include <system_error>

namespace weir::http {

// The longest wait a header can ask for: a day. Longer values are clamped to it.
inline constexpr std::chrono::nanoseconds max_hint = std::chrono::hours(24);
// The largest count (limit, remaining) taken from a header; larger values are clamped to it.
inline constexpr std::int64_t max_count = std::int64_t{1} << 53;

namespace detail {

constexpr bool is_space(char c) { return c == ' ' || c == '\t'; }
constexpr bool is_digit(char c) { return c >= '0' && c <= '9'; }

constexpr std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

constexpr char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

constexpr bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (lower(a[i]) != lower(b[i])) return false;
  return true;
}

// A non-negative decimal number ("12", "1.5", ".5" is refused); nullopt for anything else.
inline std::optional<double> parse_decimal(std::string_view s) {
  if (s.empty() || !is_digit(s.front()) || !is_digit(s.back())) return std::nullopt;
  double value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value, std::chars_format::fixed);
  if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(value)) return std::nullopt;
  return value;
}

inline std::chrono::nanoseconds clamp_seconds(double seconds) {
  if (!(seconds > 0)) return std::chrono::nanoseconds(0);
  if (seconds >= std::chrono::duration<double>(max_hint).count()) return max_hint;
  return std::chrono::nanoseconds(static_cast<std::int64_t>(std::llround(seconds * 1e9)));
}

// Reads exactly `n` digits at `pos`.
inline std::optional<int> digits(std::string_view s, std::size_t pos, std::size_t n) {
  if (pos + n > s.size()) return std::nullopt;
  int v = 0;
  for (std::size_t i = pos; i < pos + n; ++i) {
    if (!is_digit(s[i])) return std::nullopt;
    v = v * 10 + (s[i] - '0');
  }
  return v;
}

// Years outside [1900, 2200] are refused: far outside any real reset, and past 2262 a time in
// nanoseconds would overflow.
inline std::optional<std::chrono::sys_seconds> make_time(int y, int mo, int d, int h, int mi,
                                                         int sec) {
  using namespace std::chrono;
  if (y < 1900 || y > 2200) return std::nullopt;
  const year_month_day ymd{year{y}, month{static_cast<unsigned>(mo)},
                           day{static_cast<unsigned>(d)}};
  if (!ymd.ok() || h > 23 || mi > 59 || sec > 60) return std::nullopt;
  return sys_days{ymd} + hours{h} + minutes{mi} + seconds{sec};
}

inline std::optional<int> month_of(std::string_view name) {
  constexpr std::string_view names[] = {"jan", "feb", "mar", "apr", "may", "jun",
                                        "jul", "aug", "sep", "oct", "nov", "dec"};
  for (int i = 0; i < 12; ++i)
    if (iequals(name, names[i])) return i + 1;
  return std::nullopt;
}

}  // namespace detail

// A count such as x-ratelimit-remaining-requests: a non-negative integer. "-1" and other
// negatives (Azure's "not tracked") are nullopt, not zero; huge values clamp to max_count.
inline std::optional<std::int64_t> parse_count(std::string_view value) {
  value = detail::trim(value);
  if (value.empty() || !detail::is_digit(value.front())) return std::nullopt;
  std::size_t i = 0;
  std::int64_t n = 0;
  for (; i < value.size() && detail::is_digit(value[i]); ++i)
    n = std::min(max_count, n * 10 + (value[i] - '0'));
  // Tolerate a decimal tail ("500.0") by truncating; anything else is malformed.
  if (i < value.size()) {
    if (value[i] != '.' || !detail::parse_decimal(value.substr(0, value.size())))
      return std::nullopt;
  }
  return n;
}

// A duration and the place of its last digit: "12ms" is 12 ms to within a millisecond, "7.66s"
// to within 10 ms, "6m0s" to within a second.
struct written_duration {
  std::chrono::nanoseconds value{};
  std::chrono::nanoseconds precision{};
};

// A Go-style duration as OpenAI and Groq send in x-ratelimit-reset-*: "12ms", "1.5s", "6m0s",
// "2m59.56s", "1h2m3s", "0". Units h, m, s, ms, us (or µs), ns.
inline std::optional<written_duration> parse_written_duration(std::string_view value) {
  value = detail::trim(value);
  if (value == "0") return written_duration{};
  if (value.empty()) return std::nullopt;
  double total_seconds = 0, last_digit_seconds = 0;
  while (!value.empty()) {
    std::size_t n = 0;
    while (n < value.size() && (detail::is_digit(value[n]) || value[n] == '.')) ++n;
    const auto digits = value.substr(0, n);
    auto number = detail::parse_decimal(digits);
    if (!number) return std::nullopt;
    value.remove_prefix(n);
    double scale = 0;
    if (value.starts_with("ms"))
      scale = 1e-3, value.remove_prefix(2);
    else if (value.starts_with("us"))
      scale = 1e-6, value.remove_prefix(2);
    else if (value.starts_with("\xC2\xB5s"))
      scale = 1e-6, value.remove_prefix(3);  // µs
    else if (value.starts_with("ns"))
      scale = 1e-9, value.remove_prefix(2);
    else if (value.starts_with("h"))
      scale = 3600, value.remove_prefix(1);
    else if (value.starts_with("m"))
      scale = 60, value.remove_prefix(1);
    else if (value.starts_with("s"))
      scale = 1, value.remove_prefix(1);
    else
      return std::nullopt;
    total_seconds += *number * scale;
    if (!std::isfinite(total_seconds)) return written_duration{max_hint, max_hint};
    const auto point = digits.find('.');
    last_digit_seconds =
        scale * std::pow(10.0, point == std::string_view::npos
                                   ? 0.0
                                   : -static_cast<double>(digits.size() - point - 1));
  }
  return written_duration{detail::clamp_seconds(total_seconds),
                          detail::clamp_seconds(last_digit_seconds)};
}

inline std::optional<std::chrono::nanoseconds> parse_duration(std::string_view value) {
  if (auto d = parse_written_duration(value)) return d->value;
  return std::nullopt;
}

// An RFC 3339 timestamp as Anthropic sends in anthropic-ratelimit-*-reset:
// "2026-11-28T12:00:30Z", with optional fractional seconds and a numeric offset.
inline std::optional<std::chrono::sys_time<std::chrono::nanoseconds>> parse_rfc3339(
    std::string_view value) {
  using namespace std::chrono;
  const auto s = detail::trim(value);
  auto y = detail::digits(s, 0, 4), mo = detail::digits(s, 5, 2), d = detail::digits(s, 8, 2);
  auto h = detail::digits(s, 11, 2), mi = detail::digits(s, 14, 2), sec = detail::digits(s, 17, 2);
  if (!y || !mo || !d || !h || !mi || !sec || s.size() < 20 || s[4] != '-' || s[7] != '-' ||
      (s[10] != 'T' && s[10] != 't' && s[10] != ' ') || s[13] != ':' || s[16] != ':')
    return std::nullopt;
  auto base = detail::make_time(*y, *mo, *d, *h, *mi, *sec);
  if (!base) return std::nullopt;
  std::size_t pos = 19;
  nanoseconds fraction{0};
  if (s[pos] == '.') {
    std::int64_t scale = 100'000'000;
    std::size_t start = ++pos;
    for (; pos < s.size() && detail::is_digit(s[pos]); ++pos) {
      fraction += nanoseconds((s[pos] - '0') * scale);
      scale /= 10;
    }
    if (pos == start || pos >= s.size()) return std::nullopt;
  }
  minutes offset{0};
  if (s[pos] == 'Z' || s[pos] == 'z') {
    if (pos + 1 != s.size()) return std::nullopt;
  } else if (s[pos] == '+' || s[pos] == '-') {
    auto oh = detail::digits(s, pos + 1, 2), om = detail::digits(s, pos + 4, 2);
    if (!oh || !om || pos + 6 != s.size() || s[pos + 3] != ':' || *oh > 23 || *om > 59)
      return std::nullopt;
    offset = hours(*oh) + minutes(*om);
    if (s[pos] == '-') offset = -offset;
  } else {
    return std::nullopt;
  }
  return time_point_cast<nanoseconds>(*base) + fraction - offset;
}

// An HTTP-date (RFC 9110 §5.6.7): IMF-fixdate "Sun, 06 Nov 1994 08:49:37 GMT", and the obsolete
// RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT" and asctime "Sun Nov  6 08:49:37 1994" forms.
inline std::optional<std::chrono::sys_seconds> parse_http_date(std::string_view value) {
  const auto s = detail::trim(value);
  const auto comma = s.find(',');
  auto clock = [&](std::size_t at) -> std::optional<std::array<int, 3>> {
    auto h = detail::digits(s, at, 2), m = detail::digits(s, at + 3, 2);
    auto sec = detail::digits(s, at + 6, 2);
    if (!h || !m || !sec || s[at + 2] != ':' || s[at + 5] != ':') return std::nullopt;
    return std::array<int, 3>{*h, *m, *sec};
  };
  if (comma == 3 && s.size() == 29) {  // IMF-fixdate
    auto d = detail::digits(s, 5, 2), y = detail::digits(s, 12, 4);
    auto mo = detail::month_of(s.substr(8, 3));
    auto t = clock(17);
    if (!d || !y || !mo || !t || s[4] != ' ' || s[7] != ' ' || s[11] != ' ' || s[16] != ' ' ||
        !detail::iequals(s.substr(25), " GMT"))
      return std::nullopt;
    return detail::make_time(*y, *mo, *d, (*t)[0], (*t)[1], (*t)[2]);
  }
  if (comma != std::string_view::npos && comma > 3 && s.size() == comma + 24) {  // RFC 850
    const auto p = comma + 2;
    auto d = detail::digits(s, p, 2), yy = detail::digits(s, p + 7, 2);
    auto mo = detail::month_of(s.substr(p + 3, 3));
    auto t = clock(p + 10);
    if (!d || !yy || !mo || !t || s[p - 1] != ' ' || s[p + 2] != '-' || s[p + 6] != '-' ||
        s[p + 9] != ' ' || !detail::iequals(s.substr(p + 18), " GMT"))
      return std::nullopt;
    // Two-digit years: RFC 9110 says a year more than 50 years ahead is in the past.
    return detail::make_time(*yy < 70 ? 2000 + *yy : 1900 + *yy, *mo, *d, (*t)[0], (*t)[1],
                             (*t)[2]);
  }
  if (comma == std::string_view::npos && s.size() == 24) {  // asctime
    auto mo = detail::month_of(s.substr(4, 3));
    const int d = (s[8] == ' ' ? 0 : (detail::is_digit(s[8]) ? s[8] - '0' : -100)) * 10 +
                  (detail::is_digit(s[9]) ? s[9] - '0' : -1000);
    auto t = clock(11);
    auto y = detail::digits(s, 20, 4);
    if (!mo || d < 1 || !t || !y || s[3] != ' ' || s[7] != ' ' || s[10] != ' ' || s[19] != ' ')
      return std::nullopt;
    return detail::make_time(*y, *mo, d, (*t)[0], (*t)[1], (*t)[2]);
  }
  return std::nullopt;
}

// Retry-After (RFC 9110 §10.2.3): delta-seconds ("120", leniently "1.5") or an HTTP-date, as a
// wait from `now`. A date in the past is a zero wait; negatives and garbage are nullopt.
inline std::optional<std::chrono::nanoseconds> parse_retry_after(
    std::string_view value, std::chrono::system_clock::time_point now) {
  value = detail::trim(value);
  if (auto seconds = detail::parse_decimal(value)) return detail::clamp_seconds(*seconds);
  if (auto date = parse_http_date(value)) {
    const auto wait = std::chrono::duration<double>(*date - now).count();
    return detail::clamp_seconds(wait);
  }
  return std::nullopt;
}

// retry-after-ms (OpenAI, Azure): milliseconds, possibly fractional.
inline std::optional<std::chrono::nanoseconds> parse_retry_after_ms(std::string_view value) {
  if (auto ms = detail::parse_decimal(detail::trim(value)))
    return detail::clamp_seconds(*ms / 1000);
  return std::nullopt;
}

// x-should-retry: "true" or "false" (any case); nullopt otherwise.
inline std::optional<bool> parse_should_retry(std::string_view value) {
  value = detail::trim(value);
  if (detail::iequals(value, "true")) return true;
  if (detail::iequals(value, "false")) return false;
  return std::nullopt;
}

}  // namespace weir::http
