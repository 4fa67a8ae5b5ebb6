// The states of a circuit_breaker, on their own so that events can name them without the breaker.
#pragma once

#include <fmt/format.h>

namespace weir {

enum class breaker_state { closed, open, half_open, isolated };

}  // namespace weir

template <>
struct fmt::formatter<weir::breaker_state> : fmt::formatter<fmt::string_view> {
  template <class FormatContext>
  auto format(weir::breaker_state s, FormatContext& ctx) const {
    constexpr const char* names[] = {"closed", "open", "half-open", "isolated"};
    return fmt::formatter<fmt::string_view>::format(names[static_cast<int>(s)], ctx);
  }
};
