// What the admission tests share: per-key limits, spend budgets, adaptive concurrency and the
// model server they are measured against (throttling layer; built together, in this order: see
// tests/CMakeLists.txt).
#pragma once

#include "common.hpp"

#include <weir/composition/pipeline.hpp>
#include <weir/observability/metrics.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/testing/model_server.hpp>
#include <weir/throttling/adaptive_concurrency.hpp>
#include <weir/throttling/keyed_limiter.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/throttling/spend_budget.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
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
using server_type = weir::testing::model_server<clock_type>;

using weir_test::acquisition;
