// A deadline around any callable returning asio::awaitable<T>. When it passes, the inner operation
// is cancelled through Asio's per-operation cancellation (its pending handler completes with
// operation_aborted) and the call fails with weir::error::timeout, the operation's own failure as
// its cause. A failure before the deadline comes back at once, as it is (with its retry_after);
// a cancellation of the caller comes back as operation_aborted.
//
// Where it stands decides what it bounds: inside a retry it limits each attempt, outside it limits
// the whole call, waits included.
//
//     weir::timeout<> per_attempt(10s);
//     auto reply = co_await per_attempt([&] { return client.async_post(req, asio::use_awaitable); });
#pragma once

#include <weir/error.hpp>
#include <weir/outcome.hpp>
#include <weir/pipeline.hpp>
#include <weir/stage.hpp>

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <chrono>
#include <exception>
#include <optional>

namespace weir {

template <class Clock>
class timeout_stage;

template <class Clock = std::chrono::steady_clock>
class timeout {
 public:
  using clock_type = Clock;

  // Throws weir::exception(invalid_argument) for a limit ≤ 0.
  explicit timeout(std::chrono::nanoseconds limit) : limit_(limit) {
    if (limit.count() <= 0)
      throw weir::exception(error::invalid_argument,
                            fmt::format("timeout: limit must be positive, not {}", limit));
  }

  template <class Operation>
  auto operator()(Operation op) const {
    return detail::driver<Clock, default_classifier, timeout_stage<Clock>>::run_alone(
        stage(), std::move(op));
  }

  // The timeout as a pipeline stage, which is also what operator() runs.
  timeout_stage<Clock> stage() const { return timeout_stage<Clock>(limit_); }

  std::chrono::nanoseconds limit() const noexcept { return limit_; }

 private:
  std::chrono::nanoseconds limit_;
};

// A timeout in a pipeline (see stage.hpp): a deadline on everything inside it.
template <class Clock>
class timeout_stage {
 public:
  using time_point = typename Clock::time_point;

  explicit timeout_stage(std::chrono::nanoseconds limit) : limit_(limit) {}

  struct slot {
    time_point deadline{};
  };
  static constexpr bool values_succeed = true;

  bool try_enter(slot& s, stage_context<Clock>&) {
    s.deadline = Clock::now() + std::chrono::duration_cast<typename Clock::duration>(limit_);
    return true;
  }
  template <class Outcome>
  stage_action exit(slot&, stage_context<Clock>&, const Outcome&) {
    return {};
  }

  std::optional<time_point> inside_deadline(const slot& s) const { return s.deadline; }
  std::exception_ptr deadline_passed(slot&, stage_context<Clock>&, std::exception_ptr cause) {
    return std::make_exception_ptr(
        weir::exception(error::timeout, fmt::format("no result within {}", limit_), {}, cause));
  }

 private:
  std::chrono::nanoseconds limit_;
};

}  // namespace weir
