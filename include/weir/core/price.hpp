// What tokens cost: a model's prices, USD per million tokens, with its prompt cache's own rates.
#pragma once

#include <weir/core/call_context.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace weir {

struct price {
  double input_per_million = 0;
  double output_per_million = 0;
  // Input read from the provider's prompt cache, and written to it. nullopt: the input price
  // (no discount assumed, so a budget is never under-charged for a rate nobody gave).
  std::optional<double> cached_input_per_million{};
  std::optional<double> cache_write_per_million{};

  double of(std::uint64_t input_tokens, std::uint64_t output_tokens) const noexcept {
    return (static_cast<double>(input_tokens) * input_per_million +
            static_cast<double>(output_tokens) * output_per_million) /
           1e6;
  }
  // The most a call with these token counts can be charged: its input at the dearer of the input
  // and cache-write rates (a provider may write the whole prompt to its cache, at 1.25× the input
  // price for Anthropic). What a budget reserves before the call, so that calls in flight
  // together never pass it, whatever the response reports.
  double most_for(std::uint64_t input_tokens, std::uint64_t output_tokens) const noexcept {
    const double input_rate = std::max(input_per_million, cache_write_per_million.value_or(0));
    return (static_cast<double>(input_tokens) * input_rate +
            static_cast<double>(output_tokens) * output_per_million) /
           1e6;
  }
  // A call's cost by its usage: input and output at their rates, or a bare total at the dearer
  // rate, so never under-estimated.
  double of(const usage& u) const noexcept {
    if (u.input_tokens || u.output_tokens) return of(u.input_tokens, u.output_tokens);
    return static_cast<double>(u.tokens) * std::max(input_per_million, output_per_million) / 1e6;
  }
  // A call's cost by what the response reported: its cache reads and writes (part of its input
  // tokens) at the cache's rates, the rest of the input at the input price.
  //
  // g++ 12 at -O1 turns the rates' choice into a select that loads an empty optional's payload,
  // then warns that it may be uninitialized (a false positive, GCC bug 80635): silenced here
  // only, since users build with -Werror too.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
  double of(const token_usage& u) const noexcept {
    const auto read = std::min(u.cache_read_tokens, u.input_tokens);
    const auto written = std::min(u.cache_write_tokens, u.input_tokens - read);
    const auto fresh = u.input_tokens - read - written;
    const double read_rate =
        cached_input_per_million.has_value() ? *cached_input_per_million : input_per_million;
    const double write_rate =
        cache_write_per_million.has_value() ? *cache_write_per_million : input_per_million;
    return (static_cast<double>(fresh) * input_per_million + static_cast<double>(read) * read_rate +
            static_cast<double>(written) * write_rate +
            static_cast<double>(u.output_tokens) * output_per_million) /
           1e6;
  }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
};

}  // namespace weir
