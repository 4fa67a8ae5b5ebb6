// A referee that behaves like a self-hosted model server (vLLM, TGI, llama.cpp server, Ollama):
// `workers` requests are served at once, the others wait in its queue in arrival order, and
// each takes a service time drawn from a distribution, so latency climbs with load as on a GPU
// server instead of the server answering 429. With `max_queue` waiting it answers 503.
//
//     weir::testing::model_server<clock> server(ex, {.workers = 4, .service = exponential(200ms)});
//     unsigned status = co_await server.serve();   // 200 after its wait and service, or 503
//
// It runs on any clock: virtual time in tests, real time in the benchmark, on a single-threaded
// executor. It counts on its own side (served, refused, abandoned, busy worker-time), so a
// client's claims are judged by the server.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>

#include <boost/system/system_error.hpp>

namespace weir::testing {

// Service times: exponential around `mean` (a heavy tail of long generations) or fixed.
inline std::function<std::chrono::nanoseconds(std::mt19937_64&)> exponential_service(
    std::chrono::nanoseconds mean) {
  return [mean](std::mt19937_64& random) {
    std::exponential_distribution<double> d(1.0 / static_cast<double>(mean.count()));
    return std::chrono::nanoseconds(static_cast<std::int64_t>(d(random)) + 1);
  };
}
inline std::function<std::chrono::nanoseconds(std::mt19937_64&)> fixed_service(
    std::chrono::nanoseconds each) {
  return [each](std::mt19937_64&) { return each; };
}

struct model_server_options {
  std::size_t workers = 4;
  std::size_t max_queue = 1'000;  // waiting beyond the workers; more are answered 503
  std::function<std::chrono::nanoseconds(std::mt19937_64&)> service =
      exponential_service(std::chrono::milliseconds(200));
  std::uint64_t seed = 1;
};

// What the server saw.
struct model_server_stats {
  std::uint64_t served = 0;
  std::uint64_t refused = 0;         // 503: its queue was full
  std::uint64_t abandoned = 0;       // the client cancelled while it waited or was served
  std::chrono::nanoseconds busy{0};  // worker-time spent serving
  std::size_t longest_queue = 0;
};

template <class Clock = std::chrono::steady_clock>
class model_server {
 public:
  model_server(boost::asio::any_io_executor ex, model_server_options options)
      : state_(std::make_shared<state>(std::move(ex), std::move(options))) {}

  // One request: 200 once served, or 503 at once when the queue is full.
  boost::asio::awaitable<unsigned> serve() { return serve(state_); }

  model_server_stats stats() const {
    std::lock_guard lock(state_->mutex);
    return state_->stats;
  }
  const model_server_options& options() const noexcept { return state_->options; }

  // Served requests per second that the workers could sustain, for a mean service time.
  static double capacity(std::size_t workers, std::chrono::nanoseconds mean_service) {
    return static_cast<double>(workers) / std::chrono::duration<double>(mean_service).count();
  }

 private:
  using timer = boost::asio::basic_waitable_timer<Clock>;
  struct waiter {
    explicit waiter(const boost::asio::any_io_executor& ex) : wake(ex) {}
    timer wake;
    bool woken = false;
  };

  struct state {
    state(boost::asio::any_io_executor ex, model_server_options o)
        : executor(std::move(ex)), options(std::move(o)), random(options.seed) {}

    boost::asio::any_io_executor executor;
    const model_server_options options;
    std::mutex mutex;
    std::size_t busy_workers = 0;
    std::deque<waiter*> waiting;  // in arrival order
    std::mt19937_64 random;
    model_server_stats stats;
  };

  static boost::asio::awaitable<unsigned> serve(std::shared_ptr<state> s) {
    waiter w(s->executor);
    {
      std::unique_lock lock(s->mutex);
      if (s->busy_workers < s->options.workers && s->waiting.empty()) {
        ++s->busy_workers;
      } else if (s->waiting.size() >= s->options.max_queue) {
        ++s->stats.refused;
        co_return 503;
      } else {
        // Waits until a worker hands over its place (marks it woken and cancels its timer).
        w.wake.expires_at(Clock::time_point::max());
        s->waiting.push_back(&w);
        s->stats.longest_queue = std::max(s->stats.longest_queue, s->waiting.size());
        lock.unlock();
        co_await w.wake.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        lock.lock();
        if (!w.woken) {  // the client gave up while it waited: it leaves the queue
          std::erase(s->waiting, &w);
          ++s->stats.abandoned;
          throw boost::system::system_error(boost::asio::error::operation_aborted);
        }
      }
    }
    std::chrono::nanoseconds service;
    {
      std::lock_guard lock(s->mutex);
      service = s->options.service(s->random);
    }
    const auto started = Clock::now();
    w.wake.expires_after(std::chrono::duration_cast<typename Clock::duration>(service));
    auto [ec] = co_await w.wake.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    std::lock_guard lock(s->mutex);
    // A client that gives up mid-generation frees its worker then, as vLLM aborts the request.
    s->stats.busy +=
        ec ? std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started) : service;
    if (!s->waiting.empty()) {
      auto* next = s->waiting.front();
      s->waiting.pop_front();
      next->woken = true;
      next->wake.cancel();  // the worker goes straight to the next in line
    } else {
      --s->busy_workers;
    }
    if (ec) {
      ++s->stats.abandoned;
      throw boost::system::system_error(boost::asio::error::operation_aborted);
    }
    ++s->stats.served;
    co_return 200;
  }

  std::shared_ptr<state> state_;
};

}  // namespace weir::testing
