// Specifications of weir/http/limits.hpp: what the clients accept, checked at the boundary.
#include "../support/http.hpp"

TEST_CASE("header values are checked at the boundary: control characters refused, by name",
          "[http][issue36]") {
  using weir::http::check_header;
  CHECK_NOTHROW(check_header("t", "authorization", "Bearer sk-1\tok é"));
  for (const std::string& bad : {std::string("k\r\nX-Evil: 1"), std::string("k\n"),
                                 std::string("k\r"), std::string("k\0", 2), std::string("k\x7f")}) {
    try {
      check_header("t", "x-api-key", bad);
      FAIL("taken");
    } catch (const weir::exception& e) {
      CHECK(e.code() == weir::error::invalid_argument);
      CHECK(std::string(e.what()).find("x-api-key") != std::string::npos);
      CHECK(std::string(e.what()).find("Evil") == std::string::npos);
    }
  }
  CHECK_THROWS_AS(check_header("t", "x api key", "v"), weir::exception);
  CHECK_THROWS_AS(check_header("t", "", "v"), weir::exception);
}
