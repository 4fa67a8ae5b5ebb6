// Specifications of what the router does with prompt caches: the limits settle what each
// provider counts, the budgets charge cached tokens at their prices, and the cache-affinity
// strategy keeps a session where its cache is warm.
#include "../support/routing.hpp"

namespace {

// One model of `provider` with a token limit; its cache rules are the provider's documented
// ones unless `reads_count` says.
weir::routing::catalog one_limited_model(std::string provider,
                                         std::optional<bool> reads_count = std::nullopt) {
  weir::routing::catalog c;
  c.add(weir::routing::model_spec{.provider = provider,
                                  .id = "m",
                                  .input_price = 3,
                                  .output_price = 15,
                                  .capability = 5,
                                  .tokens_per_minute = 60'000,
                                  .cache_reads_count = reads_count});
  return c;
}

}  // namespace

TEST_CASE(
    "a model whose provider does not count cache reads is not held back by its token "
    "limit, and budgets charge cache reads at their price",
    "[routing][router][cache]") {
  // A conversation resends a 10k-token prefix: each answer reports 10k input, 9k of them read
  // from the cache, and 100 output. Against 60k tokens a minute, counting the reads allows about
  // six requests a minute; Anthropic counts only the 1.1k others.
  const auto served_in_a_minute = [](weir::routing::catalog models, double* spent,
                                     double* recorded) {
    weir::testing::manual_clock::reset();
    asio::io_context io;
    weir::spend_budget<clock_type> budget({.name = "all", .limit = 1000});
    options o = unpaced();
    o.usage_of = [](const fake_response& r) { return std::optional(r.usage); };
    o.budgets = {budget};
    const auto provider_name = models.models()[0].provider;
    router_type r(io.get_executor(), std::move(models), o);
    provider p;
    p.latency = 100ms;
    p.script = [](const weir::routing::model_spec&, clock_type::time_point) {
      return fake_response::ok(
          {.input_tokens = 10'000, .output_tokens = 100, .cache_read_tokens = 9'000});
    };
    r.connect(provider_name, p.call<prompt>());
    int served = 0;
    auto agent = [&]() -> asio::awaitable<void> {
      for (;;) {
        auto op = r.route(prompt{}, {.input_tokens = 10'000, .output_tokens = 100});
        const auto done = co_await std::move(op);
        ++served;
        if (recorded) *recorded += done.route.cost;
      }
    };
    asio::co_spawn(io, agent(), asio::detached);
    advance<clock_type>(io, 60s);
    if (spent) *spent = budget.status().at(0).spent;
    return served;
  };
  double spent = 0, recorded = 0;
  const int anthropic = served_in_a_minute(one_limited_model("anthropic"), &spent, &recorded);
  const int counted = served_in_a_minute(one_limited_model("anthropic", true), nullptr, nullptr);
  const int openai = served_in_a_minute(one_limited_model("openai"), nullptr, nullptr);
  INFO("anthropic " << anthropic << ", counted " << counted << ", openai " << openai);
  CHECK(counted <= 7);
  CHECK(openai == counted);
  CHECK(anthropic >= 5 * counted);
  // Each request: 1k fresh input at $3, 9k read at $0.30, 100 output at $15 per million.
  const double each = (1'000 * 3 + 9'000 * 0.3 + 100 * 15) / 1e6;
  CHECK(recorded == Approx(each * (anthropic)).epsilon(0.02));
  CHECK(spent >= recorded - 1e-9);
  CHECK(spent <= recorded + each + 1e-9);  // at most the call still in flight at the end
  CHECK(each < (10'000 * 3 + 100 * 15) / 1e6 / 4);
}
