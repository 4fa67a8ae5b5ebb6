// What the Redis tests share (one executable, built as one translation unit: see
// tests/redis/CMakeLists.txt). They run against a real redis-server on loopback, started by the
// ctest fixture on WEIR_REDIS_PORT; the fault tests start and kill their own (rig.hpp). Real
// time: Redis keeps its own clock.
#pragma once

#include "../redis/rig.hpp"
#include "common.hpp"

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <exception>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

std::string unique_name(const char* what) {
  return fmt::format("{}-{}", what, std::chrono::steady_clock::now().time_since_epoch().count());
}

using weir_test::run_coroutine;

}  // namespace
