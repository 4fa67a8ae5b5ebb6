// The token counts an LLM provider reports in a response body, so that the limits settle against
// what a call really used:
//
//     ctx.actual_input_tokens = used->input_tokens;   // after auto used = reported_usage(body)
//
// OpenAI's and Groq's "usage": {"prompt_tokens", "completion_tokens", "prompt_tokens_details":
// {"cached_tokens"}}, Anthropic's "usage": {"input_tokens", "output_tokens",
// "cache_read_input_tokens", "cache_creation_input_tokens"}. A small tolerant scan, not a JSON
// parser: it reads the numbers of the "usage" object of a well-formed body and answers nullopt
// otherwise.
#pragma once

#include <weir/core/call_context.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace weir::http {

// The most tokens one response is taken to have used on either side: more than any model's context
// window today. A larger claim (a broken or hostile server's) is clamped to it, so one chunk
// cannot charge the limiters hours of debt.
inline constexpr std::uint64_t max_reported_tokens = 10'000'000;

namespace detail {

// Where `"key"` is followed (after blanks) by a colon in `body`, from `from` on; npos if nowhere.
inline std::size_t json_key(std::string_view body, std::string_view key, std::size_t from = 0) {
  for (auto at = body.find(key, from); at != std::string_view::npos; at = body.find(key, at + 1)) {
    if (at == 0 || body[at - 1] != '"' || at + key.size() >= body.size() ||
        body[at + key.size()] != '"')
      continue;
    auto colon = at + key.size() + 1;
    while (colon < body.size() && (body[colon] == ' ' || body[colon] == '\n')) ++colon;
    if (colon < body.size() && body[colon] == ':') return colon + 1;
  }
  return std::string_view::npos;
}

// The whole number after "key": (at most 2^40, where a real count ends), from `from` on.
inline std::optional<std::uint64_t> json_number(std::string_view body, std::string_view key,
                                                std::size_t from = 0) {
  auto at = json_key(body, key, from);
  if (at == std::string_view::npos) return std::nullopt;
  while (at < body.size() && (body[at] == ' ' || body[at] == '\n')) ++at;
  std::uint64_t n = 0;
  bool any = false;
  while (at < body.size() && body[at] >= '0' && body[at] <= '9' && n < (1ull << 40)) {
    n = n * 10 + static_cast<std::uint64_t>(body[at++] - '0');
    any = true;
  }
  return any ? std::optional(n) : std::nullopt;
}

// A token count after "key", clamped to max_reported_tokens.
inline std::optional<std::uint64_t> json_token_count(std::string_view body, std::string_view key,
                                                     std::size_t from = 0) {
  const auto n = json_number(body, key, from);
  if (!n) return n;
  return std::min(*n, max_reported_tokens);
}

// The string after "key": without its escapes (the mocks' own requests need no more).
inline std::optional<std::string> json_string(std::string_view body, std::string_view key) {
  auto at = json_key(body, key);
  if (at == std::string_view::npos) return std::nullopt;
  at = body.find('"', at);
  if (at == std::string_view::npos) return std::nullopt;
  const auto end = body.find('"', at + 1);
  if (end == std::string_view::npos) return std::nullopt;
  return std::string(body.substr(at + 1, end - at - 1));
}

}  // namespace detail

// The usage a response body reports, in OpenAI's or Anthropic's form; nullopt when it has none.
// Cached input is part of input_tokens either way: OpenAI's prompt_tokens already count its
// prompt_tokens_details.cached_tokens (cache reads; it bills no writes), while Anthropic's
// input_tokens leave out cache_read_input_tokens and cache_creation_input_tokens, which are added.
inline std::optional<token_usage> reported_usage(std::string_view body) {
  const auto usage = detail::json_key(body, "usage");
  if (usage == std::string_view::npos) return std::nullopt;
  const auto count = [&](std::string_view key) {
    return detail::json_token_count(body, key, usage).value_or(0);
  };
  if (auto in = detail::json_token_count(body, "prompt_tokens", usage))
    return token_usage{.input_tokens = *in,
                       .output_tokens = count("completion_tokens"),
                       .cache_read_tokens = std::min(*in, count("cached_tokens"))};
  auto in = detail::json_token_count(body, "input_tokens", usage);
  if (!in) return std::nullopt;
  token_usage used{.input_tokens = *in, .output_tokens = count("output_tokens")};
  if (auto read = detail::json_token_count(body, "cache_read_input_tokens", usage)) {
    used.cache_read_tokens = *read;
    used.cache_write_tokens = count("cache_creation_input_tokens");
    used.input_tokens = std::min(max_reported_tokens, *in + *read + used.cache_write_tokens);
  } else if (auto write = detail::json_token_count(body, "cache_creation_input_tokens", usage)) {
    used.cache_write_tokens = *write;
    used.input_tokens = std::min(max_reported_tokens, *in + *write);
  } else {
    // OpenAI's Responses API: input_tokens_details.cached_tokens, within input_tokens.
    used.cache_read_tokens = std::min(*in, count("cached_tokens"));
  }
  return used;
}

// The model a response body says answered, its "model" field in OpenAI's and Anthropic's answers
// alike (router_options::response_model_of); empty when it names none or an overlong one.
inline std::string reported_model(std::string_view body) {
  constexpr std::size_t longest = 200;  // a metrics label: a model's name, not a page of text
  auto model = detail::json_string(body, "model").value_or(std::string());
  if (model.size() > longest) model.clear();
  return model;
}

}  // namespace weir::http
