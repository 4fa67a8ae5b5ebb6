// Virtual time for tests: a clock that stands still until the test moves it, usable as the clock
// of Asio waitable timers on an ordinary io_context.
//
//     using clock = weir::testing::manual_clock;
//     asio::basic_waitable_timer<clock> timer(io, std::chrono::seconds(60));
//     timer.async_wait(handler);
//     weir::testing::advance<clock>(io, std::chrono::seconds(60));  // handler has run
//
// advance() steps through pending timer deadlines in order, so a handler observes now() equal
// to its own deadline and chains of waits (backoff after backoff) unfold exactly as in real time.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/wait_traits.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>

namespace weir::testing {

// A steady clock whose time only moves when told to. Its state is static, as Asio requires of a
// clock; `Tag` gives independent clocks where one test needs several.
template <class Tag = void>
class basic_manual_clock {
 public:
  using rep = std::int64_t;
  using period = std::nano;
  using duration = std::chrono::duration<rep, period>;
  using time_point = std::chrono::time_point<basic_manual_clock>;
  static constexpr bool is_steady = true;

  // Where time starts after reset(): far from zero, so code that subtracts never sees negatives
  // that real steady_clock values would not produce either.
  static constexpr time_point start_time{std::chrono::hours(1000)};

  static time_point now() noexcept {
    return time_point(duration(now_ns_.load(std::memory_order_acquire)));
  }

  // Moves time forward by `d` without running anything.
  static void advance(duration d) {
    if (d < duration::zero()) throw std::invalid_argument("manual_clock: time cannot go backwards");
    now_ns_.fetch_add(d.count(), std::memory_order_acq_rel);
  }

  static void set(time_point t) {
    now_ns_.store(t.time_since_epoch().count(), std::memory_order_release);
  }

  // Back to start_time, with no deadline remembered; call at the start of each test.
  static void reset() noexcept {
    now_ns_.store(start_time.time_since_epoch().count(), std::memory_order_release);
    forget_deadline();
  }

  // Called by Asio (through wait_traits) with the earliest pending timer's deadline.
  static void note_deadline(time_point t) noexcept {
    auto ns = t.time_since_epoch().count();
    auto seen = next_deadline_ns_.load(std::memory_order_relaxed);
    while (ns < seen &&
           !next_deadline_ns_.compare_exchange_weak(seen, ns, std::memory_order_relaxed)) {
    }
  }

  static void forget_deadline() noexcept {
    next_deadline_ns_.store(no_deadline, std::memory_order_relaxed);
  }

  // The earliest timer deadline Asio reported since forget_deadline(), if any.
  static std::optional<time_point> next_deadline() noexcept {
    auto ns = next_deadline_ns_.load(std::memory_order_relaxed);
    if (ns == no_deadline) return std::nullopt;
    return time_point(duration(ns));
  }

 private:
  static constexpr rep no_deadline = std::numeric_limits<rep>::max();
  static inline std::atomic<rep> now_ns_{start_time.time_since_epoch().count()};
  static inline std::atomic<rep> next_deadline_ns_{no_deadline};
};

using manual_clock = basic_manual_clock<>;

// Runs every handler that is ready now, without ever blocking; returns how many ran.
inline std::size_t run_ready(boost::asio::io_context& io) {
  std::size_t total = 0;
  for (;;) {
    io.restart();
    std::size_t ran = io.poll();
    // A second pass lets the reactor see timers that the handlers just scheduled.
    io.restart();
    ran += io.poll();
    if (ran == 0) return total;
    total += ran;
  }
}

// Moves `Clock` forward by `d`, stopping at every pending timer deadline on the way so that
// handlers run in deadline order and each sees now() equal to its own deadline. Returns the
// number of handlers run.
template <class Clock>
std::size_t advance(boost::asio::io_context& io, typename Clock::duration d) {
  const auto target = Clock::now() + d;
  std::size_t total = 0;
  for (;;) {
    Clock::forget_deadline();
    total += run_ready(io);
    auto next = Clock::next_deadline();
    if (!next || *next <= Clock::now() || *next > target) break;
    Clock::set(*next);
  }
  Clock::set(target);
  total += run_ready(io);
  return total;
}

}  // namespace weir::testing

// Asio asks the wait traits how long to block for a timer. With virtual time the answer is
// "not at all": the reactor only checks which timers are due, the test decides when time moves.
template <class Tag>
struct boost::asio::wait_traits<weir::testing::basic_manual_clock<Tag>> {
  using clock = weir::testing::basic_manual_clock<Tag>;

  static typename clock::duration to_wait_duration(const typename clock::duration& d) {
    if (d > clock::duration::zero()) clock::note_deadline(clock::now() + d);
    return clock::duration::zero();
  }

  static typename clock::duration to_wait_duration(const typename clock::time_point& t) {
    return to_wait_duration(t - clock::now());
  }
};
