// A rate limit per key (tenant, user, API key): each key gets its own GCRA bucket on first use,
// with the same limit for all or one chosen per key.
//
//     weir::keyed_limiter<> per_tenant(ex, {.limit = {.rate = weir::per_minute(60), .burst = 10}});
//     if (!per_tenant.try_acquire("tenant-42")) refuse();
//     auto guarded = weir::pipeline(per_tenant, provider_limits, queue);  // key: call_context::tenant
//
// Memory stays bounded by the keys that are active: a key whose bucket has refilled is dropped
// when its shard would otherwise grow, and comes back full, which is exactly what GCRA would
// have decided had it been kept. Keys are spread over shards, each with its own mutex, so calls
// for unrelated keys rarely meet.
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/rate.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/gcra.hpp>
#include <weir/detail/key_table.hpp>
#include <weir/detail/pending_acquire.hpp>

#include <fmt/format.h>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_state.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

namespace weir {

// What a keyed limiter counts for one call in a pipeline.
enum class counts { requests, tokens };

// One key's limit: `rate` units per second (weir::unlimited: no limit), `burst` at once.
struct key_limit {
  weir::rate rate{};
  std::uint64_t burst = 1;
};

struct keyed_limiter_options {
  key_limit limit{};  // every key's limit, unless limit_of gives one (then it may be empty)
  // The limit of a key, asked when the key is first seen (and again when it returns after being
  // dropped as idle). Called without any lock held. Up to 65 536 distinct limits.
  std::function<key_limit(std::string_view key)> limit_of{};
  weir::counts counts = weir::counts::requests;  // what a call costs in a pipeline
  // A cost above a key's burst: admitted from its full bucket into debt, or refused
  // (invalid_argument), as token_bucket_options::above_burst.
  weir::above_burst above_burst = weir::above_burst::debt;
  std::size_t shards = 64;             // rounded up to a power of two
  std::string name = "keyed_limiter";  // in events and refusals
};

namespace detail {

// The distinct limits of a keyed limiter, interned so that an entry names its limit in 4 bytes.
// Read without a lock: an index is published (under a shard's mutex) only after its shape is.
class limit_shapes {
 public:
  struct shape {
    nanos interval;  // 0: weir::unlimited, which admits everything
    nanos tolerance;
    std::uint64_t burst;
  };

  ~limit_shapes() {
    for (auto& c : chunks_) delete[] c.load(std::memory_order_relaxed);
  }

  std::uint32_t intern(key_limit limit, std::string_view who) {
    if (limit.burst == 0) invalid_option(who, "burst", limit.burst, "be at least 1");
    const auto interval =
        limit.rate.per_second == weir::unlimited.per_second ? 0 : emission_interval(limit.rate);
    const shape s{interval, interval == 0 ? 0 : tolerance(interval, limit.burst), limit.burst};
    std::lock_guard lock(mutex_);
    if (auto it = index_.find({s.interval, s.tolerance}); it != index_.end()) return it->second;
    const auto i = static_cast<std::uint32_t>(index_.size());
    if (i >= chunk_size * chunks_.size())
      invalid_option(who, "limit_of", index_.size(), "give at most 65536 distinct limits");
    auto& chunk = chunks_[i / chunk_size];
    if (!chunk.load(std::memory_order_relaxed))
      chunk.store(new shape[chunk_size], std::memory_order_release);
    chunk.load(std::memory_order_relaxed)[i % chunk_size] = s;
    index_.emplace(std::pair{s.interval, s.tolerance}, i);
    return i;
  }

  const shape& operator[](std::uint32_t i) const noexcept {
    return chunks_[i / chunk_size].load(std::memory_order_acquire)[i % chunk_size];
  }

 private:
  static constexpr std::size_t chunk_size = 1024;
  std::array<std::atomic<shape*>, 64> chunks_{};
  std::mutex mutex_;
  std::map<std::pair<nanos, nanos>, std::uint32_t> index_;
};

}  // namespace detail

template <class Limiter>
class keyed_limiter_stage;

// Copies share one set of buckets. Operations follow token_bucket's: try_acquire never waits;
// async_acquire waits its turn (FIFO per key) with a completion token and per-operation
// cancellation, which gives the reserved units back when no later wait holds a turn after them.
template <class Clock = std::chrono::steady_clock, class Executor = boost::asio::any_io_executor>
class keyed_limiter {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using executor_type = Executor;
  using acquire_signature = void(error_code, std::chrono::nanoseconds);
  using cost_type = std::uint64_t;

  // Throws weir::exception(invalid_argument) for a default limit that is not a valid bucket (a
  // rate ≤ 0, a burst of 0).
  keyed_limiter(executor_type ex, keyed_limiter_options options)
      : executor_(ex), state_(std::make_shared<shared_state>(std::move(ex), std::move(options))) {}

  // Takes `n` units from `key`'s bucket if they are there now; never waits. With
  // above_burst::refuse, a cost above the key's burst throws invalid_argument.
  bool try_acquire(std::string_view key, std::uint64_t n = 1) {
    return state_->try_acquire(key, n, detail::to_nanos(Clock::now()), true);
  }
  // At the caller's `now`, exactly.
  bool try_acquire(std::string_view key, std::uint64_t n, time_point now) {
    return state_->try_acquire(key, n, detail::to_nanos(now), false);
  }

  // How long until `key` has `n` units (zero if now).
  std::chrono::nanoseconds time_until(std::string_view key, std::uint64_t n = 1,
                                      time_point now = Clock::now()) const {
    return std::chrono::nanoseconds(state_->time_until(key, n, detail::to_nanos(now)));
  }

  // Waits until `key` has `n` units and takes them; callers of one key are served in arrival
  // order. The key is copied.
  //
  // Completion signature: void(error_code ec, std::chrono::nanoseconds waited)
  //   ec empty          the units are taken
  //   rate_limited      the wait would exceed max_wait; nothing taken; `waited` is that wait
  //   operation_aborted cancelled (terminal, partial or total); the units are given back
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(
      std::string_view key, std::uint64_t n, std::chrono::nanoseconds max_wait,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<CompletionToken, acquire_signature>(
        initiate_async_acquire{state_}, token, std::string(key), n, max_wait);
  }
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(
      std::string_view key, std::uint64_t n,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_acquire(key, n, std::chrono::nanoseconds::max(),
                         std::forward<CompletionToken>(token));
  }

  // The coroutine form: takes the units at once when they are there, else waits as
  // async_acquire does (and throws what it would complete with). Returns the wait.
  boost::asio::awaitable<std::chrono::nanoseconds> acquire(
      std::string key, std::uint64_t n = 1,
      std::chrono::nanoseconds max_wait = std::chrono::nanoseconds::max()) {
    if (try_acquire(key, n)) co_return std::chrono::nanoseconds(0);
    keyed_limiter keep = *this;
    co_return co_await keep.async_acquire(key, n, max_wait, boost::asio::use_awaitable);
  }

  // The call took `actual` units where `estimate` were taken: charges or refunds the difference.
  void settle(std::string_view key, std::uint64_t estimate, std::uint64_t actual) {
    if (estimate != actual) state_->settle(key, estimate, actual, detail::to_nanos(Clock::now()));
  }

  // Keys held now (live ones, and idle ones not dropped yet), and the bytes their tables take.
  std::size_t size() const { return state_->sum(&detail::key_table::size); }
  std::size_t memory_bytes() const { return state_->sum(&detail::key_table::heap_bytes); }
  // Drops every key whose bucket is full at `now` (done anyway whenever a shard would grow).
  void evict_idle(time_point now = Clock::now()) { state_->evict_idle(detail::to_nanos(now)); }

  const std::string& name() const noexcept { return state_->options.name; }
  weir::counts counts() const noexcept { return state_->options.counts; }
  const executor_type& get_executor() const noexcept { return executor_; }

  // The same limiter with another executor type (copies share the state): what Asio's
  // as_default_on makes, e.g. `asio::use_awaitable.as_default_on(x)`, whose operations then
  // default to that completion token.
  template <class Executor1>
  struct rebind_executor {
    using other = keyed_limiter<Clock, Executor1>;
  };
  template <class Executor1>
  requires(
      !std::is_same_v<Executor1, Executor> &&
      std::is_constructible_v<
          Executor, const Executor1&>) explicit keyed_limiter(const keyed_limiter<Clock, Executor1>&
                                                                  other)
      : executor_(other.executor_), state_(other.state_) {}

  // The limiter as a pipeline stage, keyed by call_context::tenant.
  keyed_limiter_stage<keyed_limiter> stage() const { return keyed_limiter_stage(*this); }

 private:
  template <class, class>
  friend class keyed_limiter;
  struct state;
  // One state type whatever the executor type, so that rebound copies share it: it keeps the
  // executor as an any_io_executor, the limiter the type its user named.
  using shared_state = typename keyed_limiter<Clock, boost::asio::any_io_executor>::state;
  using timer_type = boost::asio::basic_waitable_timer<Clock, boost::asio::wait_traits<Clock>,
                                                       boost::asio::any_io_executor>;

  struct initiate_async_acquire {
    std::shared_ptr<shared_state> s;
    template <class Handler>
    void operator()(Handler&& handler, std::string key, std::uint64_t n,
                    std::chrono::nanoseconds max_wait) const {
      s->initiate_acquire(s, std::forward<Handler>(handler), std::move(key), n, max_wait);
    }
  };

  // A reserved wait: one timer until the reservation is valid.
  struct wait_for_turn {
    std::shared_ptr<state> s;
    std::string key;
    detail::nanos increment;
    detail::nanos reserved_until;  // the key's tat once this wait had reserved its turn
    time_point started;
    time_point ready_at;
    std::unique_ptr<timer_type> timer{};

    template <class Self>
    void operator()(Self& self) {
      self.reset_cancellation_state(boost::asio::enable_total_cancellation());
      timer = std::make_unique<timer_type>(s->executor, ready_at);
      timer->async_wait(std::move(self));
    }
    template <class Self>
    void operator()(Self& self, error_code ec) {
      if (ec || self.cancelled() != boost::asio::cancellation_type::none) {
        s->give_back(key, increment, reserved_until);
        return self.complete(boost::asio::error::operation_aborted, Clock::now() - started);
      }
      self.complete({}, Clock::now() - started);
    }
  };

  struct alignas(64) shard {
    std::mutex mutex;
    detail::key_table table;
  };

  struct state {
    state(boost::asio::any_io_executor ex, keyed_limiter_options o)
        : executor(std::move(ex)), options(std::move(o)) {
      // With limit_of, `limit` may be left empty: every key's limit comes from the function.
      if (!options.limit_of || options.limit.rate.per_second != 0)
        default_shape = shapes.intern(options.limit, options.name);
      const auto n = std::bit_ceil(std::max<std::size_t>(options.shards, 1));
      shard_bits = static_cast<unsigned>(std::countr_zero(n));
      shards = std::make_unique<shard[]>(n);
    }

    shard& shard_of(std::uint64_t hash) const noexcept {
      return shards[shard_bits ? hash >> (64 - shard_bits) : 0];
    }

    // Under the shard's lock, which it may release to ask limit_of: `key`'s entry, made (full)
    // if the key is new.
    detail::key_entry& entry(shard& sh, std::unique_lock<std::mutex>& lock, std::string_view key,
                             std::uint64_t hash, detail::nanos now) {
      if (auto* e = sh.table.find(key, hash)) return *e;
      auto shape = default_shape;
      if (options.limit_of) {
        lock.unlock();
        shape = shapes.intern(options.limit_of(key), options.name);
        lock.lock();
        if (auto* e = sh.table.find(key, hash)) return *e;
      }
      return sh.table.insert(key, hash, shape, now, now);
    }

    detail::nanos increment(const detail::key_entry& e, std::uint64_t n) const {
      const auto& sh = shapes[e.shape];
      if (sh.interval == 0) return 0;
      if (options.above_burst == above_burst::refuse && n > sh.burst)
        throw weir::exception(
            error::invalid_argument,
            fmt::format("{}: cost {} is above the key's burst {}, and above_burst is refuse",
                        options.name, n, sh.burst));
      return detail::cost_increment(n, sh.interval, options.name.c_str());
    }

    bool try_acquire(std::string_view key, std::uint64_t n, detail::nanos now, bool may_reread) {
      const auto hash = detail::key_hash(key);
      auto& sh = shard_of(hash);
      std::unique_lock lock(sh.mutex);
      auto& e = entry(sh, lock, key, hash, now);
      const auto inc = increment(e, n);
      auto r = detail::reserve(e.tat, now, inc, shapes[e.shape].tolerance);
      if (r.wait > 0 && may_reread) {
        // Descheduled since the clock was read? Look again before refusing.
        now = detail::to_nanos(Clock::now());
        r = detail::reserve(e.tat, now, inc, shapes[e.shape].tolerance);
      }
      if (r.wait > 0) return false;
      e.tat = r.new_tat;
      return true;
    }

    detail::nanos time_until(std::string_view key, std::uint64_t n, detail::nanos now) {
      const auto hash = detail::key_hash(key);
      auto& sh = shard_of(hash);
      std::lock_guard lock(sh.mutex);
      const auto* e = sh.table.find(key, hash);
      if (!e) return 0;
      const auto r = detail::reserve(e->tat, now, increment(*e, n), shapes[e->shape].tolerance);
      return std::max<detail::nanos>(0, r.wait);
    }

    template <class Handler>
    void initiate_acquire(const std::shared_ptr<state>& self, Handler handler, std::string key,
                          std::uint64_t n, std::chrono::nanoseconds max_wait) {
      const auto now = detail::to_nanos(Clock::now());
      const auto hash = detail::key_hash(key);
      auto& sh = shard_of(hash);
      std::unique_lock lock(sh.mutex);
      auto& e = entry(sh, lock, key, hash, now);
      const auto inc = increment(e, n);
      const auto r = detail::reserve(e.tat, now, inc, shapes[e.shape].tolerance);
      if (r.wait > max_wait.count()) {
        lock.unlock();
        return detail::post_completion(executor, std::move(handler), error::rate_limited,
                                       std::chrono::nanoseconds(r.wait));
      }
      e.tat = r.new_tat;
      lock.unlock();
      if (r.wait <= 0) return detail::post_completion(executor, std::move(handler), {}, {});
      boost::asio::async_compose<Handler, acquire_signature>(
          wait_for_turn{self, std::move(key), inc, r.new_tat, detail::from_nanos<Clock>(now),
                        detail::from_nanos<Clock>(now + r.wait)},
          handler, executor);
    }

    // A cancelled wait's units return to its key if it was the last to reserve. Otherwise the
    // waiters reserved after it keep their turns and the units are lost: returned, they would let
    // a new caller take a turn beside a later waiter's, past the key's limit.
    void give_back(std::string_view key, detail::nanos increment, detail::nanos reserved_until) {
      const auto hash = detail::key_hash(key);
      auto& sh = shard_of(hash);
      std::lock_guard lock(sh.mutex);
      if (auto* e = sh.table.find(key, hash); e && e->tat == reserved_until) e->tat -= increment;
    }

    void settle(std::string_view key, std::uint64_t estimate, std::uint64_t actual,
                detail::nanos now) {
      const auto hash = detail::key_hash(key);
      auto& sh = shard_of(hash);
      std::unique_lock lock(sh.mutex);
      auto& e = entry(sh, lock, key, hash, now);
      if (actual > estimate)
        e.tat = std::max(e.tat, now) + increment(e, actual - estimate);
      else
        e.tat -= increment(e, estimate - actual);
    }

    std::size_t sum(std::size_t (detail::key_table::*what)() const) const {
      std::size_t total = 0;
      for (std::size_t i = 0; i < (std::size_t{1} << shard_bits); ++i) {
        std::lock_guard lock(shards[i].mutex);
        total += (shards[i].table.*what)();
      }
      return total;
    }

    void evict_idle(detail::nanos now) {
      for (std::size_t i = 0; i < (std::size_t{1} << shard_bits); ++i) {
        std::lock_guard lock(shards[i].mutex);
        shards[i].table.evict_idle(now);
      }
    }

    boost::asio::any_io_executor executor;
    const keyed_limiter_options options;
    detail::limit_shapes shapes;
    std::uint32_t default_shape = 0;
    unsigned shard_bits = 0;
    std::unique_ptr<shard[]> shards;
  };

  executor_type executor_;
  std::shared_ptr<shared_state> state_;
};

// A keyed limiter in a pipeline: the key is the call's tenant; the cost one request, or the
// estimated tokens (settled against the actual ones), as the limiter's options say.
template <class Limiter>
class keyed_limiter_stage {
 public:
  using clock_type = typename Limiter::clock_type;

  explicit keyed_limiter_stage(Limiter limiter) : limiter_(std::move(limiter)) {}

  std::string_view name() const noexcept { return limiter_.name(); }

  struct slot {
    std::uint64_t taken = 0;
  };
  static constexpr bool values_succeed = true;
  static constexpr bool reads_clock = true;

  bool try_enter(slot& s, stage_context<clock_type>& context) {
    s.taken = cost(context.call.estimated_usage());
    return limiter_.try_acquire(context.call.tenant, s.taken, context.now);
  }

  boost::asio::awaitable<void> wait_enter(slot& s, stage_context<clock_type>& context) {
    const auto max_wait =
        context.max_wait(clock_type::now()).value_or(std::chrono::nanoseconds::max());
    auto [ec, waited] = co_await limiter_.async_acquire(
        context.call.tenant, s.taken, max_wait, boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec == error::rate_limited)
      throw_refusal(ec, fmt::format("{}: the wait would pass the deadline", name()).c_str(),
                    waited);
    if (ec) throw_refusal(ec, std::string(name()).c_str());
  }

  template <class Outcome>
  stage_action exit(slot& s, stage_context<clock_type>& context, const Outcome&) {
    if (limiter_.counts() == counts::tokens) {
      const auto used = cost(context.call.actual_usage(context.call.estimated_usage()));
      limiter_.settle(context.call.tenant, s.taken, used);
    }
    return {};
  }

 private:
  std::uint64_t cost(const usage& u) const {
    return limiter_.counts() == counts::tokens ? u.tokens : 1;
  }

  Limiter limiter_;
};

}  // namespace weir
