// Retry around any callable returning asio::awaitable<T>, that obeys the server's retry_after
// and never turns into a storm.
//
//     weir::retry<> retry({.max_attempts = 4, .budget = shared_budget});
//     auto reply = co_await retry([&] { return client.async_post(req, asio::use_awaitable); });
#pragma once

#include <weir/backoff.hpp>
#include <weir/detail/deadline.hpp>
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
};

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

  // Throws weir::exception(invalid_argument) for max_attempts 0 or negative durations.
  explicit retry(retry_options options = {}, Classifier classifier = {})
      : state_(std::make_shared<state>(std::move(options), std::move(classifier))) {}

  template <class Operation>
  auto operator()(Operation op) const {
    using value = awaitable_value_t<std::invoke_result_t<Operation&>>;
    return run<value>(state_, std::move(op));
  }

  const retry_options& options() const noexcept { return state_->options; }

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

  const Classifier& classifier() const noexcept { return state_->classify; }

 private:
  struct state {
    state(retry_options o, Classifier c) : options(std::move(o)), classify(std::move(c)) {
      if (options.max_attempts == 0)
        throw weir::exception(error::invalid_argument, "retry: max_attempts must be at least 1");
      if (options.max_elapsed.count() <= 0)
        throw weir::exception(error::invalid_argument, "retry: max_elapsed must be positive");
      if (options.max_retry_after.count() < 0)
        throw weir::exception(error::invalid_argument,
                              "retry: max_retry_after must not be negative");
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

    retry_options options;
    Classifier classify;
    std::mutex random_mutex;
    std::mt19937_64 random;
  };

  // One attempt; bounded by what is left of max_elapsed when that is set.
  template <class T, class Operation>
  static boost::asio::awaitable<outcome<T>> attempt(state& s, const progress& p, Operation& op) {
    if (!s.bounded()) co_return co_await capture(op());
    const auto deadline =
        p.started + std::chrono::duration_cast<typename Clock::duration>(s.options.max_elapsed);
    auto bounded = co_await detail::run_until<Clock, T>(deadline, op);
    if (bounded.deadline_passed)
      throw weir::exception(error::timeout, "max_elapsed passed during an attempt", {},
                            bounded.result.failure(), p.attempt);
    co_return std::move(bounded.result);
  }

  template <class T, class Operation>
  static boost::asio::awaitable<T> run(std::shared_ptr<state> s, Operation op) {
    auto p = s->begin();
    for (;;) {
      std::optional<outcome<T>> result;
      if constexpr (every_value_succeeds<Classifier> && !std::is_void_v<T>) {
        if (!s->bounded()) {
          // The common case: a value goes straight back, with no outcome built.
          try {
            co_return co_await op();
          } catch (...) {
            result.emplace(outcome<T>::from_exception(std::current_exception()));
          }
        }
      }
      if (!result) result.emplace(co_await attempt<T>(*s, p, op));

      const classification c = s->classify(std::as_const(*result));
      if (c.kind != verdict::success && c.kind != verdict::fatal) {
        const auto d = s->next(p, c, result->failure());
        if (!d.error) {
          boost::asio::basic_waitable_timer<Clock> wait(co_await boost::asio::this_coro::executor,
                                                        d.delay);
          co_await wait.async_wait(boost::asio::use_awaitable);
          continue;
        }
        // No more attempts: a failing value goes back as it is, an error becomes the give-up.
        if (!result->has_value()) std::rethrow_exception(d.error);
      }
      if constexpr (std::is_void_v<T>) {
        std::move(*result).get();
        co_return;
      } else {
        co_return std::move(*result).get();
      }
    }
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir
