// What the adaptive-concurrency tests share (built together: see tests/CMakeLists.txt).
#pragma once

#include "common.hpp"

#include <weir/observability/metrics.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/testing/model_server.hpp>

#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = weir::testing::manual_clock;
using weir::testing::advance;
using weir::testing::run_ready;
using server_type = weir::testing::model_server<clock_type>;
