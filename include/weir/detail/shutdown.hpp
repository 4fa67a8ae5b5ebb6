// What weir's own waiters need from an io_context that shuts down. Asio destroys the handlers of
// its own pending operations when their execution context shuts down (and with them any
// coroutine awaiting them); a queue's or a limiter's waiters are parked in weir's state, which
// Asio does not see, and a limiter's timer must not outlive its context. Each such state
// registers here and is told when the context shuts down.
#pragma once

#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/asio/query.hpp>

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

namespace weir::detail {

struct shutdown_hook {
  // The context is shutting down: destroy the handlers waiting here (outside any lock of yours:
  // a destroyed coroutine may call back in) and anything that belongs to the context.
  virtual void shutdown() = 0;

 protected:
  ~shutdown_hook() = default;
};

class shutdown_service : public boost::asio::execution_context::service {
 public:
  using key_type = shutdown_service;
  static inline boost::asio::execution_context::id id;

  explicit shutdown_service(boost::asio::execution_context& context) : service(context) {}

  void track(std::weak_ptr<shutdown_hook> hook) {
    std::lock_guard lock(mutex_);
    std::erase_if(hooks_, [](const auto& h) { return h.expired(); });
    hooks_.push_back(std::move(hook));
  }

 private:
  void shutdown() override {
    std::vector<std::shared_ptr<shutdown_hook>> live;
    {
      std::lock_guard lock(mutex_);
      for (const auto& h : hooks_)
        if (auto s = h.lock()) live.push_back(std::move(s));
      hooks_.clear();
    }
    for (const auto& s : live) s->shutdown();
  }

  std::mutex mutex_;
  std::vector<std::weak_ptr<shutdown_hook>> hooks_;
};

// Registers `hook` with the execution context of `executor`.
template <class Executor>
void track_shutdown(const Executor& executor, std::weak_ptr<shutdown_hook> hook) {
  auto& context = boost::asio::query(executor, boost::asio::execution::context);
  boost::asio::use_service<shutdown_service>(context).track(std::move(hook));
}

}  // namespace weir::detail
