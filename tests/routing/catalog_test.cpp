// Specifications of weir/routing/catalog.hpp: the catalog as code builds it (catalog_json_test.cpp
// loads it from a file).
#include "../support/routing.hpp"

#include <limits>

TEST_CASE("a catalog refuses an empty or twice-listed name and a bad number, naming the field",
          "[routing][catalog]") {
  namespace r = weir::routing;
  r::catalog c;
  c.add(r::model_spec{.provider = "a", .id = "m", .capability = 1});
  const auto refusal = [&](auto spec) {
    try {
      c.add(std::move(spec));
    } catch (const weir::exception& e) {
      CHECK(e.code() == weir::error::invalid_argument);
      return std::string(e.what());
    }
    return std::string("(taken)");
  };
  using Catch::Matchers::Contains;
  CHECK_THAT(refusal(r::provider_spec{}), Contains("catalog: provider name is empty"));
  CHECK_THAT(refusal(r::provider_spec{.name = "a"}), Contains("provider a is listed twice"));
  CHECK_THAT(refusal(r::provider_spec{.name = "b", .default_cooldown = -1s}),
             Contains("provider b: default_cooldown is negative"));
  CHECK_THAT(refusal(r::provider_spec{.name = "b", .cache = r::cache_rules{.write_factor = -1}}),
             Contains("provider b: cache.write_factor must be a finite number"));
  CHECK_THAT(refusal(r::model_spec{.provider = "a", .id = ""}),
             Contains("model of a: id is empty"));
  CHECK_THAT(refusal(r::model_spec{.provider = "a", .id = "m"}), Contains("a/m is listed twice"));
  CHECK_THAT(
      refusal(r::model_spec{
          .provider = "a", .id = "n", .output_price = std::numeric_limits<double>::quiet_NaN()}),
      Contains("model a/n: output_price must be a finite number"));
  CHECK_THAT(refusal(r::model_spec{.provider = "c", .id = "n", .requests_per_minute = -60}),
             Contains("model c/n: requests_per_minute"));
  // Nothing refused was added, not even the provider of a refused model.
  CHECK(c.providers().size() == 1);
  CHECK(c.models().size() == 1);
  CHECK_FALSE(c.find_provider("b"));
  CHECK_FALSE(c.find_provider("c"));
}

TEST_CASE("a model of an unlisted provider lists it with defaults, its cache priced by its rules",
          "[routing][catalog][cache]") {
  namespace r = weir::routing;
  r::catalog c;
  c.add(
       r::model_spec{.provider = "anthropic", .id = "claude", .input_price = 3, .output_price = 15})
      .add(r::model_spec{.provider = "mine", .id = "m", .input_price = 2, .cached_input_price = 1})
      .add(r::model_spec{.provider = "anthropic", .id = "m", .input_price = 1});
  REQUIRE(c.providers().size() == 2);
  CHECK(c.providers()[0].name == "anthropic");  // in the order they came
  CHECK(c.providers()[0].default_cooldown == 1s);
  CHECK(c.providers()[0].cooldown_scope == r::cooldown_scope::model);
  // One id at two providers: two models.
  REQUIRE(c.find_model("anthropic", "m"));
  CHECK(c.find_model("anthropic", "m")->input_price == 1);
  CHECK(c.find_model("mine", "m")->input_price == 2);
  CHECK_FALSE(c.find_model("mine", "claude"));

  // Anthropic's documented rules: reads at 0.1x the input price, writes at 1.25x, reads not
  // counted toward the token limit. Another provider: what the model gives, else the input price.
  const auto& claude = *c.find_model("anthropic", "claude");
  CHECK(*claude.cached_input_price == Approx(0.3));
  CHECK(*claude.cache_write_price == Approx(3.75));
  CHECK_FALSE(*claude.cache_reads_count);
  const auto& mine = *c.find_model("mine", "m");
  CHECK(*mine.cached_input_price == 1);
  CHECK(*mine.cache_write_price == 2);
  CHECK(*mine.cache_reads_count);

  // 1 000 input tokens (800 read from the cache, 100 written to it) and 100 output tokens.
  const weir::token_usage used{.input_tokens = 1'000,
                               .output_tokens = 100,
                               .cache_read_tokens = 800,
                               .cache_write_tokens = 100};
  CHECK(claude.cost(used) == Approx((100 * 3 + 800 * 0.3 + 100 * 3.75 + 100 * 15) / 1e6));
  CHECK(claude.cost(1'000, 100) == Approx((1'000 * 3 + 100 * 15) / 1e6));
  CHECK(claude.most_cost(1'000, 100) == Approx((1'000 * 3.75 + 100 * 15) / 1e6));
  CHECK(claude.limited_usage(used).tokens == 300);  // the 800 read are not counted
  CHECK(mine.limited_usage(used).tokens == 1'100);
}
