// A rate limit per key (tenant, user, API key) shared by a fleet: each key is a
// weir::redis::rate_limiter of its own, named "<name>:<key>", so its Redis keys are
// "weir:{<name>:<key>}:requests" (and ":tokens"), in the fleet's naming, each key in its own
// cluster slot.
//
//     weir::redis::keyed_rate_limiter<> per_tenant(ex, redis, {.each = {
//         .name = "tenants", .requests = weir::limit::per_minute(60)}});
//     co_await per_tenant.async_acquire("acme", {.requests = 1}, asio::use_awaitable);
//     auto guarded = weir::pipeline(per_tenant, shared_provider_limit);  // key: the tenant
//
// A process keeps a limiter object per key it is using (its batching, leases and fallback are
// per key); one unused for `forget_after` is dropped locally, and its Redis keys expire by
// themselves once full, as every weir limiter's do.
#pragma once

#include <weir/redis/rate_limiter.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace weir::redis {

struct keyed_rate_limiter_options {
  // Every key's limiter; `each.name` names the family ("tenants"): a key's limiter is named
  // "<name>:<key>".
  rate_limiter_options each{};
  // A key's own limits (requests, tokens), asked when its limiter is made; empty: `each`'s.
  std::function<void(std::string_view key, rate_limiter_options&)> limits_of{};
  std::chrono::seconds forget_after{600};
};

template <class Limiter>
class keyed_redis_stage;

// Copies share the keys' limiters. Safe from any thread. The executor type gives the operations
// their default completion token, as rate_limiter's does (`asio::use_awaitable.as_default_on`).
template <class Clock = std::chrono::steady_clock, class Executor = boost::asio::any_io_executor>
class keyed_rate_limiter {
 public:
  using clock_type = Clock;
  using executor_type = Executor;
  using limiter_type = rate_limiter<Clock>;
  using acquire_signature = typename limiter_type::acquire_signature;

  // Throws weir::exception(invalid_argument) for options the limiter refuses (checked once, on
  // a limiter made for the key "").
  keyed_rate_limiter(executor_type ex, client redis, keyed_rate_limiter_options options)
      : executor_(ex),
        state_(
            std::make_shared<shared_state>(std::move(ex), std::move(redis), std::move(options))) {
    state_->make("");
  }

  // The shared limiter of `key`: what async_acquire, async_try_acquire and async_settle of one
  // key go through.
  limiter_type limiter(std::string_view key) { return state_->limiter(key); }

  template <class CompletionToken = boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(std::string_view key, usage cost, std::chrono::nanoseconds max_wait,
                     CompletionToken&& token = {}) {
    return limiter(key).async_acquire(cost, max_wait, std::forward<CompletionToken>(token));
  }
  template <class CompletionToken = boost::asio::default_completion_token_t<executor_type>>
  auto async_try_acquire(std::string_view key, usage cost, CompletionToken&& token = {}) {
    return limiter(key).async_try_acquire(cost, std::forward<CompletionToken>(token));
  }
  template <class CompletionToken = boost::asio::default_completion_token_t<executor_type>>
  auto async_settle(std::string_view key, usage estimated, usage actual,
                    CompletionToken&& token = {}) {
    return limiter(key).async_settle(estimated, actual, std::forward<CompletionToken>(token));
  }

  // Keys with a limiter in this process now.
  std::size_t size() const {
    std::lock_guard lock(state_->mutex);
    return state_->limiters.size();
  }
  const std::string& name() const noexcept { return state_->options.each.name; }

  // As a pipeline stage, keyed by call_context::tenant.
  keyed_redis_stage<keyed_rate_limiter> stage() const { return keyed_redis_stage(*this); }

  const executor_type& get_executor() const noexcept { return executor_; }

  // The same keyed limiter with another executor type (copies share the keys' limiters): what
  // Asio's as_default_on makes.
  template <class Executor1>
  struct rebind_executor {
    using other = keyed_rate_limiter<Clock, Executor1>;
  };
  template <class Executor1>
  requires(
      !std::is_same_v<Executor1, Executor> &&
      std::is_constructible_v<
          Executor,
          const Executor1&>) explicit keyed_rate_limiter(const keyed_rate_limiter<Clock, Executor1>&
                                                             other)
      : executor_(other.executor_), state_(other.state_) {}

 private:
  template <class, class>
  friend class keyed_rate_limiter;
  struct state;
  // One state type whatever the executor type, so that rebound copies share the keys.
  using shared_state = typename keyed_rate_limiter<Clock, boost::asio::any_io_executor>::state;

  struct entry {
    limiter_type limiter;
    typename Clock::time_point used;
  };

  struct state {
    state(boost::asio::any_io_executor ex, client c, keyed_rate_limiter_options o)
        : executor(std::move(ex)), redis(std::move(c)), options(std::move(o)) {}

    limiter_type make(std::string_view key) {
      auto o = options.each;
      o.name = fmt::format("{}:{}", options.each.name, key);
      if (options.limits_of) options.limits_of(key, o);
      return limiter_type(executor, redis, std::move(o));
    }

    limiter_type limiter(std::string_view key) {
      const auto now = Clock::now();
      std::lock_guard lock(mutex);
      if (auto it = limiters.find(key); it != limiters.end()) {
        it->second.used = now;
        return it->second.limiter;
      }
      forget_idle(now);
      return limiters.emplace(std::string(key), entry{make(key), now}).first->second.limiter;
    }

    // Under the mutex, at most once per forget_after / 4: drops the limiters nobody used for
    // forget_after (a wait in flight keeps its own copy).
    void forget_idle(typename Clock::time_point now) {
      if (now - swept < options.forget_after / 4) return;
      swept = now;
      std::erase_if(limiters,
                    [&](const auto& kv) { return now - kv.second.used > options.forget_after; });
    }

    struct transparent_hash : std::hash<std::string_view> {
      using is_transparent = void;
    };

    boost::asio::any_io_executor executor;
    client redis;
    const keyed_rate_limiter_options options;
    std::mutex mutex;
    std::unordered_map<std::string, entry, transparent_hash, std::equal_to<>> limiters;
    typename Clock::time_point swept{};
  };

  executor_type executor_;
  std::shared_ptr<shared_state> state_;
};

// The keyed limiter in a pipeline: the limiter stage of the call's tenant.
template <class Keyed>
class keyed_redis_stage {
 public:
  using clock_type = typename Keyed::clock_type;
  using inner = weir::detail::limiter_stage<typename Keyed::limiter_type>;

  explicit keyed_redis_stage(Keyed keyed) : keyed_(std::move(keyed)) {}

  std::string_view name() const noexcept { return keyed_.name(); }

  struct slot {
    std::optional<inner> stage;
    typename inner::slot held;
  };
  static constexpr bool values_succeed = true;
  static constexpr bool reads_clock = true;

  bool try_enter(slot& s, stage_context<clock_type>& context) {
    s.stage.emplace(keyed_.limiter(context.call.tenant).stage());
    return s.stage->try_enter(s.held, context);
  }
  boost::asio::awaitable<void> wait_enter(slot& s, stage_context<clock_type>& context) {
    return s.stage->wait_enter(s.held, context);
  }
  template <class Outcome>
  stage_action exit(slot& s, stage_context<clock_type>& context, const Outcome& result) {
    return s.stage->exit(s.held, context, result);
  }

 private:
  Keyed keyed_;
};

}  // namespace weir::redis
