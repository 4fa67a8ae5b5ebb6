// A scripted provider for router tests: answers each call as its script says, after a latency
// spent on the (virtual) clock, and counts what it answered.
//
//     weir::testing::fake_provider<clock> a;
//     a.script = [](const weir::routing::model_spec&, clock::time_point) { return fake_response::ok(); };
//     router.connect("a", a.call<my_request>());
#pragma once

#include <weir/core/outcome.hpp>
#include <weir/http/classify.hpp>
#include <weir/routing/catalog.hpp>
#include <weir/routing/router.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <string>

namespace weir::testing {

// A provider's answer, reduced to what routing looks at.
struct fake_response {
  unsigned status = 200;
  rate_limit_hint hint{};
  token_usage usage{};
  std::string model{};  // filled in with the model that answered
  bool context_overflow = false;
  std::string body{};  // an error's body, read as http::judge_status reads one
  // When the answer came by the wall clock, for the reset of a per-day quota its body names.
  std::chrono::system_clock::time_point wall{};

  static fake_response ok(token_usage used = {}) { return {.status = 200, .usage = used}; }
  static fake_response too_many(std::chrono::nanoseconds retry_after) {
    fake_response r{.status = 429};
    r.hint.retry_after = retry_after;
    return r;
  }
  static fake_response server_error() { return {.status = 500}; }
};

// As http::judge_status judges the status and body (2xx success, 429 rate-limited, a spent quota
// or credit exhausted, 5xx and overloads retryable, other 4xx fatal), with the response's hints.
struct fake_classifier {
  classification operator()(const outcome<fake_response>& o) const {
    if (!o.has_value()) return default_classifier{}(o);
    const auto& r = o.value();
    auto c = http::judge_status(r.status, http::hint_parser(r.wall), r.body);
    const auto from_body = c.hint.retry_after;  // Gemini's retryDelay
    c.hint = r.hint;
    if (!c.hint.retry_after) c.hint.retry_after = from_body;
    return c;
  }
};

template <class Clock>
class fake_provider {
 public:
  using time_point = typename Clock::time_point;

  // Decides each answer from the model asked and the time of the call.
  std::function<fake_response(const routing::model_spec&, time_point)> script =
      [](const routing::model_spec&, time_point) { return fake_response::ok(); };
  std::chrono::nanoseconds latency{0};

  // A provider_call for a router whose requests are of type Request (the fake ignores them).
  template <class Request>
  auto call() {
    return [this](const routing::model_spec& m, const Request&) { return respond(m); };
  }

  unsigned calls() const { return calls_.load(); }
  unsigned answered(unsigned status) const {
    std::lock_guard lock(mutex_);
    auto it = by_status_.find(status);
    return it == by_status_.end() ? 0 : it->second;
  }

 private:
  boost::asio::awaitable<fake_response> respond(const routing::model_spec& m) {
    ++calls_;
    auto answer = script(m, Clock::now());
    answer.model = m.id;
    if (latency.count() > 0) {
      boost::asio::basic_waitable_timer<Clock> timer(co_await boost::asio::this_coro::executor);
      timer.expires_after(std::chrono::duration_cast<typename Clock::duration>(latency));
      co_await timer.async_wait(boost::asio::use_awaitable);
    }
    {
      std::lock_guard lock(mutex_);
      ++by_status_[answer.status];
    }
    co_return answer;
  }

  std::atomic<unsigned> calls_{0};
  mutable std::mutex mutex_;
  std::map<unsigned, unsigned> by_status_;
};

}  // namespace weir::testing
