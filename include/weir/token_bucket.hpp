// A lock-free token bucket (GCRA): `rate` units per second with room for `burst` at once.
//
//     weir::token_bucket<> bucket(io.get_executor(), {.rate = weir::per_minute(500), .burst = 20});
//     if (bucket.try_acquire()) send();                       // never blocks
//     co_await bucket.async_acquire(1, asio::use_awaitable);  // waits its turn, FIFO
#pragma once

#include <weir/detail/gcra.hpp>
#include <weir/detail/limiter_stage.hpp>
#include <weir/detail/pending_acquire.hpp>
#include <weir/detail/shutdown.hpp>
#include <weir/error.hpp>
#include <weir/rate.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace weir {

struct token_bucket_options {
  weir::rate rate{};                  // sustained refill rate
  std::uint64_t burst = 1;            // units available at once when the bucket is full
  std::string name = "token_bucket";  // in events (throttled, rejected), metrics and refusals
};

// Copies share one bucket. The acquire path is one clock read and a compare-exchange loop on a
// single atomic; only waiting (async_acquire when the tokens are not there) takes a mutex.
//
// Its operations follow Asio's: a completion token (whose default comes from the executor type,
// so `token_bucket<Clock, asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>>`
// lets `co_await bucket.async_acquire(1)` name none), and per-operation cancellation.
template <class Clock = std::chrono::steady_clock, class Executor = boost::asio::any_io_executor>
class token_bucket {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using executor_type = Executor;
  // Completion: (error, waited). On rate_limited, `waited` is the wait that max_wait refused.
  using acquire_signature = void(error_code, std::chrono::nanoseconds);
  // In a pipeline, each call takes one unit.
  using cost_type = std::uint64_t;
  static cost_type cost_of(const usage&) noexcept { return 1; }

  // Throws weir::exception(invalid_argument) for a rate ≤ 0 or a burst of 0.
  token_bucket(executor_type ex, token_bucket_options options)
      : state_(std::make_shared<state>(std::move(ex), options)) {
    state_->waiters.attach(state_);
    detail::track_shutdown(state_->executor, state_);
  }

  // Takes `n` units if they are there now; never blocks. n > burst is taken only from a full
  // bucket, which it leaves in debt.
  bool try_acquire(std::uint64_t n = 1) {
    return state_->try_acquire(n, detail::to_nanos(Clock::now()), true);
  }
  // At the caller's `now`, exactly: the bucket does not read the clock itself.
  bool try_acquire(std::uint64_t n, time_point now) {
    return state_->try_acquire(n, detail::to_nanos(now), false);
  }

  // How long until `n` units are available (zero if they are there now).
  std::chrono::nanoseconds time_until(std::uint64_t n = 1) const {
    return time_until(n, Clock::now());
  }
  std::chrono::nanoseconds time_until(std::uint64_t n, time_point now) const {
    return std::chrono::nanoseconds(state_->time_until(n, detail::to_nanos(now)));
  }

  // Waits until `n` units are available and takes them. Waiters are served in arrival order.
  // n > burst waits for a full bucket and leaves it in debt. Throws weir::exception
  // (invalid_argument), before starting, for a cost that would overflow the clock.
  //
  // Completion signature: void(error_code ec, std::chrono::nanoseconds waited)
  //   ec empty          the units are taken; `waited` is how long it took
  //   rate_limited      the wait would exceed max_wait; nothing is taken, and `waited` is the
  //                     wait that was refused
  //   operation_aborted cancelled
  // Per-operation cancellation: terminal, partial and total alike complete the wait at once
  // with operation_aborted and give its reserved units back to the waiters behind it.
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(
      std::uint64_t n, std::chrono::nanoseconds max_wait,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    state_->current().increment(n);  // throws here, with words, for a cost that would overflow
    return boost::asio::async_initiate<CompletionToken, acquire_signature>(
        initiate_async_acquire{state_}, token, n, max_wait);
  }

  // The same with no limit on the wait.
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(
      std::uint64_t n,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_acquire(n, std::chrono::nanoseconds::max(), std::forward<CompletionToken>(token));
  }

  // The coroutine form, for `co_await bucket.acquire(n)`: when the units are there it takes them
  // and returns without suspending or passing through the scheduler; otherwise it waits exactly
  // as async_acquire does (and throws what async_acquire would complete with). Returns the wait.
  boost::asio::awaitable<std::chrono::nanoseconds> acquire(
      std::uint64_t n = 1, std::chrono::nanoseconds max_wait = std::chrono::nanoseconds::max()) {
    return detail::acquire_now_or_wait(this, n, max_wait);
  }

  // Re-sizes the bucket at run time (e.g. from the server's reported limits). Waiters already
  // holding a reservation keep their place; new requests see the new rate at once.
  void set_rate(weir::rate r) { state_->set_rate(r); }
  void set_burst(std::uint64_t burst) { state_->set_burst(burst); }

  weir::rate rate() const noexcept { return per_second(1e9 / state_->current().interval); }
  std::uint64_t burst() const noexcept { return state_->current().burst; }
  // Rate and burst read together: a pair that some set_rate/set_burst left in force.
  token_bucket_options options() const noexcept {
    const auto sh = state_->current();
    return {.rate = per_second(1e9 / static_cast<double>(sh.interval)),
            .burst = sh.burst,
            .name = state_->name};
  }
  const std::string& name() const noexcept { return state_->name; }

  // Units that could be taken at once now (0 while waiters hold the bucket's future).
  std::uint64_t available(time_point now = Clock::now()) const {
    return state_->available(detail::to_nanos(now));
  }

  // Pushes the bucket's next free moment to at least `until` (e.g. the server said the window
  // resets then), for waiters already queued too. Does not refill a bucket that is already
  // emptier; cancelling a waiter later does not shorten the pause.
  void pause_until(time_point until) { state_->pause_until(detail::to_nanos(until)); }

  const executor_type& get_executor() const noexcept { return state_->executor; }

  // The bucket as a pipeline stage: one unit per call (attempt, inside a retry).
  detail::limiter_stage<token_bucket> stage() const { return {*this}; }

 private:
  struct state;

  // The initiation object of async_acquire, named as Asio names its own.
  struct initiate_async_acquire {
    std::shared_ptr<state> s;
    template <class Handler>
    void operator()(Handler&& handler, std::uint64_t n, std::chrono::nanoseconds max_wait) const {
      s->initiate_acquire(s, std::forward<Handler>(handler), n, max_wait);
    }
  };

  struct state final : detail::shutdown_hook {
    using executor_type = token_bucket::executor_type;
    using reservation_type = detail::reservation<1>;
    using waiter_type = detail::waiter<reservation_type>;

    state(executor_type ex, token_bucket_options o)
        : executor(std::move(ex)), waiters(executor, mutex), name(std::move(o.name)) {
      const auto i = detail::emission_interval(o.rate);
      detail::tolerance(i, o.burst);  // validates
      interval.store(i, std::memory_order_relaxed);
      burst.store(o.burst, std::memory_order_relaxed);
    }

    // The bucket's size as one value: interval and burst change only through set_rate/set_burst.
    struct shape {
      detail::nanos interval;
      std::uint64_t burst;

      detail::nanos tolerance() const { return interval * static_cast<detail::nanos>(burst); }
      detail::nanos increment(std::uint64_t n) const {
        return detail::cost_increment(n, interval, "token_bucket");
      }
    };

    // A seqlock: a reader never sees the interval of one change with the burst of another, so
    // every shape it sees was validated as a whole.
    shape current() const {
      for (;;) {
        const auto before = shape_version.load(std::memory_order_acquire);
        const shape sh{interval.load(std::memory_order_relaxed),
                       burst.load(std::memory_order_relaxed)};
        std::atomic_thread_fence(std::memory_order_acquire);
        if (!(before & 1) && shape_version.load(std::memory_order_relaxed) == before) return sh;
      }
    }

    // Under mutex, which serialises changes: each is validated against the one before.
    void reshape(detail::nanos i, std::uint64_t b) {
      detail::tolerance(i, b);  // validates
      const auto v = shape_version.load(std::memory_order_relaxed);
      shape_version.store(v + 1, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_release);
      interval.store(i, std::memory_order_relaxed);
      burst.store(b, std::memory_order_relaxed);
      shape_version.store(v + 2, std::memory_order_release);
    }

    // `reread`: the clock was read here, and may be read again before refusing.
    bool try_acquire(std::uint64_t n, detail::nanos now, bool may_reread) {
      const auto sh = current();
      const auto inc = sh.increment(n);
      const auto tol = sh.tolerance();
      auto tat = tat_.load(std::memory_order_relaxed);
      bool reread = !may_reread;
      for (;;) {
        const auto r = detail::reserve(tat, now, inc, tol);
        if (r.wait > 0) {
          // The thread may have been descheduled since it read the clock: look again before
          // refusing, or a busy machine would see false refusals.
          if (reread) return false;
          reread = true;
          now = detail::to_nanos(Clock::now());
          continue;
        }
        if (tat_.compare_exchange_weak(tat, r.new_tat, std::memory_order_acq_rel,
                                       std::memory_order_relaxed))
          return true;
      }
    }

    detail::nanos time_until(std::uint64_t n, detail::nanos now) const {
      const auto sh = current();
      const auto r = detail::reserve(tat_.load(std::memory_order_acquire), now, sh.increment(n),
                                     sh.tolerance());
      return std::max<detail::nanos>(0, r.wait);
    }

    std::uint64_t available(detail::nanos now) const {
      const auto sh = current();
      const auto room = now + sh.tolerance() - std::max(tat_.load(std::memory_order_acquire), now);
      return room <= 0 ? 0 : static_cast<std::uint64_t>(room / sh.interval);
    }

    template <class Handler>
    void initiate_acquire(const std::shared_ptr<state>& self, Handler handler, std::uint64_t n,
                          std::chrono::nanoseconds max_wait) {
      const auto now = detail::to_nanos(Clock::now());
      const auto sh = current();
      const auto inc = sh.increment(n);
      const auto tol = sh.tolerance();

      // Reserve and link under the mutex so that the list order is the reservation order.
      std::unique_lock lock(mutex);
      auto tat = tat_.load(std::memory_order_relaxed);
      detail::reservation_time r;
      do {
        r = detail::reserve(tat, now, inc, tol);
        if (r.wait > max_wait.count()) {
          lock.unlock();
          detail::post_completion(executor, std::move(handler), error::rate_limited,
                                  std::chrono::nanoseconds(r.wait));
          return;
        }
      } while (!tat_.compare_exchange_weak(tat, r.new_tat, std::memory_order_acq_rel,
                                           std::memory_order_relaxed));

      // Free now, and nobody reserved before it still waits for its wake-up: completes at once.
      // Behind such a waiter it joins the queue, already due, so that it cannot overtake it.
      if (r.wait <= 0 && waiters.empty()) {
        lock.unlock();
        detail::post_completion(executor, std::move(handler), {}, {});
        return;
      }
      if (waiters.shut_down()) {
        lock.unlock();
        detail::post_completion(executor, std::move(handler), error::shut_down, {});
        return;
      }
      using op_type = detail::pending_acquire<Clock, state, Handler>;
      auto op = std::make_shared<op_type>(self, std::move(handler), now);
      op->reservation = {{inc}, {r.new_tat}, now};
      op->ready_at = now + std::max<detail::nanos>(r.wait, 0);
      op->start();
    }

    // Under mutex: `w` leaves the queue, its units return to the bucket, and every waiter that
    // reserved after it moves up.
    void withdraw(waiter_type& w) {
      const auto shift = detail::withdraw(waiters.list(), w, {current().tolerance()});
      tat_.fetch_sub(shift[0], std::memory_order_acq_rel);
      waiters.arm();
    }

    void shutdown() override { waiters.shutdown(); }

    void set_rate(weir::rate r) {
      const auto i = detail::emission_interval(r);
      std::lock_guard lock(mutex);
      reshape(i, current().burst);
    }

    void set_burst(std::uint64_t b) {
      std::lock_guard lock(mutex);
      reshape(current().interval, b);
    }

    // Waiters already queued move behind the pause too: their timers must not fire into it.
    void pause_until(detail::nanos until) {
      std::lock_guard lock(mutex);
      const auto sh = current();
      const auto target = detail::tat_paused_until(until, sh.interval, sh.tolerance());
      if (auto* head = waiters.front()) {
        const auto& r = head->reservation;
        const std::array<detail::nanos, 1> start{std::max(r.end[0] - r.increment[0], target)};
        const auto shift = detail::restack(head, start, {sh.tolerance()});
        tat_.fetch_sub(shift[0], std::memory_order_acq_rel);
        waiters.arm();
      }
      auto tat = tat_.load(std::memory_order_relaxed);
      while (tat < target && !tat_.compare_exchange_weak(tat, target, std::memory_order_acq_rel)) {
      }
    }

    executor_type executor;
    std::atomic<std::uint64_t> shape_version{0};  // odd while a change is being written
    std::atomic<detail::nanos> interval{1};
    std::atomic<std::uint64_t> burst{1};
    std::mutex mutex;
    detail::waiter_queue<Clock, waiter_type> waiters;
    const std::string name;

   private:
    std::atomic<detail::nanos> tat_{0};
  };

  std::shared_ptr<state> state_;
};

}  // namespace weir
