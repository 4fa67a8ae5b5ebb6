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
