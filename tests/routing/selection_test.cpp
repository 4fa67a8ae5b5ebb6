// Specifications of weir/routing/selection.hpp: pure functions, no coroutine.
#include "../support/routing.hpp"

// Selection is pure: specs, views and numbers in, a ranking out; no coroutine, server or clock.
TEST_CASE("selection ranks what may be tried now and says when the first blocked one frees up",
          "[routing][selection][router]") {
  namespace r = weir::routing;
  using steady = std::chrono::steady_clock;
  const std::vector<r::model_spec> specs = {
      {.provider = "a", .id = "cheap", .input_price = 1, .output_price = 1, .capability = 5},
      {.provider = "a", .id = "small", .input_price = 0.5, .capability = 5, .context_window = 1000},
      {.provider = "b", .id = "dear", .input_price = 9, .output_price = 9, .capability = 9},
      {.provider = "b", .id = "weak", .input_price = 0.1, .capability = 2},
  };
  std::vector<r::model_view<steady>> views;
  for (const auto& s : specs) views.push_back({.spec = &s});
  const r::basic_route_constraints<steady> c{
      .input_tokens = 900, .output_tokens = 300, .min_capability = 5};
  const std::vector<char> none_tried(specs.size(), 0);
  const std::vector<std::int64_t> no_wait(specs.size(), 0);
  const steady::time_point now{1h};
  const auto strategy = r::strategies::cheapest<steady>();
  const auto rank = [&](r::ranking& ranked, auto blocked, const std::vector<char>& tried,
                        const std::vector<std::int64_t>& not_before) {
    r::rank<steady>(ranked, views, c, r::fitting_context(c), tried, not_before, now, strategy,
                    blocked);
  };

  // "small" cannot hold 1 200 tokens, "weak" is not capable: "cheap" wins, "dear" is next.
  r::ranking all(specs.size());
  rank(
      all, [](std::size_t) { return ns(0); }, none_tried, no_wait);
  CHECK(all.any_capable);
  const auto scores = all.scores.span();
  CHECK(scores[1] == r::ranking::unranked);
  CHECK(scores[3] == r::ranking::unranked);
  CHECK(scores[0] < scores[2]);
  // The cheapest has no room for 2 s: the next takes the request.
  std::vector<std::size_t> asked;
  const auto taken = r::choose(all, [&](std::size_t i) {
    asked.push_back(i);
    return i == 0 ? ns(2s) : ns(0);
  });
  CHECK(taken == std::optional<std::size_t>(2));
  CHECK(asked == std::vector<std::size_t>{0, 2});

  // "cheap" cooling for 5 s, "dear" waiting 3 s for this request: none now, the first in 3 s.
  r::ranking blocked(specs.size());
  std::vector<std::int64_t> not_before = no_wait;
  not_before[2] = (now + 3s).time_since_epoch().count();
  rank(
      blocked, [](std::size_t i) { return i == 0 ? ns(5s) : ns(0); }, none_tried, not_before);
  CHECK(!r::choose(blocked, [](std::size_t) { return ns(0); }));
  CHECK(blocked.any_capable);
  CHECK(blocked.earliest == 3s);

  // Both capable ones tried already: nothing capable is left.
  r::ranking tried_all(specs.size());
  rank(
      tried_all, [](std::size_t) { return ns(0); }, std::vector<char>{1, 0, 1, 0}, no_wait);
  CHECK(!tried_all.any_capable);

  // Refusals of the limits lower the earliest wait; cooldowns, an open breaker and batch pacing
  // add up to the longest of them.
  r::ranking limited(specs.size());
  rank(
      limited, [](std::size_t) { return ns(0); }, none_tried, no_wait);
  CHECK(!r::choose(limited, [](std::size_t i) { return i == 0 ? ns(4s) : ns(7s); }));
  CHECK(limited.earliest == 4s);
  CHECK(r::blocked_for(1s, 2s, std::nullopt, std::nullopt) == 2s);
  CHECK(r::blocked_for(1s, -5s, ns(30s), ns(10ms)) == 30s);
  CHECK(r::blocked_for(-1s, -1s, std::nullopt, std::nullopt) == 0s);
  CHECK(r::cost_of(c).tokens == 1200);
}

TEST_CASE("selection keeps to the models a request names, of any provider",
          "[routing][selection][router]") {
  namespace r = weir::routing;
  using steady = std::chrono::steady_clock;
  const r::model_spec cheap{.provider = "a", .id = "gpt", .input_price = 1, .capability = 5};
  const r::model_spec dear{.provider = "b", .id = "claude", .input_price = 9, .capability = 9};
  const r::model_spec mirror{.provider = "c", .id = "gpt", .input_price = 2, .capability = 5};
  r::basic_route_constraints<steady> c{.input_tokens = 10, .output_tokens = 10};
  const auto fits = [&](const r::model_spec& m) {
    return r::fits(r::model_view<steady>{.spec = &m}, c, r::fitting_context(c));
  };
  CHECK((fits(cheap) && fits(dear) && fits(mirror)));  // none named: any
  c.allowed_models = {"claude"};
  CHECK((!fits(cheap) && fits(dear) && !fits(mirror)));
  c.allowed_models = {"gpt"};
  CHECK((fits(cheap) && !fits(dear) && fits(mirror)));
}
