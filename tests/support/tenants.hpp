// What the tenant tests share (keyed limits, spend budgets, the fair queue; built together: see
// tests/CMakeLists.txt).
#pragma once

#include "common.hpp"

#include <weir/throttling/keyed_limiter.hpp>
#include <weir/composition/pipeline.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/throttling/spend_budget.hpp>
#include <weir/testing/fake_provider.hpp>
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

using weir::testing::acquisition;
