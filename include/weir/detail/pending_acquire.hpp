// The slow path shared by token_bucket and rate_limits: an acquisition that has already reserved
// its units and waits until the reservation becomes valid. Waiters reserve in arrival order, so
// they complete in FIFO order and a large request is never starved by small ones. Cancelling one
// gives its units back and moves every later waiter earlier by what it held.
//
// One timer per limiter, armed for the head of the queue, wakes the waiters in order: a million
// waiters cost a million list nodes, not a million timers, and those that come due together
// resume in the order they reserved.
//
// A limiter's shared state provides:
//   std::mutex mutex;                         guards the queue, its timer and every waiter
//   waiter_queue<Clock, R> waiters;           in reservation order
//   void withdraw(waiter<R>&);                under mutex: unlink it, refund its units, and shift
//                                             later waiters (update ready_at, then arm())
#pragma once

#include <weir/core/error.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/detail/shutdown.hpp>
#include <weir/detail/waiter_list.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

#include <array>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace weir::detail {

template <class Reservation>
struct waiter {
  Reservation reservation{};
  nanos ready_at = 0;  // when the reservation becomes valid, in the clock's nanoseconds
  waiter* prev = nullptr;
  waiter* next = nullptr;
  bool linked = false;

  // Unlinked, outside the owner's mutex: completes the handler, never inside the caller's frame.
  virtual void complete(error_code ec) = 0;
  // The context is shutting down: destroys the handler without running it.
  virtual void abandon() = 0;

 protected:
  ~waiter() = default;
};

// The waiters of one limiter, in reservation order, and the one timer that wakes them.
template <class Clock, class Waiter>
class waiter_queue {
 public:
  waiter_queue(boost::asio::any_io_executor executor, std::mutex& owner_mutex)
      : timer_(std::in_place, std::move(executor)), mutex_(owner_mutex) {}

  // Once, right after the owner is made: the timer's handler holds the owner only weakly.
  void attach(std::weak_ptr<void> owner) { owner_ = std::move(owner); }

  waiter_list<Waiter>& list() noexcept { return list_; }
  Waiter* front() const noexcept { return list_.front(); }
  bool empty() const noexcept { return list_.empty(); }
  bool shut_down() const noexcept { return !timer_; }

  // Under the owner's mutex: links `w` behind the others.
  void push_back(Waiter& w) {
    list_.push_back(w);
    arm();
  }

  // Under the owner's mutex, after the head or its ready_at may have changed: the timer follows
  // the head.
  void arm() {
    if (!timer_) return;
    auto* head = list_.front();
    if (!head) {
      if (armed_) {
        armed_ = false;
        ++generation_;
        timer_->cancel();
      }
      return;
    }
    if (armed_ && head->ready_at == armed_at_) return;
    armed_ = true;
    armed_at_ = head->ready_at;
    const auto generation = ++generation_;
    timer_->expires_at(from_nanos<Clock>(armed_at_));
    timer_->async_wait([this, owner = owner_, generation](error_code) {
      if (auto alive = owner.lock()) wake(generation);
    });
  }

  // The context shuts down (takes the owner's mutex): the timer goes, and the waiters' handlers
  // are destroyed outside the lock, where a destroyed coroutine may call back into the owner.
  void shutdown() {
    std::vector<Waiter*> parked;
    {
      std::lock_guard lock(mutex_);
      timer_.reset();
      while (auto* w = list_.front()) {
        list_.erase(*w);
        parked.push_back(w);
      }
    }
    for (auto* w : parked) w->abandon();
  }

 private:
  // The timer fired: every waiter now due leaves the queue and completes, in order.
  void wake(std::uint64_t generation) {
    Waiter* first = nullptr;
    Waiter* last = nullptr;
    {
      std::lock_guard lock(mutex_);
      if (generation != generation_) return;  // re-armed or emptied since
      armed_ = false;
      const auto now = to_nanos(Clock::now());
      while (auto* w = list_.front()) {
        if (w->ready_at > now) break;
        list_.erase(*w);
        (last ? last->next : first) = w;
        last = w;
      }
      arm();
    }
    while (first) {
      auto* w = first;
      first = static_cast<Waiter*>(w->next);
      w->next = nullptr;
      w->complete({});
    }
  }

  std::optional<boost::asio::basic_waitable_timer<Clock>> timer_;  // none once shut down
  std::mutex& mutex_;
  std::weak_ptr<void> owner_;
  waiter_list<Waiter> list_;
  std::uint64_t generation_ = 0;
  nanos armed_at_ = 0;
  bool armed_ = false;
};

// What a waiter holds on each of a limiter's dimensions, and when it arrived. Reservations
// stack: each one's end is the limiter's TAT right after it was taken.
template <std::size_t Dims>
struct reservation {
  std::array<nanos, Dims> increment{};  // units × interval
  std::array<nanos, Dims> end{};        // TAT right after this reservation
  nanos arrived = 0;
};

// Under the owner's mutex: re-stacks the waiters from `first` on, as if the end of whatever stood
// before them were `prev_end`, moving each one earlier (never before what GCRA allows at its
// arrival); the owner then re-arms its queue. Returns how far the last end moved back, per
// dimension: the owner moves its TAT back by as much.
template <std::size_t Dims>
std::array<nanos, Dims> restack(waiter<reservation<Dims>>* first, std::array<nanos, Dims> prev_end,
                                const std::array<nanos, Dims>& tolerance) {
  std::array<nanos, Dims> shift{};
  for (auto* w = first; w; w = w->next) {
    auto& r = w->reservation;
    nanos ready = r.arrived;
    for (std::size_t d = 0; d < Dims; ++d) {
      const nanos end = std::max(prev_end[d], r.arrived) + r.increment[d];
      shift[d] = r.end[d] - end;
      r.end[d] = prev_end[d] = end;
      // A limited dimension (tolerance > 0) that the waiter takes nothing from still holds it
      // back while it is in debt; one without a limit never does.
      if (r.increment[d] > 0 || tolerance[d] > 0)
        ready = std::max(ready, end - effective_tolerance(r.increment[d], tolerance[d]));
    }
    w->ready_at = ready;
  }
  return shift;
}

// Under the owner's mutex: unlinks `w` and re-stacks the waiters behind it as if it had never
// reserved. Returns how far the owner's TAT moves back, per dimension.
template <std::size_t Dims>
std::array<nanos, Dims> withdraw(waiter_list<waiter<reservation<Dims>>>& list,
                                 waiter<reservation<Dims>>& w,
                                 const std::array<nanos, Dims>& tolerance) {
  auto* first_later = w.next;
  list.erase(w);
  std::array<nanos, Dims> prev_end;
  for (std::size_t d = 0; d < Dims; ++d)
    prev_end[d] = w.reservation.end[d] - w.reservation.increment[d];
  if (!first_later) return w.reservation.increment;
  return restack(first_later, prev_end, tolerance);
}

// Completes `handler` with (ec, waited) through its associated executor, never inline.
template <class Handler, class Executor>
void post_completion(const Executor& ex, Handler&& handler, error_code ec,
                     std::chrono::nanoseconds waited) {
  boost::asio::post(ex, boost::asio::append(std::forward<Handler>(handler), ec, waited));
}

template <class Clock, class State, class Handler>
class pending_acquire final
    : public waiter<typename State::reservation_type>,
      public std::enable_shared_from_this<pending_acquire<Clock, State, Handler>> {
 public:
  using handler_executor =
      boost::asio::associated_executor_t<Handler, typename State::executor_type>;

  pending_acquire(std::shared_ptr<State> state, Handler handler, nanos started_at)
      : state_(std::move(state)),
        handler_(std::move(handler)),
        work_(boost::asio::get_associated_executor(handler_, state_->executor)),
        started_at_(started_at) {}

  // Under the owner's mutex, right after the reservation was taken: keeps itself alive until it
  // completes, and listens for cancellation.
  void start() {
    self_ = this->shared_from_this();
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(this->weak_from_this());
    state_->waiters.push_back(*this);
  }

  // Due: posted to the handler's executor. The queue posts the waiters due together in their
  // order, behind any completion posted earlier, so on one executor they resume in the order
  // they reserved.
  void complete(error_code ec) override {
    const auto waited = std::chrono::nanoseconds(ec ? 0 : to_nanos(Clock::now()) - started_at_);
    auto work = std::move(work_);
    const auto ex = work.get_executor();
    boost::asio::post(ex, [self = std::move(self_), work = std::move(work), ec, waited]() mutable {
      self->finish(ec, waited);
    });
  }

  void abandon() override {
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.clear();
    auto last = std::move(self_);  // destroys this waiter, its handler and its work guard
  }

 private:
  // Supports terminal, partial and total cancellation: each gives the reservation back.
  // Holds the waiter weakly: a cancellation that arrives once it is gone does nothing.
  struct cancel_handler {
    // A constructor, not an aggregate: the slot builds it with parentheses, which clang 14
    // cannot do for an aggregate.
    explicit cancel_handler(std::weak_ptr<pending_acquire> o) : op(std::move(o)) {}
    std::weak_ptr<pending_acquire> op;
    void operator()(boost::asio::cancellation_type type) const {
      if ((type & boost::asio::cancellation_type::all) == boost::asio::cancellation_type::none)
        return;
      if (auto self = op.lock()) self->cancel();
    }
  };

  // On the handler's executor, where cancellation is emitted. Posted, not dispatched: the
  // emitter is still in its emit() call.
  void cancel() {
    {
      std::lock_guard lock(state_->mutex);
      if (!this->linked) return;  // already due, its completion on the way
      state_->withdraw(*this);
    }
    auto work = std::move(work_);
    const auto ex = work.get_executor();
    boost::asio::post(ex, [self = std::move(self_), work = std::move(work)]() mutable {
      self->finish(boost::asio::error::operation_aborted, {});
    });
  }

  // On the handler's executor: the slot is cleared there, where cancellation is emitted.
  void finish(error_code ec, std::chrono::nanoseconds waited) {
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.clear();
    auto handler = std::move(handler_);
    std::move(handler)(ec, waited);
  }

  std::shared_ptr<State> state_;
  Handler handler_;
  boost::asio::executor_work_guard<handler_executor> work_;
  nanos started_at_;
  std::shared_ptr<pending_acquire> self_;
};

}  // namespace weir::detail
