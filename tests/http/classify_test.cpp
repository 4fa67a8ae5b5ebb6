// Specifications of weir/http/classify.hpp: any client's status and header pairs, judged (after
// beast_test.cpp, whose response() it uses).
#include "../support/http.hpp"

TEST_CASE("a status and header pairs from any client are judged as Beast's response is",
          "[http][classify]") {
  using v = weir::verdict;
  using pairs = std::vector<std::pair<std::string, std::string>>;
  const pairs limited{{"Retry-After", "2"},
                      {"x-ratelimit-limit-requests", "500"},
                      {"x-ratelimit-remaining-requests", "0"}};
  const auto judged = weir::http::judge_status(429, limited);
  CHECK(judged.kind == v::rate_limited);
  CHECK(judged.hint.retry_after == ns(2s));
  CHECK(judged.hint.requests.limit == 500);
  CHECK(judged.hint.requests.remaining == 0);
  // Any range of pairs of anything that is a string view: here a map of string_views.
  const std::map<std::string_view, std::string_view> overloaded{{"retry-after-ms", "1500"}};
  CHECK(weir::http::judge_status(503, overloaded).kind == v::retryable);
  CHECK(weir::http::judge_status(503, overloaded).hint.retry_after == ns(1500ms));
  CHECK(weir::http::judge_status(500, pairs{{"x-should-retry", "false"}}).kind == v::fatal);
  CHECK(weir::http::judge_status(404, pairs{}).kind == v::fatal);
  const unsigned too_early[] = {425};
  CHECK(weir::http::judge_status(425, pairs{}, {}, too_early).kind == v::retryable);
  // Gemini says when in the body.
  const auto gemini = weir::http::judge_status(
      429, pairs{}, R"({"error":{"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay":"7s"}]}})");
  CHECK(gemini.hint.retry_after == ns(7s));
  // The same headers through Beast: the same judgement.
  const auto now = sys::now();
  for (unsigned status : {200u, 429u, 503u, 400u}) {
    auto r = response(status);
    for (const auto& [name, value] : limited) r.insert(name, value);
    const auto by_beast = weir::http::response_classifier{}.judge(r, now);
    const auto by_pairs = weir::http::judge_status(status, limited, {}, {}, now);
    CHECK(by_beast.kind == by_pairs.kind);
    CHECK(by_beast.hint.retry_after == by_pairs.hint.retry_after);
    CHECK(by_beast.hint.requests.remaining == by_pairs.hint.requests.remaining);
  }
}
