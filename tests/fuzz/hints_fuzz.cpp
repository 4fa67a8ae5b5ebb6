// libFuzzer target for every parser of what a server sends: the rate-limit parsers (the input
// whole to each value parser, split into "name: value" lines for the header-set parser) and the
// server-sent events parser with its token tallies, and the error-body reader (refusals.hpp) with
// the input as the body of each status it reads. Built by scripts/fuzz (clang).
#include <weir/http/classify.hpp>
#include <weir/http/hints.hpp>
#include <weir/http/parse.hpp>
#include <weir/http/sse.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

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
  // Server-sent events: the same events whatever the split of the bytes, and tallies that count
  // no more tokens than there were events.
  const auto events = [](std::string_view first, std::string_view second) {
    sse::parser p;
    p.feed(first);
    p.feed(second);
    std::vector<sse::event> out;
    while (auto e = p.next()) out.push_back(std::move(*e));
    return out;
  };
  const auto whole = events(input, {});
  const std::size_t cut = size > 0 ? data[0] % (size + 1) : 0;
  const auto split = events(input.substr(0, cut), input.substr(cut));
  if (whole.size() != split.size()) __builtin_trap();
  weir::stream_tally openai, anthropic;
  for (std::size_t i = 0; i < whole.size(); ++i) {
    if (whole[i].type != split[i].type || whole[i].data != split[i].data) __builtin_trap();
    sse::openai_tally(whole[i], openai);
    sse::anthropic_tally(whole[i], anthropic);
  }
  if (openai.counted_output_tokens > whole.size() || anthropic.counted_output_tokens > whole.size())
    __builtin_trap();

  // An error body: a reason names a code exactly when it has a cause, a reset is within the
  // month it can be, and only a quota or credit spent is exhausted.
  for (unsigned status : {400u, 402u, 403u, 429u, 498u, 503u, 529u}) {
    const auto why = read_refusal(status, input, now);
    if ((why.cause == weir::refusal_cause::none) != why.code.empty()) __builtin_trap();
    if (why.resets_after &&
        (why.resets_after->count() <= 0 || *why.resets_after > std::chrono::days(32)))
      __builtin_trap();
    const auto judged = judge_status(status, parser, input);
    const bool spent =
        why.cause == weir::refusal_cause::quota || why.cause == weir::refusal_cause::billing;
    if ((judged.kind == weir::verdict::exhausted) != spent) __builtin_trap();
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
