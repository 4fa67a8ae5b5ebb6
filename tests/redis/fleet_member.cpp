// One router of a fleet, in a process of its own: routes one request over providers a (cheap)
// and b, sharing what it learns through Redis, and prints the model that answered and how many
// requests reached a.
//
//     weir_fleet_member PORT FLEET a-refuses|a-answers
#include <weir/redis/fleet.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <cstdlib>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using weir::testing::fake_response;

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const int port = std::atoi(argv[1]);
  const std::string fleet = argv[2];
  const bool a_refuses = std::string(argv[3]) == "a-refuses";

  asio::io_context io(1);
  weir::redis::client redis(io.get_executor(), {.port = port});
  weir::routing::catalog models;
  models.add(weir::routing::model_spec{
      .provider = "a", .id = "a-small", .input_price = 1, .output_price = 2, .capability = 5});
  models.add(weir::routing::model_spec{
      .provider = "b", .id = "b-large", .input_price = 3, .output_price = 6, .capability = 8});
  weir::routing::router<std::string, fake_response, std::chrono::steady_clock,
                        weir::testing::fake_classifier>::options_type options;
  options.adaptation.reset();
  options.fleet =
      std::make_shared<weir::redis::fleet_state>(redis, weir::redis::fleet_options{.name = fleet});
  weir::routing::router<std::string, fake_response, std::chrono::steady_clock,
                        weir::testing::fake_classifier>
      router(io.get_executor(), models, options);
  int reached_a = 0;
  router.connect(
      "a",
      [&](const weir::routing::model_spec&, const std::string&) -> asio::awaitable<fake_response> {
        ++reached_a;
        auto spent = fake_response::too_many(30s);  // the quota is spent for 30 s
        spent.hint.requests.remaining = 0;
        co_return a_refuses ? spent : fake_response::ok();
      });
  router.connect(
      "b",
      [](const weir::routing::model_spec&, const std::string&) -> asio::awaitable<fake_response> {
        co_return fake_response::ok();
      });
  std::string answered;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        std::string request = "hello";
        auto routed = co_await router.route(request, {.wait_for_capacity = false});
        answered = routed.route.model;
        // The cooldown's publication is fire and forget: a read after it means it has landed
        // (one connection, answered in order).
        co_await options.fleet->read();
        redis.close();
      },
      asio::detached);
  io.run();
  fmt::print("{} {}\n", answered, reached_a);
}
