// A deadline around any callable returning asio::awaitable<T>. When it passes, the inner operation
// is cancelled through Asio's per-operation cancellation (its pending handler completes with
// operation_aborted) and the call fails with weir::error::timeout, the operation's own failure as
// its cause. A failure before the deadline comes back at once, as it is (with its retry_after);
// a cancellation of the caller comes back as operation_aborted.
//
// Where it stands decides what it bounds: inside a retry it limits each attempt, outside it limits
// the whole call, waits included.
//
//     weir::timeout<> per_attempt(10s);   // or ({.limit = 10s, .name = "per attempt"})
//     auto reply = co_await per_attempt([&] { return client.async_post(req, asio::use_awaitable); });
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/driver.hpp>

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace weir {

struct timeout_options {
  std::chrono::nanoseconds limit{0};  // required: how long what is inside may take
  std::string name = "timeout";       // in its error's message
};

template <class Clock>
class timeout_stage;

template <class Clock = std::chrono::steady_clock>
class timeout {
 public:
  using clock_type = Clock;

  // Throws weir::exception(invalid_argument) for a limit ≤ 0.
  explicit timeout(timeout_options options)
      : options_(std::make_shared<const timeout_options>(std::move(options))) {
    if (options_->limit.count() <= 0)
      detail::invalid_option(options_->name.c_str(), "limit", options_->limit, "be positive");
  }
  // timeout(10s) is timeout({.limit = 10s}).
  explicit timeout(std::chrono::nanoseconds limit) : timeout(timeout_options{.limit = limit}) {}

  template <class Operation>
  auto operator()(Operation op) const {
    return detail::driver<Clock, default_classifier, timeout_stage<Clock>>::run_alone(
        stage(), std::move(op));
  }

  // The timeout as a pipeline stage, which is also what operator() runs.
  timeout_stage<Clock> stage() const { return timeout_stage<Clock>(options_); }

  std::chrono::nanoseconds limit() const noexcept { return options_->limit; }
  const std::string& name() const noexcept { return options_->name; }

 private:
  std::shared_ptr<const timeout_options> options_;  // shared: a stage copies one pointer
};

// A timeout in a pipeline (see stage.hpp): a deadline on everything inside it.
template <class Clock>
class timeout_stage {
 public:
  using time_point = typename Clock::time_point;

  explicit timeout_stage(std::shared_ptr<const timeout_options> options)
      : options_(std::move(options)) {}

  std::string_view name() const noexcept { return options_->name; }

  struct slot {
    time_point deadline{};
  };
  static constexpr bool values_succeed = true;

  bool try_enter(slot& s, stage_context<Clock>&) {
    s.deadline =
        Clock::now() + std::chrono::duration_cast<typename Clock::duration>(options_->limit);
    return true;
  }
  template <class Outcome>
  stage_action exit(slot&, stage_context<Clock>&, const Outcome&) {
    return {};
  }

  std::optional<time_point> inside_deadline(const slot& s) const { return s.deadline; }
  std::exception_ptr deadline_passed(slot&, stage_context<Clock>&, std::exception_ptr cause) {
    return std::make_exception_ptr(
        weir::exception(error::timeout,
                        fmt::format("{}: no result within {}", options_->name,
                                    std::chrono::duration<double>(options_->limit)),
                        {}, cause));
  }

 private:
  std::shared_ptr<const timeout_options> options_;
};

}  // namespace weir
