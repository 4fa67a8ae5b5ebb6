// What the tenant tests share (keyed limits, spend budgets, the fair queue; built together: see
// tests/CMakeLists.txt).
#pragma once

#include "common.hpp"

#include <weir/keyed_limiter.hpp>
#include <weir/spend_budget.hpp>
#include <weir/pipeline.hpp>
#include <weir/request_queue.hpp>
#include <weir/testing/manual_clock.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::run_ready;

namespace {
// How an acquisition completed.
struct keyed_acquisition {
  std::optional<weir::error_code> result;
  std::chrono::nanoseconds waited{-1};
  auto handler() {
    return [this](weir::error_code ec, std::chrono::nanoseconds w) {
      result = ec;
      waited = w;
    };
  }
};
}  // namespace
