// Specifications of weir/testing/fake_provider.hpp, the scripted provider of the router's tests
// (built with them, whose helpers it uses: see tests/CMakeLists.txt).
#include "../support/routing.hpp"

#include <stdexcept>

TEST_CASE("a fake provider answers as scripted, after its latency on the virtual clock",
          "[fake_provider]") {
  asio::io_context io;
  provider p;
  p.latency = 2s;
  p.script = [start = clock_type::now()](const weir::routing::model_spec&,
                                         clock_type::time_point at) {
    return at - start < 1min ? fake_response::too_many(5s) : fake_response::ok();
  };
  const weir::routing::model_spec small{.provider = "a", .id = "a-small"};
  std::vector<fake_response> answers;
  const auto ask = [&] {
    asio::co_spawn(io, p.call<prompt>()(small, prompt{"hi"}),
                   [&](std::exception_ptr, fake_response r) { answers.push_back(std::move(r)); });
  };
  ask();
  advance<clock_type>(io, 2s - 1ns);
  CHECK(answers.empty());
  advance<clock_type>(io, 1ns);
  REQUIRE(answers.size() == 1);
  CHECK(answers[0].status == 429);
  CHECK(answers[0].model == "a-small");  // the model that answered, filled in
  advance<clock_type>(io, 1min);
  ask();
  advance<clock_type>(io, 2s);
  REQUIRE(answers.size() == 2);
  CHECK(answers[1].status == 200);
  CHECK(p.calls() == 2);
  CHECK(p.answered(429) == 1);
  CHECK(p.answered(200) == 1);
  CHECK(p.answered(500) == 0);
}

TEST_CASE("the fake classifier judges as an HTTP response is judged, with the answer's hints",
          "[fake_provider]") {
  const auto judged = [](fake_response r) {
    return fake_classifier{}(weir::outcome<fake_response>::from_value(std::move(r)));
  };
  CHECK(judged(fake_response::ok()).kind == weir::verdict::success);
  CHECK(judged(fake_response::server_error()).kind == weir::verdict::retryable);
  CHECK(judged(fake_response{.status = 400}).kind == weir::verdict::fatal);
  const auto refused = judged(fake_response::too_many(3s));
  CHECK(refused.kind == weir::verdict::rate_limited);
  CHECK(refused.hint.retry_after == ns(3s));
  // With no Retry-After of its own, the delay its body gives (Gemini's retryDelay).
  const auto gemini = judged(fake_response{
      .status = 429,
      .body = R"({"error":{"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay":"7s"}]}})"});
  CHECK(gemini.kind == weir::verdict::rate_limited);
  CHECK(gemini.hint.retry_after == ns(7s));
  // A failure without an answer: as the default classifier judges it.
  const auto failed = weir::outcome<fake_response>::from_exception(
      std::make_exception_ptr(std::runtime_error("connection reset")));
  CHECK(fake_classifier{}(failed).kind == weir::default_classifier{}(failed).kind);
}
