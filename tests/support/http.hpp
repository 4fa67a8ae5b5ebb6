// What the http tests share (they are built together, in this order: see
// tests/CMakeLists.txt).
#pragma once

#include <weir/composition/pipeline.hpp>
#include <weir/failure/retry.hpp>
#include <weir/http/adaptation.hpp>
#include <weir/http/beast.hpp>
#include <weir/http/classify.hpp>
#include <weir/http/hints.hpp>
#include <weir/http/limits.hpp>
#include <weir/http/metrics_endpoint.hpp>
#include <weir/http/parse.hpp>
#include <weir/http/sse.hpp>
#include <weir/http/usage.hpp>
#include <weir/testing/manual_clock.hpp>
#include <weir/throttling/token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <deque>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>

namespace asio = boost::asio;
namespace http = boost::beast::http;
using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;
using weir::http::max_hint;
using sys = std::chrono::system_clock;

namespace {
// 2026-11-28T12:00:00Z
const sys::time_point noon =
    sys::time_point(std::chrono::sys_days(std::chrono::year(2026) / 11 / 28)) + 12h;

weir::rate_limit_hint hints(std::initializer_list<std::pair<std::string, std::string>> fields,
                            sys::time_point now = noon) {
  weir::http::hint_parser p(now);
  for (const auto& [name, value] : fields) p.add(name, value);
  return p.hint();
}
}  // namespace
