// Retry around any callable returning asio::awaitable<T>, that obeys the server's retry_after
// and never turns into a storm.
//
//     weir::retry<> retry({.max_attempts = 4, .budget = shared_budget});
//     auto reply = co_await retry([&] { return client.async_post(req, asio::use_awaitable); });
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/outcome.hpp>
#include <weir/detail/driver.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/failure/backoff.hpp>
#include <weir/failure/retry_budget.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <type_traits>

namespace weir {

// What on_retry sees before each wait.
struct retry_attempt {
  unsigned attempt = 0;               // the attempt that failed, from 1
  std::chrono::nanoseconds delay{0};  // the wait before the next attempt
  classification cause;               // why it failed, with the server's hint
  std::exception_ptr error;           // the failure, when it was an error (not a value)
};

// Classifier: what judges each attempt's outcome (outcome.hpp); HTTP-aware ones are in weir/http.
template <class Classifier = default_classifier>
struct basic_retry_options {
  unsigned max_attempts = 3;  // attempts in all, the first included
  // The whole call, attempts and waits, ends within this: a wait that would pass it is not made,
  // and an attempt still running when it passes is cancelled (error::timeout).
  std::chrono::nanoseconds max_elapsed = std::chrono::nanoseconds::max();
  weir::backoff backoff =
      weir::backoff::exponential(std::chrono::milliseconds(500), 2.0, std::chrono::seconds(8))
          .with(weir::jitter::full);
  // A server hint longer than this fails at once with rate_limited instead of sleeping on it.
  std::chrono::nanoseconds max_retry_after = std::chrono::seconds(60);
  std::optional<retry_budget> budget{};                  // shared across calls; none: unlimited
  std::function<void(const retry_attempt&)> on_retry{};  // called before each wait
  std::uint64_t seed = 0;                                // for the jitter; 0: from random_device
  std::string name = "retry";  // in events (retry_scheduled, rejected) and metrics
  Classifier classifier{};
};
using retry_options = basic_retry_options<>;

template <class Clock, class Classifier>
class retry_stage;

// Copies share options, budget and random source.
//
// Each attempt's outcome goes through the classifier: success returns the value; fatal returns a
// value as it is (e.g. an HTTP 400 the caller wants to read) or rethrows the error; retryable and
// rate-limited outcomes are tried again after max(backoff, retry_after). Giving up after a
// failing *value* (a 503 response, say) returns that last value, as Polly and Resilience4j do:
// the caller reads what the server said. Giving up after an error throws a weir::exception
// carrying the attempts, the last hint and the last failure as its cause:
//   retries_exhausted   max_attempts reached, or the next wait would pass max_elapsed
//   rate_limited        the server's retry_after exceeds max_retry_after or passes max_elapsed
//   budget_exhausted    the shared budget has no retry left
//   timeout             max_elapsed passed during an attempt (which was cancelled)
// Cancellation aborts the wait or the attempt at once (operation_aborted). A call shares the
// retry's state: destroying the retry does not end the calls made through it.
template <class Clock = std::chrono::steady_clock, class Classifier = default_classifier>
class retry {
 public:
  using clock_type = Clock;
  using options_type = basic_retry_options<Classifier>;

  // Throws weir::exception(invalid_argument) for max_attempts 0 or negative durations.
  explicit retry(options_type options = {}) : state_(std::make_shared<state>(std::move(options))) {}

  template <class Operation>
  auto operator()(Operation op) const {
    return detail::driver<Clock, default_classifier, retry_stage<Clock, Classifier>>::run_alone(
        stage(), std::move(op));
  }

  // The retry as a pipeline stage, which is also what operator() runs.
  retry_stage<Clock, Classifier> stage() const { return retry_stage<Clock, Classifier>(*this); }

  const options_type& options() const noexcept { return state_->options; }
  const std::string& name() const noexcept { return state_->options.name; }

  // ---- the synchronous halves, for a caller (or pipeline) running its own attempt loop ----

  // Where one call stands between attempts.
  struct progress {
    unsigned attempt = 1;                  // the attempt under way, from 1
    std::chrono::nanoseconds previous{0};  // the last wait
    typename Clock::time_point started{};  // set when max_elapsed is bounded
  };

  // What to do after a failed attempt: wait `delay` and try again, or give up (`error` set).
  struct decision {
    std::chrono::nanoseconds delay{0};
    std::exception_ptr error;
  };

  // A call begins: it earns its share of the retry budget.
  progress begin() const { return state_->begin(); }

  // Attempt `p.attempt` failed as `c` says (with `failure`, empty for a failing value). On a
  // decision to retry, `p` moves to the next attempt and on_retry has been called.
  decision next(progress& p, const classification& c, std::exception_ptr failure) const {
    return state_->next(p, c, std::move(failure));
  }

  const Classifier& classifier() const noexcept { return state_->options.classifier; }

 private:
  struct state {
    explicit state(options_type o) : options(std::move(o)) {
      if (options.max_attempts == 0)
        detail::invalid_option("retry", "max_attempts", options.max_attempts, "be at least 1");
      if (options.max_elapsed.count() <= 0)
        detail::invalid_option("retry", "max_elapsed", options.max_elapsed, "be positive");
      if (options.max_retry_after.count() < 0)
        detail::invalid_option("retry", "max_retry_after", options.max_retry_after,
                               "not be negative");
      random.seed(options.seed ? options.seed : std::random_device{}());
    }

    bool bounded() const noexcept { return options.max_elapsed != std::chrono::nanoseconds::max(); }

    std::chrono::nanoseconds backoff_delay(unsigned attempt, std::chrono::nanoseconds previous) {
      std::lock_guard lock(random_mutex);
      return options.backoff.delay(attempt, previous, random);
    }

    progress begin() {
      const bool timed = bounded() || options.budget;
      const auto now = timed ? Clock::now() : typename Clock::time_point{};
      if (options.budget) options.budget->deposit(now.time_since_epoch());
      return {1, {}, now};
    }

    decision next(progress& p, const classification& c, std::exception_ptr failure) {
      auto give_up = [&](error e, const char* why) {
        return decision{{},
                        std::make_exception_ptr(
                            weir::exception(e, why, c.hint.retry_after, failure, p.attempt))};
      };
      if (p.attempt >= options.max_attempts)
        return give_up(error::retries_exhausted, "no attempts left");
      auto delay = backoff_delay(p.attempt - 1, p.previous);
      if (c.hint.retry_after) {
        if (*c.hint.retry_after > options.max_retry_after)
          return give_up(error::rate_limited, "server asked to wait longer than max_retry_after");
        delay = std::max(delay, *c.hint.retry_after);
      }
      const auto now = bounded() || options.budget ? Clock::now() : typename Clock::time_point{};
      if (bounded() && now - p.started + delay > options.max_elapsed)
        return give_up(c.hint.retry_after ? error::rate_limited : error::retries_exhausted,
                       "the next wait would pass max_elapsed");
      if (options.budget && !options.budget->try_withdraw(now.time_since_epoch()))
        return give_up(error::budget_exhausted, "the retry budget is spent");
      if (options.on_retry) options.on_retry(retry_attempt{p.attempt, delay, c, failure});
      ++p.attempt;
      p.previous = delay;
      return {delay, {}};
    }

    options_type options;
    std::mutex random_mutex;
    std::mt19937_64 random;
  };

  std::shared_ptr<state> state_;
};

template <class Classifier>
retry(basic_retry_options<Classifier>) -> retry<std::chrono::steady_clock, Classifier>;

// A retry in a pipeline (see stage.hpp): its exit sends the call back through the stages inside
// it after the wait, and max_elapsed bounds everything inside it.
template <class Clock, class Classifier>
class retry_stage {
 public:
  using time_point = typename Clock::time_point;

  explicit retry_stage(retry<Clock, Classifier> policy) : policy_(std::move(policy)) {}

  struct slot {
    typename retry<Clock, Classifier>::progress progress{};
    // When max_elapsed passes (max: never). Not an optional: written apart, its flag and time were
    // read back together on every call, a hot spot in the driver's profile.
    time_point deadline = time_point::max();
    bool begun = false;
    bool expired = false;  // it passed during an attempt
  };
  static constexpr bool values_succeed = every_value_succeeds<Classifier>;

  std::string_view name() const noexcept { return policy_.name(); }

  bool try_enter(slot& s, stage_context<Clock>&) {
    if (!s.begun) {
      s.progress = policy_.begin();
      s.begun = true;
      if (const auto limit = policy_.options().max_elapsed;
          limit != std::chrono::nanoseconds::max())
        s.deadline =
            s.progress.started + std::chrono::duration_cast<typename Clock::duration>(limit);
    }
    return true;
  }

  template <class Outcome>
  stage_action exit(slot& s, stage_context<Clock>& context, const Outcome& result) {
    if constexpr (is_plain_success<Outcome>) {
      return {};
    } else {
      if constexpr (every_value_of_succeeds<Classifier, typename Outcome::value_type>) {
        if (result.has_value()) return {};
      }
      if (s.expired || context.delivered) return {};
      const classification c = policy_.classifier()(result);
      if (c.kind == verdict::success || c.kind == verdict::fatal || c.kind == verdict::exhausted)
        return {};
      const unsigned failed_attempt = s.progress.attempt;
      auto d = policy_.next(s.progress, c, result.failure());
      if (d.error) {
        if (auto ec = detail::weir_code(d.error); ec && *ec == error::budget_exhausted)
          context.emit(rejected{context.call.operation, rejection::budget_exhausted, {}, name()});
        // A failing value goes back to the caller as it is; an error becomes the give-up.
        if (result.has_value()) return {};
        return {std::nullopt, d.error};
      }
      context.emit(
          retry_scheduled{context.call.operation, failed_attempt, d.delay, c.kind, name()});
      return {d.delay, {}};
    }
  }

  std::optional<time_point> inside_deadline(const slot& s) const {
    if (s.deadline == time_point::max()) return std::nullopt;
    return s.deadline;
  }
  std::exception_ptr deadline_passed(slot& s, stage_context<Clock>&, std::exception_ptr cause) {
    s.expired = true;
    return std::make_exception_ptr(weir::exception(
        error::timeout, "max_elapsed passed during an attempt", {}, cause, s.progress.attempt));
  }

 private:
  retry<Clock, Classifier> policy_;
};

}  // namespace weir
