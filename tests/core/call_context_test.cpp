// Specifications of weir/core/call_context.hpp: what a call costs the limiters, estimated and
// actual.
#include "../support/core.hpp"

#include <weir/core/call_context.hpp>

#include <cstdint>

TEST_CASE("a call's estimate is its total, else the sum of its input and output",
          "[call_context]") {
  CHECK(weir::call_context{.tokens = 900}.estimated_usage() ==
        weir::usage{.requests = 1, .tokens = 900});
  CHECK(weir::call_context{.input_tokens = 700, .output_tokens = 300}.estimated_usage() ==
        weir::usage{.requests = 1, .tokens = 1000, .input_tokens = 700, .output_tokens = 300});
  // Two huge estimates do not wrap into a small one that passes a limit.
  CHECK(
      weir::call_context{.input_tokens = UINT64_MAX, .output_tokens = 2}.estimated_usage().tokens ==
      UINT64_MAX);
}

TEST_CASE("a call's actual usage takes what it learnt and keeps the estimate elsewhere",
          "[call_context]") {
  weir::call_context ctx{.input_tokens = 700, .output_tokens = 300};
  const auto estimate = ctx.estimated_usage();
  CHECK(ctx.actual_usage(estimate) == estimate);  // nothing learnt
  ctx.actual_output_tokens = 120;                 // the output is known, the input is not
  CHECK(ctx.actual_usage(estimate) ==
        weir::usage{.requests = 1, .tokens = 820, .input_tokens = 700, .output_tokens = 120});
  ctx.actual_tokens = 1000;  // a total given wins over the parts' sum
  CHECK(ctx.actual_usage(estimate).tokens == 1000);
}
