// What the core tests share (they are built together, in this order: see
// tests/CMakeLists.txt).
#pragma once

#include <weir/testing/manual_clock.hpp>
#include <weir/weir.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <stdexcept>
#include <system_error>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = weir::testing::manual_clock;
using timer = asio::basic_waitable_timer<clock_type>;
