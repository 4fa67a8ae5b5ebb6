// What the failure tests share (they are built together, in this order: see
// tests/CMakeLists.txt).
#pragma once

#include <weir/failure/backoff.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/failure/retry.hpp>
#include <weir/failure/retry_budget.hpp>
#include <weir/failure/timeout.hpp>
#include <weir/testing/manual_clock.hpp>

#include "common.hpp"

#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::run_ready;
using weir_test::finished;
