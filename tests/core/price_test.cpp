// Specifications of weir/core/price.hpp: what a call costs, and the most it can cost.
#include "../support/core.hpp"

#include <weir/core/price.hpp>

TEST_CASE("a price charges input and output at their rates, cache reads and writes at theirs",
          "[price]") {
  const weir::price sonnet{.input_per_million = 3,
                           .output_per_million = 15,
                           .cached_input_per_million = 0.3,
                           .cache_write_per_million = 3.75};
  CHECK(sonnet.of(1'000'000, 100'000) == Approx(3 + 1.5));
  // Of 1 000 000 input tokens, 600 000 read from the cache and 100 000 written to it.
  CHECK(sonnet.of(weir::token_usage{.input_tokens = 1'000'000,
                                    .output_tokens = 0,
                                    .cache_read_tokens = 600'000,
                                    .cache_write_tokens = 100'000}) ==
        Approx(0.3 * 3 + 0.6 * 0.3 + 0.1 * 3.75));
  // Cache counts above the input are read as all of it, never as negative fresh input.
  CHECK(sonnet.of(weir::token_usage{.input_tokens = 10, .cache_read_tokens = 50}) ==
        Approx(10 * 0.3 / 1e6));
  // The most: every input token at the dearer of the input and cache-write rates.
  CHECK(sonnet.most_for(1'000'000, 0) == Approx(3.75));
  // A bare total is priced at the dearer rate, so never under-estimated.
  CHECK(sonnet.of(weir::usage{.tokens = 1'000'000}) == Approx(15));
}

TEST_CASE("a price with no cache rates charges cached input as input", "[price]") {
  const weir::price plain{.input_per_million = 2, .output_per_million = 8};
  const weir::token_usage used{.input_tokens = 1'000'000, .cache_read_tokens = 1'000'000};
  CHECK(plain.of(used) == Approx(2));
  CHECK(plain.most_for(1'000'000, 1'000'000) == Approx(10));
}
