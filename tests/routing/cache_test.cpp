// Specifications of what the router does with prompt caches: the limits settle what each
// provider counts, the budgets charge cached tokens at their prices, and the cache-affinity
// strategy keeps a session where its cache is warm.
#include "../support/routing.hpp"

#include <fmt/format.h>

#include <map>
#include <random>
#include <string>
#include <tuple>
#include <utility>

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

namespace {

// Two providers with one model each, priced alike but for b's factor, their cache reads at a
// tenth of the input price and writes at 1.25×, each model limited to its requests and tokens a
// minute (0: no limit).
struct model_limits {
  double requests_per_minute = 0;
  double tokens_per_minute = 0;
};
weir::routing::catalog two_caching_models(model_limits a, model_limits b, double b_factor = 1) {
  weir::routing::catalog c;
  for (auto [name, limits, factor] : {std::tuple{"a", a, 1.0}, std::tuple{"b", b, b_factor}})
    c.add(weir::routing::model_spec{.provider = name,
                                    .id = std::string(name) + "-m",
                                    .input_price = 3 * factor,
                                    .output_price = 15 * factor,
                                    .capability = 5,
                                    .requests_per_minute = limits.requests_per_minute,
                                    .tokens_per_minute = limits.tokens_per_minute,
                                    .cached_input_price = 0.3 * factor,
                                    .cache_write_price = 3.75 * factor});
  return c;
}

// A conversation's turn, as the mock providers read it: "session/input tokens".
prompt turn_of(const std::string& session, std::uint64_t input) {
  return prompt{fmt::format("{}/{}", session, input)};
}

// The providers' prompt caches, as Anthropic's works with a breakpoint on the last message: a
// prompt is cached for 5 minutes after its last use; a later prompt of the same session to the
// same model reads that much from the cache and writes the rest.
struct mock_prompt_caches {
  struct held {
    std::uint64_t tokens = 0;
    clock_type::time_point until{};
  };
  std::map<std::pair<std::string, std::string>, held> by_model_and_session;
  ns latency = 500ms;

  // The provider_call of every provider: answers `output` tokens after the latency.
  router_type::provider_call call(std::uint64_t output) {
    return [this, output](const weir::routing::model_spec& m, const prompt& p) {
      return answer(m.id, p.text, output);
    };
  }

  asio::awaitable<fake_response> answer(std::string model, std::string text, std::uint64_t output) {
    const auto slash = text.find('/');
    const std::string session = text.substr(0, slash);
    const std::uint64_t input = std::stoull(text.substr(slash + 1));
    auto& h = by_model_and_session[{model, session}];
    const auto now = clock_type::now();
    const std::uint64_t read = h.until > now ? std::min(h.tokens, input) : 0;
    h = {input, now + 5min};
    asio::basic_waitable_timer<clock_type> t(
        co_await asio::this_coro::executor,
        std::chrono::duration_cast<clock_type::duration>(latency));
    co_await t.async_wait(asio::use_awaitable);
    co_return fake_response::ok({.input_tokens = input,
                                 .output_tokens = output,
                                 .cache_read_tokens = read,
                                 .cache_write_tokens = input - read});
  }
};

struct workload_result {
  double cost = 0;
  std::uint64_t input = 0, read = 0;
  int served = 0;
  double hit_rate() const { return input ? static_cast<double>(read) / input : 0; }
};

// Ten conversations of eight turns each, their users thinking 1 to 16 s between turns (seeded):
// each turn resends the conversation so far (1500 tokens more each turn) and gets 300 tokens
// back. Together they need more tokens than a's limit (450k a minute) allows at times, fewer
// than a's and b's (900k) together.
workload_result multi_turn(weir::routing::basic_strategy<clock_type> strategy, double b_factor) {
  weir::testing::manual_clock::reset();
  asio::io_context io;
  options o = unpaced();
  o.strategy = std::move(strategy);
  o.usage_of = [](const fake_response& r) { return std::optional(r.usage); };
  router_type r(
      io.get_executor(),
      two_caching_models({.tokens_per_minute = 450'000}, {.tokens_per_minute = 900'000}, b_factor),
      o);
  mock_prompt_caches caches;
  r.connect("a", caches.call(300));
  r.connect("b", caches.call(300));
  workload_result out;
  std::mt19937 random(7);
  auto conversation = [&](int n) -> asio::awaitable<void> {
    const std::string session = fmt::format("conversation-{}", n);
    asio::basic_waitable_timer<clock_type> think(co_await asio::this_coro::executor);
    think.expires_after(std::chrono::milliseconds(700 * n));
    co_await think.async_wait(asio::use_awaitable);
    for (std::uint64_t t = 0; t < 8; ++t) {
      const std::uint64_t input = 2'000 + t * 1'500;
      auto op = r.route(turn_of(session, input),
                        {.input_tokens = input, .output_tokens = 300, .session = session});
      const auto done = co_await std::move(op);
      out.cost += done.route.cost;
      out.input += input;
      out.read += done.route.cache_read_tokens;
      ++out.served;
      think.expires_after(std::chrono::milliseconds(1'000 + random() % 15'000));
      co_await think.async_wait(asio::use_awaitable);
    }
  };
  for (int n = 0; n < 10; ++n) asio::co_spawn(io, conversation(n), asio::detached);
  advance<clock_type>(io, 10min);
  return out;
}

}  // namespace

TEST_CASE(
    "cache affinity keeps conversations on their warm model: cheaper than cheapest-first "
    "when the providers price alike and when the cheapest changes under load",
    "[routing][router][cache][affinity]") {
  for (const double b_factor : {1.0, 1.1}) {
    const auto cheapest = multi_turn(weir::routing::strategies::cheapest<clock_type>(), b_factor);
    const auto affinity =
        multi_turn(weir::routing::strategies::cache_affinity<clock_type>(), b_factor);
    INFO("b at " << b_factor << "x: cheapest-first $" << cheapest.cost << ", hit rate "
                 << cheapest.hit_rate() << "; affinity $" << affinity.cost << ", hit rate "
                 << affinity.hit_rate());
    CHECK(cheapest.served == 80);
    CHECK(affinity.served == 80);
    CHECK(affinity.hit_rate() > cheapest.hit_rate() + 0.04);
    CHECK(affinity.cost < cheapest.cost * 0.93);
  }
}

TEST_CASE(
    "cache affinity moves a session when its warm model has no room, and stays on the new "
    "one while its cache lives",
    "[routing][router][cache][affinity]") {
  asio::io_context io;
  options o = unpaced();
  o.strategy = weir::routing::strategies::cache_affinity<clock_type>();
  o.usage_of = [](const fake_response& r) { return std::optional(r.usage); };
  router_type r(io.get_executor(),
                two_caching_models({.requests_per_minute = 1}, {.requests_per_minute = 60}),
                o);  // a: one request a minute
  mock_prompt_caches caches;
  caches.latency = 0ns;
  r.connect("a", caches.call(100));
  r.connect("b", caches.call(100));
  const auto turn = [&](std::uint64_t input) {
    route_result out;
    asio::co_spawn(
        io, r.route(turn_of("s", input), {.input_tokens = input, .session = "s"}),
        [&out](std::exception_ptr e, std::optional<weir::routing::routed<fake_response>> v) {
          out.done = true;
          if (!e) out.value = std::move(v);
        });
    advance<clock_type>(io, 0ns);
    REQUIRE(out.value);
    return out.value->route;
  };
  CHECK(turn(1'000).model == "a-m");  // the first in the catalog: they price alike
  advance<clock_type>(io, 5s);
  const auto moved = turn(2'000);  // a is warm but has no room for a minute: no waiting
  CHECK(moved.model == "b-m");
  CHECK(moved.cache_read_tokens == 0);
  advance<clock_type>(io, 70s);  // a has room again; b's cache is the warmer
  const auto stayed = turn(3'000);
  CHECK(stayed.model == "b-m");
  CHECK(stayed.cache_read_tokens == 2'000);
  advance<clock_type>(io, 6min);  // every cache has expired: the first in the catalog again
  const auto cold = turn(4'000);
  CHECK(cold.model == "a-m");
  CHECK(cold.cache_read_tokens == 0);
}
