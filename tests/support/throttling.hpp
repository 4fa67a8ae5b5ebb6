// What the throttling tests share (they are built together, in this order: see
// tests/CMakeLists.txt).
#pragma once

#include "common.hpp"

#include <weir/composition/pipeline.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/throttling/token_bucket.hpp>
#include <weir/throttling/usage_monitor.hpp>

#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = weir::testing::manual_clock;
using bucket_type = weir::token_bucket<clock_type>;
using weir::testing::advance;
using weir::testing::run_ready;

using weir_test::acquisition;
