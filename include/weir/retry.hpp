// Retry around any callable returning asio::awaitable<T>, that obeys the server's retry_after
// and never turns into a storm.
//
//     weir::retry<> retry({.max_attempts = 4, .budget = shared_budget});
//     auto reply = co_await retry([&] { return client.async_post(req, asio::use_awaitable); });
#pragma once

#include <weir/backoff.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/error.hpp>
#include <weir/outcome.hpp>
#include <weir/retry_budget.hpp>

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
#include <type_traits>

namespace weir {

// What on_retry sees before each wait.
struct retry_attempt {
  unsigned attempt = 0;               // the attempt that failed, from 1
  std::chrono::nanoseconds delay{0};  // the wait before the next attempt
  classification cause;               // why it failed, with the server's hint
  std::exception_ptr error;           // the failure, when it was an error (not a value)
};

struct retry_options {
  unsigned max_attempts = 3;  // attempts in all, the first included
  // The whole call, waits included, must end within this; a wait that would pass it is not made.
  std::chrono::nanoseconds max_elapsed = std::chrono::nanoseconds::max();
  weir::backoff backoff =
      weir::backoff::exponential(std::chrono::milliseconds(500), 2.0, std::chrono::seconds(8))
          .with(weir::jitter::full);
  // A server hint longer than this fails at once with rate_limited instead of sleeping on it.
  std::chrono::nanoseconds max_retry_after = std::chrono::seconds(60);
  std::optional<retry_budget> budget{};                  // shared across calls; none: unlimited
  std::function<void(const retry_attempt&)> on_retry{};  // called before each wait
  std::uint64_t seed = 0;                                // for the jitter; 0: from random_device
};

// Copies share options, budget and random source.
//
// Each attempt's outcome goes through the classifier: success returns the value; fatal returns a
// value as it is (e.g. an HTTP 400 the caller wants to read) or rethrows the error; retryable and
// rate-limited outcomes are tried again after max(backoff, retry_after). Giving up throws a
// weir::exception carrying the attempts, the last hint and the last failure:
//   retries_exhausted   max_attempts reached, or the next wait would pass max_elapsed
//   rate_limited        the server's retry_after exceeds max_retry_after or passes max_elapsed
//   budget_exhausted    the shared budget has no retry left
// Cancellation aborts the wait at once (operation_aborted).
template <class Clock = std::chrono::steady_clock, class Classifier = default_classifier>
class retry {
 public:
  using clock_type = Clock;

  // Throws weir::exception(invalid_argument) for max_attempts 0 or negative durations.
  explicit retry(retry_options options = {}, Classifier classifier = {})
      : state_(std::make_shared<state>(std::move(options), std::move(classifier))) {}

  template <class Operation>
  auto operator()(Operation op) const {
    using value = awaitable_value_t<std::invoke_result_t<Operation&>>;
    return run<value>(state_.get(), std::move(op));
  }

  const retry_options& options() const noexcept { return state_->options; }

 private:
  struct state {
    state(retry_options o, Classifier c) : options(std::move(o)), classify(std::move(c)) {
      if (options.max_attempts == 0)
        throw weir::exception(error::invalid_argument, "retry needs max_attempts ≥ 1");
      if (options.max_elapsed.count() <= 0 || options.max_retry_after.count() < 0)
        throw weir::exception(error::invalid_argument, "retry durations must not be negative");
      random.seed(options.seed ? options.seed : std::random_device{}());
    }

    std::chrono::nanoseconds backoff_delay(unsigned attempt, std::chrono::nanoseconds previous) {
      std::lock_guard lock(random_mutex);
      return options.backoff.delay(attempt, previous, random);
    }

    retry_options options;
    Classifier classify;
    std::mutex random_mutex;
    std::mt19937_64 random;
  };

  // Like an Asio I/O object, the retry must outlive the calls made through it.
  template <class T, class Operation>
  static boost::asio::awaitable<T> run(state* s, Operation op) {
    const auto& o = s->options;
    const bool has_deadline = o.max_elapsed != std::chrono::nanoseconds::max();
    const auto started = has_deadline ? Clock::now() : typename Clock::time_point{};
    if (o.budget) o.budget->deposit();

    std::chrono::nanoseconds previous{0};
    for (unsigned attempt = 1;; ++attempt) {
      std::optional<outcome<T>> result;
      try {
        if constexpr (std::is_void_v<T>) {
          co_await op();
          if constexpr (every_value_succeeds<Classifier>) co_return;
          result.emplace(outcome<T>::from_value({}));
        } else if constexpr (every_value_succeeds<Classifier>) {
          co_return co_await op();
        } else {
          result.emplace(outcome<T>::from_value(co_await op()));
        }
      } catch (...) {
        result.emplace(outcome<T>::from_exception(std::current_exception()));
      }

      const classification c = s->classify(std::as_const(*result));
      if (c.kind == verdict::success || c.kind == verdict::fatal) {
        if constexpr (std::is_void_v<T>) {
          std::move(*result).get();
          co_return;
        } else {
          co_return std::move(*result).get();
        }
      }

      auto give_up = [&](error e, const char* why) {
        throw weir::exception(e, why, c.hint.retry_after, result->failure(), attempt);
      };
      if (attempt >= o.max_attempts) give_up(error::retries_exhausted, "no attempts left");
      auto delay = s->backoff_delay(attempt - 1, previous);
      if (c.hint.retry_after) {
        if (*c.hint.retry_after > o.max_retry_after)
          give_up(error::rate_limited, "server asked to wait longer than max_retry_after");
        delay = std::max(delay, *c.hint.retry_after);
      }
      if (has_deadline && Clock::now() - started + delay > o.max_elapsed)
        give_up(c.hint.retry_after ? error::rate_limited : error::retries_exhausted,
                "the next wait would pass max_elapsed");
      if (o.budget && !o.budget->try_withdraw())
        give_up(error::budget_exhausted, "the retry budget is spent");
      if (o.on_retry) o.on_retry(retry_attempt{attempt, delay, c, result->failure()});

      boost::asio::basic_waitable_timer<Clock> wait(co_await boost::asio::this_coro::executor,
                                                    delay);
      co_await wait.async_wait(boost::asio::use_awaitable);
      previous = delay;
    }
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir
