// A bulkhead: at most `max_concurrent` requests in flight, at most `max_queued` waiting for a
// slot, and a clear queue_full rejection beyond that. Waiters are completed through their own
// executor, never inside the call that freed the slot.
//
//     weir::request_queue queue(ex, {.max_concurrent = 8, .max_queued = 64});
//     auto permit = co_await queue.async_admit(weir::priority::interactive, asio::use_awaitable);
//     co_await call();   // the slot returns when `permit` is destroyed, however the call ends
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/shutdown.hpp>
#include <weir/detail/waiter_list.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/append.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace weir {

struct request_queue_options {
  std::size_t max_concurrent = 8;
  std::size_t max_queued = 64;
  // Shares the slots fairly between tenants (call_context::tenant in a pipeline): within one
  // priority, the tenants that wait take turns (deficit round robin), so a tenant with a
  // thousand queued requests delays another tenant's single request by one slot at most.
  // Without it, waiters of one priority are served in arrival order.
  bool fair_between_tenants = false;
  // A tenant's share of the turns relative to the others' (1 when empty): a tenant of weight 3
  // is admitted three times per turn of a tenant of weight 1. Asked, under the queue's lock,
  // when a tenant starts waiting; a weight must be positive and finite.
  std::function<double(std::string_view tenant)> weight_of{};
  // When the queue is full, a request evicts a waiter of lower priority (the newest of the
  // tenant with the most waiting) instead of being refused; the evicted one fails with
  // error::evicted.
  bool evict_lower_priority = false;
  std::string name = "request_queue";  // in events (throttled, rejected) and metrics
};

template <class Executor>
class basic_request_queue;

namespace detail {
struct request_queue_state;
}

// The right to have one request in flight. Returns its slot when destroyed or released, so a slot
// comes back on success, exception and cancellation alike.
class permit {
 public:
  permit() = default;
  permit(permit&& other) noexcept : state_(std::move(other.state_)) {}
  permit& operator=(permit&& other) noexcept {
    if (this != &other) {
      release();
      state_ = std::move(other.state_);
    }
    return *this;
  }
  ~permit() { release(); }

  explicit operator bool() const noexcept { return state_ != nullptr; }
  inline void release() noexcept;
  // Forgets the slot without returning it: the caller now owes the queue one give_back().
  void detach() noexcept { state_.reset(); }

 private:
  friend struct detail::request_queue_state;
  template <class Executor>
  friend class basic_request_queue;
  explicit permit(std::shared_ptr<detail::request_queue_state> s) : state_(std::move(s)) {}
  std::shared_ptr<detail::request_queue_state> state_;
};

namespace detail {

struct queue_flow;

struct queue_waiter {
  queue_waiter* prev = nullptr;
  queue_waiter* next = nullptr;
  bool linked = false;
  std::size_t level = 0;       // which priority holds it
  queue_flow* flow = nullptr;  // and which tenant's line within it
  // Completes the admission: with a permit (ec empty) or with the error. Called without the lock.
  virtual void complete(error_code ec, permit p) = 0;
  // Drops the admission without completing it: its handler is destroyed, not called, as Asio
  // does with pending operations when their execution context goes away.
  virtual void abandon() = 0;

 protected:
  ~queue_waiter() = default;
};

// One tenant's waiters at one priority, in arrival order.
struct queue_flow {
  waiter_list<queue_waiter> waiters;
  std::size_t count = 0;
  double weight = 1;
  double deficit = 0;  // turns earned and not used (deficit round robin)
  bool in_ring = false;
  std::string_view tenant;  // the key that holds it in its level's map
};

// The waiters of one priority: a line per tenant (one line when the queue is not fair), and the
// ring of lines that take turns. A line emptied by cancellation leaves the ring when its turn
// comes.
class queue_level {
 public:
  bool empty() const noexcept { return size_ == 0; }

  // The line of `tenant`, made if it has none.
  template <class Weight>
  queue_flow& flow_for(std::string_view tenant, const Weight& weight_of, std::string_view who) {
    if (auto it = flows_.find(tenant); it != flows_.end()) return it->second;
    double weight = 1;
    if (weight_of) {
      weight = weight_of(tenant);
      if (!(weight > 0) || !std::isfinite(weight))
        invalid_option(who, "weight_of", weight, "give a positive, finite weight");
    }
    auto [it, added] = flows_.try_emplace(std::string(tenant));
    it->second.weight = weight;
    it->second.tenant = it->first;
    return it->second;
  }

  void push(queue_waiter& w, queue_flow& f) {
    f.waiters.push_back(w);
    ++f.count;
    ++size_;
    w.flow = &f;
    if (!f.in_ring) {
      f.in_ring = true;
      ring_.push_back(&f);
    }
  }

  void erase(queue_waiter& w) noexcept {
    w.flow->waiters.erase(w);
    --w.flow->count;
    --size_;
  }

  // The next waiter by deficit round robin, unlinked; null when none waits.
  queue_waiter* pop() {
    while (!ring_.empty()) {
      auto* f = ring_.front();
      if (f->count == 0) {
        drop_front();
        continue;
      }
      if (f->deficit < 1) {
        f->deficit += f->weight;
        if (f->deficit < 1) {
          rotate();
          continue;
        }
      }
      auto* w = f->waiters.front();
      erase(*w);
      f->deficit -= 1;
      if (f->count == 0)
        drop_front();
      else if (f->deficit < 1)
        rotate();
      return w;
    }
    return nullptr;
  }

  // For eviction: the newest waiter of the tenant with the most waiting.
  queue_waiter* newest_of_longest() const noexcept {
    const queue_flow* longest = nullptr;
    for (const auto& [tenant, f] : flows_)
      if (f.count != 0 && (!longest || f.count > longest->count)) longest = &f;
    return longest ? longest->waiters.back() : nullptr;
  }

 private:
  void rotate() {
    ring_.push_back(ring_.front());
    ring_.pop_front();
  }
  void drop_front() {
    auto* f = ring_.front();
    ring_.pop_front();
    flows_.erase(flows_.find(f->tenant));
  }

  struct transparent_hash : std::hash<std::string_view> {
    using is_transparent = void;
  };
  std::unordered_map<std::string, queue_flow, transparent_hash, std::equal_to<>> flows_;
  std::deque<queue_flow*> ring_;
  std::size_t size_ = 0;
};

// The fast path (a free slot, nobody waiting) is two atomics and no lock: admitting CASes
// in_flight up, releasing takes it down. Waiters are linked under the mutex; whoever frees a slot
// and whoever starts to wait each look at the other's counter afterwards (sequentially consistent),
// so a slot is never left free while someone waits for it.
struct request_queue_state final : shutdown_hook {
  request_queue_state(boost::asio::any_io_executor ex, request_queue_options o)
      : executor(std::move(ex)), options(std::move(o)), limit(options.max_concurrent) {
    if (options.max_concurrent == 0)
      invalid_option(options.name.c_str(), "max_concurrent", options.max_concurrent,
                     "be at least 1");
  }

  // Takes a slot if one is free and nobody waits for it.
  bool try_take() noexcept {
    if (queued.load() != 0 || shut_down.load(std::memory_order_relaxed)) return false;
    return take_slot();
  }

  bool take_slot() noexcept {
    // Sequentially consistent, like the counters' updates: a waiter that has just linked itself
    // must see a slot freed by a releaser that did not yet see the waiter.
    auto n = in_flight.load();
    while (n < limit.load())
      if (in_flight.compare_exchange_weak(n, n + 1)) return true;
    return false;
  }

  // A slot comes back: straight to the first waiter if there is one, else to the pool. `self`
  // is copied only to make the waiter's permit.
  void release(const std::shared_ptr<request_queue_state>& self) noexcept {
    if (queued.load() == 0) {
      in_flight.fetch_sub(1);
      if (queued.load() == 0) return;
      // Someone started waiting meanwhile and may have seen no free slot.
      std::unique_lock lock(mutex);
      hand_out(lock, self);
      return;
    }
    std::unique_lock lock(mutex);
    // Over a limit that was lowered, the slot goes back instead of to the next waiter.
    if (in_flight.load() <= limit.load())
      if (auto* next = pop()) {
        lock.unlock();
        next->complete({}, permit(self));
        return;
      }
    in_flight.fetch_sub(1);
  }

  // A new limit: raised, the slots it adds go to waiters at once; lowered, calls in flight over
  // it finish and their slots are not handed on until under it.
  void set_limit(std::size_t n, const std::shared_ptr<request_queue_state>& self) {
    if (n == 0) invalid_option(options.name.c_str(), "max_concurrent", n, "be at least 1");
    std::unique_lock lock(mutex);
    limit.store(n);
    hand_out(lock, self);
  }

  // Under `lock`, which it releases: gives free slots to waiters, by priority then arrival.
  void hand_out(std::unique_lock<std::mutex>& lock,
                const std::shared_ptr<request_queue_state>& self) {
    std::vector<std::pair<queue_waiter*, permit>> ready;
    while (queued.load() != 0 && take_slot()) {
      auto* w = pop();
      ready.emplace_back(w, permit(self));
    }
    lock.unlock();
    for (auto& [w, p] : ready) w->complete({}, std::move(p));
  }

  // Under the mutex: the first waiter, unlinked: by priority, then by the tenants' turns.
  queue_waiter* pop() {
    for (auto& level : levels)
      if (auto* w = level.pop()) {
        queued.fetch_sub(1);
        return w;
      }
    return nullptr;
  }

  // Under the mutex, when the queue is full: a waiter of lower priority than `p` that may make
  // room, if the options allow it and there is one.
  queue_waiter* eviction_candidate(std::size_t p) const {
    if (!options.evict_lower_priority) return nullptr;
    for (std::size_t l = levels.size(); l-- > p + 1;)
      if (auto* w = levels[l].newest_of_longest()) return w;
    return nullptr;
  }
  void unlink(queue_waiter& w) {
    levels[w.level].erase(w);
    queued.fetch_sub(1);
  }

  // The context shuts down: Asio does not see these waiters, so their handlers (and the
  // coroutines awaiting admission) are destroyed here, as Asio does with its own pending
  // operations. Outside the lock: a destroyed coroutine may release a permit of this very queue.
  void shutdown() override {
    std::vector<queue_waiter*> waiting;
    {
      std::lock_guard lock(mutex);
      shut_down = true;
      while (auto* w = pop()) waiting.push_back(w);
    }
    for (auto* w : waiting) w->abandon();
  }

  boost::asio::any_io_executor executor;
  request_queue_options options;
  std::atomic<std::size_t> limit;  // max_concurrent, until set_max_concurrent
  std::atomic<std::size_t> in_flight{0};
  std::atomic<std::size_t> queued{0};
  std::atomic<bool> shut_down{false};
  std::mutex mutex;
  std::array<queue_level, 3> levels;
};

template <class Handler>
class queue_admission final : public queue_waiter,
                              public std::enable_shared_from_this<queue_admission<Handler>> {
 public:
  using handler_executor =
      boost::asio::associated_executor_t<Handler, boost::asio::any_io_executor>;

  queue_admission(std::shared_ptr<request_queue_state> s, Handler h)
      : state_(std::move(s)),
        handler_(std::move(h)),
        work_(boost::asio::get_associated_executor(handler_, state_->executor)) {}

  // With the state's mutex held, after linking: keeps itself alive until completed.
  void start() {
    self_ = this->shared_from_this();
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(this->weak_from_this());
  }

  // Never runs the handler in the caller's frame (which may be a permit's destructor, in the
  // middle of the caller's own container operations): the completion is posted to the handler's
  // executor, and the cancellation slot is cleared there, where cancellation is emitted, so a
  // cancellation racing the completion on another thread meets a live, unlinked admission.
  void complete(error_code ec, permit p) override {
    auto work = std::move(work_);
    const auto ex = work.get_executor();
    boost::asio::post(ex, [self = std::move(self_), work = std::move(work), ec,
                           p = std::move(p)]() mutable { self->finish(ec, std::move(p)); });
  }

  void abandon() override {
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.clear();
    auto last = std::move(self_);  // destroys this admission, its handler and its work guard
  }

 private:
  // Holds the admission weakly, as the limiters' waiters are held: a cancellation that arrives
  // once it is gone does nothing.
  struct cancel_handler {
    // A constructor, not an aggregate: the slot builds it with parentheses, which clang 14
    // cannot do for an aggregate.
    explicit cancel_handler(std::weak_ptr<queue_admission> o) : op(std::move(o)) {}
    std::weak_ptr<queue_admission> op;
    void operator()(boost::asio::cancellation_type type) const {
      if ((type & boost::asio::cancellation_type::all) == boost::asio::cancellation_type::none)
        return;
      if (auto self = op.lock()) self->cancel();
    }
  };

  void cancel() {
    {
      std::lock_guard lock(state_->mutex);
      if (!linked) return;  // already admitted or completed
      state_->levels[level].erase(*this);
      state_->queued.fetch_sub(1);
    }
    complete(boost::asio::error::operation_aborted, permit());
  }

  // On the handler's executor.
  void finish(error_code ec, permit p) {
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.clear();
    auto handler = std::move(handler_);
    std::move(handler)(ec, std::move(p));
  }

  std::shared_ptr<request_queue_state> state_;
  Handler handler_;
  boost::asio::executor_work_guard<handler_executor> work_;
  std::shared_ptr<queue_admission> self_;
};

}  // namespace detail

void permit::release() noexcept {
  if (auto s = std::move(state_)) s->release(s);
}

template <class Executor>
class basic_request_queue_stage;

// Copies share one queue. Like Asio's I/O objects (and the limiters) the queue is a template over
// its executor, whose default completion token its operations use: with
// `asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>`,
// `co_await queue.async_admit()` names no token. `request_queue` is the usual one.
template <class Executor = boost::asio::any_io_executor>
class basic_request_queue {
 public:
  using executor_type = Executor;
  using admit_signature = void(error_code, permit);

  // Throws weir::exception(invalid_argument) for max_concurrent == 0.
  basic_request_queue(executor_type ex, request_queue_options options)
      : executor_(ex),
        state_(std::make_shared<detail::request_queue_state>(std::move(ex), std::move(options))) {
    detail::track_shutdown(state_->executor, state_);
  }

  const std::string& name() const noexcept { return state_->options.name; }

  // A permit if a slot is free now and nobody is waiting; an empty permit otherwise.
  permit try_admit() {
    if (!state_->try_take()) return {};
    return permit(state_);
  }

  // Waits for a slot. A permit holds it until released or destroyed.
  //
  // Completion signature: void(error_code ec, permit p)
  //   ec empty          `p` holds a slot
  //   queue_full        max_queued requests already wait (at once)
  //   shut_down         shutdown() was called
  //   operation_aborted cancelled
  // Per-operation cancellation: terminal, partial and total alike complete the wait with
  // operation_aborted and leave the queue as if the request had never come.
  //   evicted           a request of higher priority took its place (evict_lower_priority)
  // `tenant` names the line it waits in when the queue is fair between tenants; it is read
  // when the wait begins.
  template <boost::asio::completion_token_for<admit_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_admit(
      priority p, std::string_view tenant,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<CompletionToken, admit_signature>(
        initiate_async_admit{state_}, token, p, tenant);
  }

  // With no tenant.
  template <boost::asio::completion_token_for<admit_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_admit(priority p, CompletionToken&& token =
                                   boost::asio::default_completion_token_t<executor_type>()) {
    return async_admit(p, std::string_view(), std::forward<CompletionToken>(token));
  }

  // At normal priority.
  template <boost::asio::completion_token_for<admit_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_admit(
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_admit(priority::normal, std::forward<CompletionToken>(token));
  }

  // The coroutine form, for `co_await queue.admit()`: a permit at once, without suspending, when
  // a slot is free and nobody waits; otherwise it waits as async_admit does (and throws what
  // async_admit would complete with).
  boost::asio::awaitable<permit> admit(priority p = priority::normal) {
    return admit_now_or_wait(this, p);
  }

  // Completes every waiter with shut_down and refuses later admissions. Permits already given
  // stay valid until released.
  void shutdown() {
    std::vector<detail::queue_waiter*> waiting;
    {
      std::lock_guard lock(state_->mutex);
      state_->shut_down = true;
      while (auto* w = state_->pop()) waiting.push_back(w);
    }
    for (auto* w : waiting) w->complete(error::shut_down, permit());
  }

  // The synchronous halves without a permit object, for a pipeline that tracks its slot itself:
  // each successful try_take() is matched by exactly one give_back().
  bool try_take() noexcept { return state_->try_take(); }
  void give_back() noexcept { state_->release(state_); }

  std::size_t in_flight() const { return state_->in_flight.load(); }

  // Changes max_concurrent at run time (an adaptive limit does). Raised, waiters take the new
  // slots at once; lowered, the calls in flight finish and the queue admits again once under it.
  // Throws weir::exception(invalid_argument) for 0.
  void set_max_concurrent(std::size_t n) { state_->set_limit(n, state_); }
  std::size_t max_concurrent() const { return state_->limit.load(); }
  std::size_t queued() const { return state_->queued.load(); }

  const executor_type& get_executor() const noexcept { return executor_; }

  // The same queue with another executor type (copies share the queue): what Asio's
  // as_default_on makes, e.g. `asio::use_awaitable.as_default_on(queue)`, whose operations then
  // default to that completion token.
  template <class Executor1>
  struct rebind_executor {
    using other = basic_request_queue<Executor1>;
  };
  template <class Executor1>
  requires(!std::is_same_v<Executor1, Executor> &&
           std::is_constructible_v<
               Executor,
               const Executor1&>) explicit basic_request_queue(const basic_request_queue<Executor1>&
                                                                   other)
      : executor_(other.executor_), state_(other.state_) {}

  // The queue as a pipeline stage: a call holds a slot from entering until it leaves.
  basic_request_queue_stage<Executor> stage() const {
    return basic_request_queue_stage<Executor>(*this);
  }

 private:
  template <class>
  friend class basic_request_queue;

  // The initiation object of async_admit, named as Asio names its own.
  struct initiate_async_admit {
    std::shared_ptr<detail::request_queue_state> s;
    template <class Handler>
    void operator()(Handler&& handler, priority p, std::string_view tenant) const {
      initiate(s, std::forward<Handler>(handler), p, tenant);
    }
  };

  // Only a wait holds a copy of the queue: the queue is alive until the caller's co_await has
  // begun, which is all the fast path needs.
  static boost::asio::awaitable<permit> admit_now_or_wait(basic_request_queue* queue, priority p) {
    if (auto now = queue->try_admit()) co_return now;
    basic_request_queue keep = *queue;
    co_return co_await keep.async_admit(p, boost::asio::use_awaitable);
  }

  template <class Handler>
  static void initiate(std::shared_ptr<detail::request_queue_state> s, Handler handler, priority p,
                       std::string_view tenant) {
    auto fail = [&](error_code ec) {
      boost::asio::post(s->executor, boost::asio::append(std::move(handler), ec, permit()));
    };
    if (s->try_take()) {
      boost::asio::post(s->executor,
                        boost::asio::append(std::move(handler), error_code(), permit(s)));
      return;
    }
    std::unique_lock lock(s->mutex);
    if (s->shut_down) return lock.unlock(), fail(error::shut_down);
    const auto level = static_cast<std::size_t>(p);
    detail::queue_waiter* evicted = nullptr;
    if (s->queued.load() >= s->options.max_queued) {
      evicted = s->eviction_candidate(level);
      if (!evicted) return lock.unlock(), fail(error::queue_full);
    }
    auto& flow = s->levels[level].flow_for(s->options.fair_between_tenants ? tenant : "",
                                           s->options.weight_of, s->options.name);
    if (evicted) s->unlink(*evicted);
    auto op = std::make_shared<detail::queue_admission<Handler>>(s, std::move(handler));
    op->level = level;
    s->levels[level].push(*op, flow);
    s->queued.fetch_add(1);
    op->start();
    // A slot may have come free between try_take and linking: hand it out now.
    s->hand_out(lock, s);
    if (evicted) evicted->complete(error::evicted, permit());
  }

  executor_type executor_;
  std::shared_ptr<detail::request_queue_state> state_;
};

using request_queue = basic_request_queue<>;

// A request_queue in a pipeline (see stage.hpp). A wait still going on at the call's deadline
// fails with timeout, a local refusal.
template <class Executor = boost::asio::any_io_executor>
class basic_request_queue_stage {
 public:
  explicit basic_request_queue_stage(basic_request_queue<Executor> queue)
      : queue_(std::move(queue)) {}

  std::string_view name() const noexcept { return queue_.name(); }

  struct slot {
    bool held = false;
  };
  static constexpr bool values_succeed = true;

  template <class Context>
  bool try_enter(slot& s, Context&) {
    return s.held = queue_.try_take();
  }

  template <class Clock>
  boost::asio::awaitable<void> wait_enter(slot& s, stage_context<Clock>& context) {
    namespace asio = boost::asio;
    const auto& deadline = context.call.deadline;
    if (!deadline) {
      auto [ec, p] = co_await queue_.async_admit(context.call.priority, context.call.tenant,
                                                 asio::as_tuple(asio::use_awaitable));
      if (ec) throw_refusal(ec, "request_queue");
      take(s, p);
      co_return;
    }
    if (Clock::now() >= *deadline)
      throw weir::exception::refusal(error::timeout, "request_queue: the deadline has passed");
    asio::basic_waitable_timer<Clock> timer(co_await asio::this_coro::executor, *deadline);
    auto group = asio::experimental::make_parallel_group(
        queue_.async_admit(context.call.priority, context.call.tenant, asio::deferred),
        timer.async_wait(asio::deferred));
    auto [order, ec, p, timer_ec] =
        co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
    if (!ec) {
      take(s, p);
      co_return;
    }
    if (order[0] == 1 && !timer_ec)
      throw weir::exception::refusal(error::timeout,
                                     "request_queue: the deadline passed before a slot was free");
    throw_refusal(ec, "request_queue");
  }

  template <class Context, class Outcome>
  stage_action exit(slot& s, Context&, const Outcome&) {
    abandon(s);
    return {};
  }
  void abandon(slot& s) {
    if (std::exchange(s.held, false)) queue_.give_back();
  }

 private:
  // The slot now belongs to the call; it goes back when the call leaves, like a fast-path one.
  static void take(slot& s, permit& p) {
    p.detach();
    s.held = true;
  }

  basic_request_queue<Executor> queue_;
};

using request_queue_stage = basic_request_queue_stage<>;

}  // namespace weir
