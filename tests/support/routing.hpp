// What the routing tests share (they are built together, in this order: see
// tests/CMakeLists.txt).
#pragma once

#include <weir/routing/catalog_json.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>
#include <weir/testing/manual_clock.hpp>

#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::fake_classifier;
using weir::testing::fake_response;
using provider = weir::testing::fake_provider<clock_type>;

namespace {

struct prompt {
  std::string text;
};

using router_type = weir::routing::router<prompt, fake_response, clock_type, fake_classifier>;
using constraints = router_type::constraints;
using options = router_type::options_type;

// Two providers with one model each: a is cheaper than b.
weir::routing::catalog two_models(double a_rpm = 0, double b_rpm = 0) {
  weir::routing::catalog c;
  c.add(weir::routing::model_spec{.provider = "a",
                                  .id = "a-small",
                                  .input_price = 1,
                                  .output_price = 2,
                                  .capability = 5,
                                  .context_window = 8'000,
                                  .requests_per_minute = a_rpm});
  c.add(weir::routing::model_spec{.provider = "b",
                                  .id = "b-large",
                                  .input_price = 3,
                                  .output_price = 6,
                                  .capability = 8,
                                  .context_window = 100'000,
                                  .requests_per_minute = b_rpm});
  return c;
}

// Most specifications here are about choosing, not pacing: the limits stay exactly as the
// catalog gives them, and a model without limits is not paced (no discovery).
options unpaced() {
  options o;
  o.adaptation.reset();
  return o;
}

// unpaced(), writing each event's text into `seen`.
options unpaced_recording(std::vector<std::string>& seen) {
  options o = unpaced();
  o.watch = [&seen](const weir::event& e) { seen.push_back(fmt::format("{}", e)); };
  return o;
}

// A 429 that says the quota is spent for `retry_after`.
fake_response exhausted(ns retry_after) {
  auto r = fake_response::too_many(retry_after);
  r.hint.requests.remaining = 0;
  return r;
}

// The outcome of one route: what came back, or the weir error.
struct route_result {
  std::optional<weir::routing::routed<fake_response>> value;
  std::optional<weir::exception> error;
  bool done = false;
};

void start(asio::io_context& io, router_type& r, constraints c, route_result& out) {
  asio::co_spawn(
      io, r.route(prompt{"hello"}, std::move(c)),
      [&out](std::exception_ptr e, std::optional<weir::routing::routed<fake_response>> v) {
        out.done = true;
        if (!e) {
          out.value = std::move(v);
          return;
        }
        try {
          std::rethrow_exception(e);
        } catch (const weir::exception& x) {
          out.error = x;
        } catch (const std::exception& x) {
          FAIL("not a weir::exception: " << x.what());
        }
      });
}

route_result route_now(asio::io_context& io, router_type& r, constraints c = {},
                       ns let_pass = 0ns) {
  route_result out;
  start(io, r, std::move(c), out);
  advance<clock_type>(io, let_pass);
  return out;
}

}  // namespace
