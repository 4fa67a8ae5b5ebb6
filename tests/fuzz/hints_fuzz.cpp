// libFuzzer target for every rate-limit parser. The input is fed whole to each value parser, and
// split into "name: value" lines for the header-set parser. Built by scripts/fuzz (clang).
#include <weir/http/hints.hpp>
#include <weir/http/parse.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace weir::http;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const auto now = std::chrono::system_clock::time_point(std::chrono::seconds(1'795'000'000));

  // Each result is checked against the documented bounds: a violation is a finding.
  auto check_wait = [](std::optional<std::chrono::nanoseconds> d) {
    if (d && (d->count() < 0 || *d > max_hint)) __builtin_trap();
  };
  check_wait(parse_retry_after(input, now));
  check_wait(parse_retry_after_ms(input));
  check_wait(parse_duration(input));
  check_wait(parse_gemini_retry_delay(input));
  if (auto n = parse_count(input); n && (*n < 0 || *n > max_count)) __builtin_trap();
  (void)parse_rfc3339(input);
  (void)parse_http_date(input);
  (void)parse_should_retry(input);
  (void)detail::parse_ratelimit_list(input);

  hint_parser parser(now);
  std::string_view rest = input;
  while (!rest.empty()) {
    const auto end = rest.find('\n');
    const auto line = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
    const auto colon = line.find(':');
    if (colon != std::string_view::npos) parser.add(line.substr(0, colon), line.substr(colon + 1));
  }
  const auto h = parser.hint();
  check_wait(h.retry_after);
  for (const auto* s : {&h.requests, &h.tokens, &h.input_tokens, &h.output_tokens}) {
    check_wait(s->reset_after);
    if (s->limit && *s->limit < 0) __builtin_trap();
    if (s->remaining && *s->remaining < 0) __builtin_trap();
  }
  return 0;
}
