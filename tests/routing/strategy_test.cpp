// Specifications of weir/routing/strategy.hpp: how the strategies rank models, seen through a
// router (after router_test.cpp, whose helpers it may use: see tests/CMakeLists.txt).
#include "../support/routing.hpp"

TEST_CASE("strategies: most headroom and lowest latency", "[routing][strategy]") {
  asio::io_context io;
  provider a, b;
  a.latency = 300ms;
  b.latency = 100ms;

  SECTION("lowest latency measures each model once, then keeps to the faster") {
    options o = unpaced();
    o.strategy = weir::routing::strategies::lowest_latency<clock_type>();
    router_type r(io.get_executor(), two_models(), o);
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    std::vector<std::string> order;
    for (int i = 0; i < 4; ++i) order.push_back(route_now(io, r, {}, 1s).value->route.provider);
    CHECK(order == std::vector<std::string>{"a", "b", "b", "b"});
    CHECK(r.status().at(1).latency == 100ms);
  }
  SECTION("most headroom spreads the load over both limits") {
    options o = unpaced();
    o.strategy = weir::routing::strategies::most_headroom<clock_type>();
    router_type r(io.get_executor(), two_models(600, 600), o);
    r.connect("a", a.call<prompt>());
    r.connect("b", b.call<prompt>());
    for (int i = 0; i < 40; ++i) route_now(io, r, {}, 1s);
    CHECK(a.calls() == 20);
    CHECK(b.calls() == 20);
  }
}
