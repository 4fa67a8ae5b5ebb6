// A router over two providers (scripted, in-process): the cheaper one answers the first request
// with a 429 that says its quota is spent for 2 s, so that request falls back to the other one,
// and the next requests go to the other one until the cooldown ends. Each route's record says
// where it went and why.
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <chrono>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using weir::testing::fake_response;

struct prompt {
  std::string text;
};

asio::awaitable<void> ask(weir::routing::router<prompt, fake_response, std::chrono::steady_clock,
                                                weir::testing::fake_classifier>& router,
                          int n) {
  const prompt question{"question " + std::to_string(n)};
  auto [response, route] =
      co_await router.route(question, {.input_tokens = 500, .output_tokens = 200});
  fmt::print("{}: {} from {}/{} after {} attempt(s), ${:.6f}\n", question.text, response.status,
             route.provider, route.model, route.attempts, route.cost);
}

asio::awaitable<void> ask_all(auto& router) {
  for (int n = 1; n <= 3; ++n) co_await ask(router, n);
}

int main() {
  asio::io_context io;
  weir::routing::catalog models;
  models.add(weir::routing::model_spec{.provider = "cheap",
                                       .id = "small",
                                       .input_price = 0.15,
                                       .output_price = 0.6,
                                       .capability = 6});
  models.add(weir::routing::model_spec{
      .provider = "dear", .id = "large", .input_price = 2.5, .output_price = 10, .capability = 9});
  weir::routing::router<prompt, fake_response, std::chrono::steady_clock,
                        weir::testing::fake_classifier>
      router(io.get_executor(), models);

  weir::testing::fake_provider<std::chrono::steady_clock> cheap, dear;
  bool first = true;
  cheap.script = [&](const weir::routing::model_spec&, auto) {
    if (!std::exchange(first, false)) return fake_response::ok();
    auto spent = fake_response::too_many(2s);
    spent.hint.requests.remaining = 0;  // the quota is spent, not just this request
    return spent;
  };
  router.connect("cheap", cheap.call<prompt>());
  router.connect("dear", dear.call<prompt>());

  asio::co_spawn(io, ask_all(router), [](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
  });
  io.run();
  return cheap.calls() == 1 && dear.calls() == 3 ? 0 : 1;
}
