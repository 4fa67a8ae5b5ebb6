// A lock-free token bucket (GCRA): `rate` units per second with room for `burst` at once.
//
//     weir::token_bucket<> bucket(io.get_executor(), {.rate = weir::per_minute(500), .burst = 20});
//     if (bucket.try_acquire()) send();                       // never blocks
//     co_await bucket.async_acquire(1, asio::use_awaitable);  // waits its turn, FIFO
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/rate.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/detail/limiter_stage.hpp>
#include <weir/detail/pending_acquire.hpp>
#include <weir/detail/shutdown.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace weir {

struct token_bucket_options {
  weir::rate rate{};        // sustained refill rate; weir::unlimited admits everything
  std::uint64_t burst = 1;  // units available at once when the bucket is full
  // A cost above the burst: admitted from a full bucket into debt, or refused (invalid_argument).
  weir::above_burst above_burst = weir::above_burst::debt;
  std::string name = "token_bucket";  // in events (throttled, rejected), metrics and refusals
};

// Copies share one bucket. The acquire path is one clock read and a compare-exchange loop on a
// single atomic; only waiting (async_acquire when the tokens are not there) takes a mutex.
//
// Its operations follow Asio's: a completion token (whose default comes from the executor type,
// so `token_bucket<Clock, asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>>`
// lets `co_await bucket.async_acquire(1)` name none; `asio::use_awaitable.as_default_on(bucket)`
// makes such a copy of a bucket), and per-operation cancellation.
template <class Clock = std::chrono::steady_clock, class Executor = boost::asio::any_io_executor>
class token_bucket {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using executor_type = Executor;
  // Completion: (error, waited). On rate_limited, `waited` is the wait that max_wait refused.
  using acquire_signature = void(error_code, std::chrono::nanoseconds);
  // In a pipeline, each call takes one unit; a call never sent is settled at none (refunded).
  using cost_type = std::uint64_t;
  static cost_type cost_of(const usage& u) noexcept { return u.requests; }

  // Throws weir::exception(invalid_argument) for a burst of 0 or a rate ≤ 0: a bucket that never
  // refills is a misconfiguration (pause_until holds a bucket shut; weir::unlimited opens it).
  token_bucket(executor_type ex, token_bucket_options options)
      : executor_(ex), state_(std::make_shared<shared_state>(std::move(ex), options)) {
    state_->waiters.attach(state_);
    detail::track_shutdown(state_->executor, state_);
  }

  // Takes `n` units if they are there now; never blocks. n > burst is taken only from a full
  // bucket, which it leaves in debt; with above_burst::refuse it throws invalid_argument.
  bool try_acquire(std::uint64_t n = 1) {
    return state_->try_acquire(n, detail::to_nanos(Clock::now()), true);
  }
  // At the caller's `now`, exactly: the bucket does not read the clock itself.
  bool try_acquire(std::uint64_t n, time_point now) {
    return state_->try_acquire(n, detail::to_nanos(now), false);
  }

  // Settles a take of `estimate` units at `actual`: a refund goes to the queued waiters first
  // (the first moves up), else back to the bucket, never past full; extra is charged as debt.
  void settle(std::uint64_t estimate, std::uint64_t actual, time_point now = Clock::now()) {
    state_->settle(estimate, actual, detail::to_nanos(now));
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
  // (invalid_argument), before starting, for a cost that would overflow the clock or, with
  // above_burst::refuse, one above the burst.
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
    state_->increment(state_->current(), n);  // throws here, with words, for a cost refused
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

  // Changes the rate at run time (e.g. to the limit a server reports), keeping what the bucket
  // holds: the units it owes are re-priced at the new rate, so a higher rate never delays and a
  // lower one never frees a unit. Waiters already queued keep their order and are re-timed with
  // it. A pause (pause_until) still holds. weir::unlimited admits everything, waiters included;
  // leaving it, the bucket is full. Throws invalid_argument for a rate ≤ 0.
  void set_rate(weir::rate r, time_point now = Clock::now()) {
    state_->set_rate(r, detail::to_nanos(now));
  }
  // Changes the burst, keeping the units the bucket holds (up to the new burst): a lower burst
  // makes a smaller bucket, not a debt; a higher one leaves it to fill at the rate. Waiters keep
  // their times unless the new burst changes what they wait for (a cost above it waits for a
  // full bucket). Throws invalid_argument for 0.
  void set_burst(std::uint64_t burst, time_point now = Clock::now()) {
    state_->set_burst(burst, detail::to_nanos(now));
  }

  // weir::unlimited while the limit is off.
  weir::rate rate() const noexcept { return state_->current().rate(); }
  std::uint64_t burst() const noexcept { return state_->current().burst; }
  // Rate and burst read together: a pair that some set_rate/set_burst left in force.
  token_bucket_options options() const noexcept {
    const auto sh = state_->current();
    return {.rate = sh.rate(),
            .burst = sh.burst,
            .above_burst = state_->above_burst,
            .name = state_->name};
  }
  const std::string& name() const noexcept { return state_->name; }

  // Units that could be taken at once now (0 while waiters hold the bucket's future; the
  // largest uint64_t while the rate is unlimited).
  std::uint64_t available(time_point now = Clock::now()) const {
    return state_->available(detail::to_nanos(now));
  }

  // Pushes the bucket's next free moment to at least `until` (e.g. the server said the window
  // resets then), for waiters already queued too. Does not refill a bucket that is already
  // emptier; cancelling a waiter later, or raising the rate, does not shorten the pause. An
  // unlimited bucket admits everything and ignores it.
  void pause_until(time_point until) { state_->pause_until(detail::to_nanos(until)); }

  const executor_type& get_executor() const noexcept { return executor_; }

  // The same bucket with another executor type (copies share the state): what Asio's
  // as_default_on makes, e.g. `asio::use_awaitable.as_default_on(x)`, whose operations then
  // default to that completion token.
  template <class Executor1>
  struct rebind_executor {
    using other = token_bucket<Clock, Executor1>;
  };
  template <class Executor1>
  requires(!std::is_same_v<Executor1, Executor> &&
           std::is_constructible_v<
               Executor,
               const Executor1&>) explicit token_bucket(const token_bucket<Clock, Executor1>& other)
      : executor_(other.executor_), state_(other.state_) {}

  // The bucket as a pipeline stage: one unit per call (attempt, inside a retry).
  detail::limiter_stage<token_bucket> stage() const { return {*this}; }

 private:
  template <class, class>
  friend class token_bucket;
  struct state;
  // One state type whatever the executor type, so that rebound copies share it: it keeps the
  // executor as an any_io_executor, the bucket the type its user named.
  using shared_state = typename token_bucket<Clock, boost::asio::any_io_executor>::state;

  // The initiation object of async_acquire, named as Asio names its own.
  struct initiate_async_acquire {
    std::shared_ptr<shared_state> s;
    template <class Handler>
    void operator()(Handler&& handler, std::uint64_t n, std::chrono::nanoseconds max_wait) const {
      s->initiate_acquire(s, std::forward<Handler>(handler), n, max_wait);
    }
  };

  struct state final : detail::shutdown_hook {
    using executor_type = boost::asio::any_io_executor;
    using reservation_type = detail::reservation<1>;
    using waiter_type = detail::waiter<reservation_type>;

    state(executor_type ex, token_bucket_options o)
        : executor(std::move(ex)),
          waiters(executor, mutex),
          name(std::move(o.name)),
          above_burst(o.above_burst) {
      const auto i = interval_of(o.rate);
      validate({i, o.burst});
      interval.store(i, std::memory_order_relaxed);
      burst.store(o.burst, std::memory_order_relaxed);
    }

    // The bucket's size as one value: interval and burst change only through set_rate/set_burst.
    // An interval of 0 is weir::unlimited.
    struct shape {
      detail::nanos interval;
      std::uint64_t burst;

      bool unlimited() const noexcept { return interval == 0; }
      detail::nanos tolerance() const noexcept {
        return interval * static_cast<detail::nanos>(burst);
      }
      weir::rate rate() const noexcept {
        return unlimited() ? weir::unlimited : per_second(1e9 / static_cast<double>(interval));
      }
    };

    // 0 for weir::unlimited; invalid_argument for a rate that is not positive (or too slow).
    static detail::nanos interval_of(weir::rate r) {
      if (r.per_second == weir::unlimited.per_second) return 0;
      if (r.per_second == 0)
        detail::invalid_option(
            "token_bucket", "rate", "0/s",
            "be positive: a bucket that never refills is a misconfiguration (use "
            "pause_until to hold it shut, weir::unlimited to switch the limit off)");
      return detail::emission_interval(r);
    }

    static void validate(shape sh) {
      if (sh.unlimited()) {
        if (sh.burst == 0)
          detail::invalid_option("token_bucket", "burst", sh.burst, "be at least 1");
      } else {
        detail::tolerance(sh.interval, sh.burst);
      }
    }

    // What `n` units cost in `sh`: throws invalid_argument for a cost the clock arithmetic
    // cannot hold or, with above_burst::refuse, one the bucket can never hold.
    detail::nanos increment(const shape& sh, std::uint64_t n) const {
      if (sh.unlimited()) return 0;
      if (above_burst == weir::above_burst::refuse && n > sh.burst)
        throw weir::exception(
            error::invalid_argument,
            fmt::format("{}: cost {} is above the burst {}, and above_burst is refuse", name, n,
                        sh.burst));
      return detail::cost_increment(n, sh.interval, "token_bucket");
    }

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

    // `may_reread`: the clock was read here, and may be read again before refusing.
    bool try_acquire(std::uint64_t n, detail::nanos now, bool may_reread) {
      auto sh = current();
      if (sh.unlimited()) return true;
      auto inc = increment(sh, n);
      auto tat = tat_.load(std::memory_order_relaxed);
      bool reread = !may_reread;
      for (;;) {
        const auto r = detail::reserve(tat, now, inc, sh.tolerance());
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
        // TAT moved: perhaps re-priced by set_rate or set_burst, so price the units again.
        sh = current();
        if (sh.unlimited()) return true;
        inc = increment(sh, n);
      }
    }

    detail::nanos time_until(std::uint64_t n, detail::nanos now) const {
      const auto sh = current();
      if (sh.unlimited()) return 0;
      const auto r = detail::reserve(tat_.load(std::memory_order_acquire), now, increment(sh, n),
                                     sh.tolerance());
      return std::max<detail::nanos>(0, r.wait);
    }

    std::uint64_t available(detail::nanos now) const {
      const auto sh = current();
      if (sh.unlimited()) return std::numeric_limits<std::uint64_t>::max();
      const auto room = now + sh.tolerance() - std::max(tat_.load(std::memory_order_acquire), now);
      return room <= 0 ? 0 : static_cast<std::uint64_t>(room / sh.interval);
    }

    template <class Handler>
    void initiate_acquire(const std::shared_ptr<state>& self, Handler handler, std::uint64_t n,
                          std::chrono::nanoseconds max_wait) {
      const auto now = detail::to_nanos(Clock::now());

      // Reserve and link under the mutex so that the list order is the reservation order, and
      // so that the shape cannot change in between (set_rate and set_burst take it too).
      std::unique_lock lock(mutex);
      const auto sh = current();
      detail::nanos inc;
      try {
        inc = increment(sh, n);
      } catch (const weir::exception& e) {  // the shape changed since async_acquire checked
        lock.unlock();
        detail::post_completion(executor, std::move(handler), e.code(), {});
        return;
      }
      auto tat = tat_.load(std::memory_order_relaxed);
      detail::reservation_time r{tat, 0};  // unlimited: due now, and TAT stays
      if (!sh.unlimited()) {
        do {
          r = detail::reserve(tat, now, inc, sh.tolerance());
          if (r.wait > max_wait.count()) {
            lock.unlock();
            detail::post_completion(executor, std::move(handler), error::rate_limited,
                                    std::chrono::nanoseconds(r.wait));
            return;
          }
        } while (!tat_.compare_exchange_weak(tat, r.new_tat, std::memory_order_acq_rel,
                                             std::memory_order_relaxed));
      }

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
    // reserved after it moves up. While unlimited every waiter is due and holds nothing.
    void withdraw(waiter_type& w) {
      const auto sh = current();
      if (sh.unlimited()) {
        waiters.list().erase(w);
      } else {
        const auto shift = detail::withdraw(waiters.list(), w, {sh.tolerance()});
        tat_.fetch_sub(shift[0], std::memory_order_acq_rel);
      }
      waiters.arm();
    }

    // Under mutex, as withdraw: the waiters re-stack as if the first had found that much more
    // room (a refund) or less (a charge: a debt is paid before anyone queued behind it). Without
    // waiters a refund moves TAT back, never past a full bucket; a charge goes even past the
    // burst, as the units were used.
    void settle(std::uint64_t estimate, std::uint64_t actual, detail::nanos now) {
      std::lock_guard lock(mutex);
      const auto sh = current();
      if (sh.unlimited() || estimate == actual) return;
      const bool refund = actual < estimate;
      const auto amount = detail::cost_increment(refund ? estimate - actual : actual - estimate,
                                                 sh.interval, "token_bucket");
      const auto moved_end = [&](detail::nanos end) {
        return refund ? std::min(end, std::max(end - amount, now)) : std::max(end, now) + amount;
      };
      if (auto* head = waiters.front()) {
        const auto& r = head->reservation;
        const auto start = r.end[0] - r.increment[0];
        const auto before_head = refund ? start - amount : moved_end(start);
        const auto shift =
            detail::restack(head, std::array<detail::nanos, 1>{before_head}, {sh.tolerance()});
        tat_.fetch_sub(shift[0], std::memory_order_acq_rel);
        waiters.arm();
        return;
      }
      auto tat = tat_.load(std::memory_order_relaxed);
      while (!tat_.compare_exchange_weak(tat, moved_end(tat), std::memory_order_acq_rel,
                                         std::memory_order_relaxed)) {
      }
    }

    void shutdown() override { waiters.shutdown(); }

    // A bucket's level is what it owes at `now`: TAT − now of refill, (TAT − now) / interval
    // units. A new rate keeps the units owed; a new burst keeps the units held (burst − owed).
    void set_rate(weir::rate r, detail::nanos now) {
      const auto i = interval_of(r);
      std::lock_guard lock(mutex);
      const auto from = current();
      reshape(from, {i, from.burst}, now, [&](detail::nanos owed) {
        return from.unlimited() || i == 0 ? 0 : detail::reprice(owed, from.interval, i);
      });
    }

    void set_burst(std::uint64_t b, detail::nanos now) {
      std::lock_guard lock(mutex);
      const auto from = current();
      // Keeping the units held moves what is owed by the change in size; a bucket that held
      // more than the new burst is full.
      reshape(from, {from.interval, b}, now, [&](detail::nanos owed) {
        __extension__ using wide = __int128;
        const wide moved = wide{owed} + (wide{b} - wide{from.burst}) * from.interval;
        return moved <= 0                 ? 0
               : moved > detail::max_owed ? detail::max_owed
                                          : static_cast<detail::nanos>(moved);
      });
    }

    // Under mutex: the bucket takes shape `to`; every point the bucket owes up to (TAT, each
    // waiter's end) moves from `now + owed` to `now + owed_after(owed)`, never before a pause.
    //
    // Lock-free acquisitions may race with the change. One that reads the shape while it is being
    // written waits for the new one; one that read it before lands either before TAT is moved
    // (and is re-priced with the rest) or after (its compare-exchange fails and it prices again),
    // unless the move left TAT as it was (a full bucket): then it is priced as if it came first.
    template <class OwedAfter>
    void reshape(shape from, shape to, detail::nanos now, OwedAfter owed_after) {
      validate(to);
      const auto version = shape_version.load(std::memory_order_relaxed);
      shape_version.store(version + 1, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_release);

      const auto move = [&](detail::nanos point) {
        const auto owed = owed_after(std::max<detail::nanos>(0, point - now));
        return owed == 0 && point <= now ? point : now + owed;
      };
      const auto floor = !to.unlimited() && paused_until > now
                             ? detail::tat_paused_until(paused_until, to.interval, to.tolerance())
                             : std::numeric_limits<detail::nanos>::min();
      detail::nanos restacked = 0;  // how far the pause pushed the last waiter back
      if (to.unlimited()) {
        // Everyone queued is due now and holds nothing from here on; a pause is forgotten.
        paused_until = 0;
        for (auto* w = waiters.front(); w; w = w->next) {
          w->reservation.increment[0] = 0;
          w->ready_at = now;
        }
      } else if (!from.unlimited()) {
        detail::nanos last_end = 0;
        for (auto* w = waiters.front(); w; w = w->next) {
          auto& r = w->reservation;
          r.increment[0] = detail::reprice(r.increment[0], from.interval, to.interval);
          r.end[0] = move(r.end[0]);
          last_end = r.end[0];
          w->ready_at = std::max(
              r.arrived, r.end[0] - detail::effective_tolerance(r.increment[0], to.tolerance()));
        }
        if (auto* head = waiters.front();
            head && head->reservation.end[0] - head->reservation.increment[0] < floor) {
          detail::restack(head, std::array<detail::nanos, 1>{floor}, {to.tolerance()});
          restacked = waiters.list().back()->reservation.end[0] - last_end;
        }
      }  // leaving unlimited, every waiter is already due

      auto tat = tat_.load(std::memory_order_relaxed);
      detail::nanos moved;
      do {
        moved = from.unlimited() ? std::min(tat, now)  // full
                : to.unlimited() ? tat                 // not read while unlimited
                                 : std::max(move(tat) + restacked, floor);
      } while (!tat_.compare_exchange_weak(tat, moved, std::memory_order_acq_rel,
                                           std::memory_order_relaxed));

      interval.store(to.interval, std::memory_order_relaxed);
      burst.store(to.burst, std::memory_order_relaxed);
      shape_version.store(version + 2, std::memory_order_release);
      waiters.arm();
    }

    // Waiters already queued move behind the pause too: their timers must not fire into it.
    void pause_until(detail::nanos until) {
      std::lock_guard lock(mutex);
      const auto sh = current();
      if (sh.unlimited()) return;
      paused_until = std::max(paused_until, until);
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
    const weir::above_burst above_burst;
    detail::nanos paused_until = 0;  // under mutex: set_rate and set_burst keep the pause

   private:
    std::atomic<detail::nanos> tat_{0};
  };

  executor_type executor_;
  std::shared_ptr<shared_state> state_;
};

}  // namespace weir
