// Specifications of weir/routing/catalog_json.hpp.
#include "../support/routing.hpp"

#include <boost/json/src.hpp>  // Boost.JSON is compiled once per program: here

// ---- the JSON catalog ---------------------------------------------------------------------

TEST_CASE("a catalog loads from JSON", "[routing][catalog]") {
  const auto c = weir::routing::load_catalog(R"({
    "providers": [
      {"name": "openai", "default_cooldown_seconds": 2.5,
       "breaker": {"consecutive_failures": 3, "break_seconds": 10}}
    ],
    "models": [
      {"provider": "openai", "id": "gpt-4o-mini", "input_price": 0.15, "output_price": 0.6,
       "capability": 7, "context_window": 128000,
       "requests_per_minute": 500, "tokens_per_minute": 200000},
      {"provider": "groq", "id": "llama-3.1-8b", "capability": 5}
    ]
  })");
  REQUIRE(c.models().size() == 2);
  REQUIRE(c.providers().size() == 2);
  CHECK(c.providers()[0].default_cooldown == 2500ms);
  CHECK(c.providers()[0].breaker.consecutive_failures == 3);
  CHECK(c.providers()[0].breaker.break_duration == 10s);
  CHECK(c.models()[0].context_window == 128'000);
  CHECK(c.models()[0].output_price == 0.6);
  CHECK(c.models()[1].provider == "groq");
  CHECK(c.find_provider("groq"));
}

TEST_CASE("cache prices and limit rules: given, the provider's, or its documented default",
          "[routing][catalog][cache]") {
  const auto c = weir::routing::load_catalog(R"({
    "providers": [
      {"name": "anthropic"},
      {"name": "openai"},
      {"name": "mine", "cache": {"read_factor": 0.25, "reads_count_toward_limits": false,
                                 "ttl_seconds": 3600}}
    ],
    "models": [
      {"provider": "anthropic", "id": "claude-sonnet", "input_price": 3, "capability": 8},
      {"provider": "anthropic", "id": "claude-3-haiku", "input_price": 0.25, "capability": 5,
       "cache_reads_count_toward_limits": true},
      {"provider": "openai", "id": "gpt-4o", "input_price": 2.5, "capability": 8},
      {"provider": "openai", "id": "gpt-5", "input_price": 1.25, "capability": 9,
       "cached_input_price": 0.125},
      {"provider": "mine", "id": "m", "input_price": 4, "capability": 1},
      {"provider": "groq", "id": "llama", "input_price": 0.05, "capability": 5}
    ]
  })");
  const auto model = [&](std::string_view provider, std::string_view id) {
    const auto* m = c.find_model(provider, id);
    REQUIRE(m);
    return *m;
  };
  const auto sonnet = model("anthropic", "claude-sonnet");
  CHECK(*sonnet.cached_input_price == Approx(0.3));
  CHECK(*sonnet.cache_write_price == Approx(3.75));
  CHECK(*sonnet.cache_reads_count == false);
  CHECK(*model("anthropic", "claude-3-haiku").cache_reads_count == true);
  CHECK(*model("openai", "gpt-4o").cached_input_price == Approx(1.25));
  CHECK(*model("openai", "gpt-4o").cache_write_price == Approx(2.5));
  CHECK(*model("openai", "gpt-4o").cache_reads_count == true);
  CHECK(*model("openai", "gpt-5").cached_input_price == Approx(0.125));
  CHECK(*model("mine", "m").cached_input_price == Approx(1.0));
  CHECK(*model("mine", "m").cache_write_price == Approx(4.0));  // the rest: documented (none)
  CHECK(*model("mine", "m").cache_reads_count == false);
  CHECK(c.find_provider("mine")->cache_or_documented().ttl == 1h);
  CHECK(c.find_provider("openai")->cache_or_documented().ttl == 5min);
  CHECK(*model("groq", "llama").cached_input_price == Approx(0.05));  // no discount assumed

  // What counts toward the limit, and what it costs, of 10k input of which 9k were read.
  const weir::token_usage used{
      .input_tokens = 10'000, .output_tokens = 100, .cache_read_tokens = 9'000};
  CHECK(sonnet.limited_usage(used).tokens == 1'100);
  CHECK(model("openai", "gpt-4o").limited_usage(used).tokens == 10'100);
  CHECK(sonnet.cost(used) == Approx((1'000 * 3 + 9'000 * 0.3) / 1e6));

  const auto error_of = [](const std::string& json) {
    try {
      weir::routing::load_catalog(json);
    } catch (const weir::routing::catalog_error& e) {
      return e.field();
    }
    return std::string("(no error)");
  };
  CHECK(error_of(R"({"models": [{"provider": "a", "id": "m", "capability": 1,
                    "cache_reads_count_toward_limits": "no"}]})") ==
        "models[0].cache_reads_count_toward_limits");
  CHECK(error_of(R"({"models": [{"provider": "a", "id": "m", "capability": 1,
                    "cached_input_price": -1}]})") == "models[0].cached_input_price");
  CHECK(error_of(R"({"providers": [{"name": "a", "cache": {"ttl": 5}}], "models": []})") ==
        "providers[0].cache.ttl");
}

TEST_CASE("a bad catalog file names the field and the line", "[routing][catalog]") {
  const auto error_of = [](const std::string& json) -> std::pair<std::string, std::size_t> {
    try {
      weir::routing::load_catalog(json);
    } catch (const weir::routing::catalog_error& e) {
      CHECK(e.code() == weir::error::invalid_argument);
      return {e.field(), e.line()};
    }
    return {"(no error)", 0};
  };
  CHECK(error_of("{\n \"models\": [\n  {\"provider\": \"a\", \"id\": \"m\",\n"
                 "   \"capability\": \"high\"}\n ]\n}") ==
        std::pair<std::string, std::size_t>{"models[0].capability", 4});
  CHECK(error_of("{\n \"models\": [\n  {\"provider\": \"a\", \"id\": \"m\"}\n ]\n}") ==
        std::pair<std::string, std::size_t>{"models[0].capability", 3});
  CHECK(error_of("{\"models\": [\n{\"provider\": \"a\", \"id\": \"m\", \"capability\": 1},\n"
                 "{\"provider\": \"a\", \"id\": \"m\", \"capability\": 2}]}") ==
        std::pair<std::string, std::size_t>{"models[1]", 3});
  CHECK(error_of("{\"models\": [{\"provider\": \"a\", \"id\": \"m\", \"capability\": 1,\n"
                 "  \"capabilty\": 2}]}") ==
        std::pair<std::string, std::size_t>{"models[0].capabilty", 2});
  CHECK(error_of("{\"models\": [\n  {\"provider\": \"a\",,}\n]}").second == 2);
  CHECK(error_of("{\"models\": [{\"provider\": \"a\", \"id\": \"m\", \"capability\": 1,\n"
                 "\"context_window\": 1.5}]}") ==
        std::pair<std::string, std::size_t>{"models[0].context_window", 2});
  CHECK(error_of("[]").first == "catalog");
  try {
    weir::routing::load_catalog_file("/nonexistent/catalog.json");
    FAIL("no error");
  } catch (const weir::routing::catalog_error& e) {
    CHECK(e.line() == 0);
  }
}

TEST_CASE("a catalog leaves the top-level fields its caller names to the caller",
          "[routing][catalog]") {
  const std::string json =
      R"({"models": [{"provider": "a", "id": "m", "capability": 1}], "tenants": [1, 2]})";
  CHECK_THROWS_AS(weir::routing::load_catalog(json), weir::routing::catalog_error);
  constexpr std::string_view ours[] = {"tenants", "aliases"};
  CHECK(weir::routing::load_catalog(json, ours).models().size() == 1);
}
