// The slow path shared by token_bucket and rate_limits: an acquisition that has already reserved
// its units and waits on a timer until the reservation becomes valid. Waiters reserve in arrival
// order, so they complete in FIFO order and a large request is never starved by small ones.
// Cancelling one gives its units back and moves every later waiter earlier by what it held.
//
// A limiter's shared state provides:
//   std::mutex mutex;                       guards the waiter list and every waiter's timer
//   waiter_list<waiter<R>> waiters;         in reservation order
//   void withdraw(waiter<R>&);              under mutex: unlink it, refund its units, and shift
//                                           later waiters (update ready_at, call rearm())
#pragma once

#include <weir/detail/gcra.hpp>
#include <weir/detail/waiter_list.hpp>
#include <weir/error.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

#include <array>
#include <chrono>
#include <memory>
#include <mutex>

namespace weir::detail {

template <class Reservation>
struct waiter {
  Reservation reservation{};
  nanos ready_at = 0;  // when the reservation becomes valid, in the clock's nanoseconds
  waiter* prev = nullptr;
  waiter* next = nullptr;
  bool linked = false;

  // ready_at moved earlier; re-arm the timer. Called with the owner's mutex held.
  virtual void rearm() = 0;

 protected:
  ~waiter() = default;
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
// arrival) and re-arming it. Returns how far the last end moved back, per dimension: the owner
// moves its TAT back by as much.
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
      if (r.increment[d] > 0)
        ready = std::max(ready, end - effective_tolerance(r.increment[d], tolerance[d]));
    }
    if (ready != w->ready_at) {
      w->ready_at = ready;
      w->rearm();
    }
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
  using timer_type = boost::asio::basic_waitable_timer<Clock>;
  using handler_executor =
      boost::asio::associated_executor_t<Handler, typename State::executor_type>;

  pending_acquire(std::shared_ptr<State> state, Handler handler, nanos started_at)
      : state_(std::move(state)),
        timer_(state_->executor),
        handler_(std::move(handler)),
        work_(boost::asio::get_associated_executor(handler_, state_->executor)),
        started_at_(started_at) {}

  ~pending_acquire() {
    // Only reached linked when the io_context was destroyed with the wait pending. Its timers are
    // being torn down, so the waiters behind are not re-armed: this one just leaves the queue.
    std::lock_guard lock(state_->mutex);
    if (this->linked) state_->waiters.erase(*this);
  }

  // Called with the owner's mutex held, right after the reservation was taken and linked.
  void start() {
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(this->weak_from_this());
    timer_.expires_at(from_nanos<Clock>(this->ready_at));
    wait();
  }

  void rearm() override { timer_.expires_at(from_nanos<Clock>(this->ready_at)); }

 private:
  struct cancel_handler {
    std::weak_ptr<pending_acquire> op;
    void operator()(boost::asio::cancellation_type type) const {
      if ((type & boost::asio::cancellation_type::all) == boost::asio::cancellation_type::none)
        return;
      if (auto self = op.lock()) self->cancel();
    }
  };

  void wait() {
    timer_.async_wait([self = this->shared_from_this()](error_code ec) { self->on_timer(ec); });
  }

  void cancel() {
    std::lock_guard lock(state_->mutex);
    if (cancelled_ || !this->linked) return;
    cancelled_ = true;
    state_->withdraw(*this);
    timer_.cancel();
  }

  void on_timer(error_code ec) {
    {
      std::lock_guard lock(state_->mutex);
      if (!cancelled_ && ec == boost::asio::error::operation_aborted) {
        wait();  // rearm() moved the deadline; wait for the new one
        return;
      }
      if (this->linked) state_->waiters.erase(*this);
    }
    complete(cancelled_ ? error_code(boost::asio::error::operation_aborted) : error_code());
  }

  // The cancellation slot is cleared on the handler's executor, where cancellation is emitted:
  // clearing it here, on the limiter's, would race a cancellation arriving meanwhile.
  void complete(error_code ec) {
    auto waited = std::chrono::nanoseconds(ec ? 0 : to_nanos(Clock::now()) - started_at_);
    auto work = std::move(work_);
    const auto ex = work.get_executor();
    boost::asio::dispatch(
        ex, [self = this->shared_from_this(), work = std::move(work), ec, waited]() mutable {
          auto slot = boost::asio::get_associated_cancellation_slot(self->handler_);
          if (slot.is_connected()) slot.clear();
          auto handler = std::move(self->handler_);
          std::move(handler)(ec, waited);
        });
  }

  std::shared_ptr<State> state_;
  timer_type timer_;
  Handler handler_;
  boost::asio::executor_work_guard<handler_executor> work_;
  nanos started_at_;
  bool cancelled_ = false;
};

}  // namespace weir::detail
