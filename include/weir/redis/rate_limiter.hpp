// Limits shared by every process that uses the same Redis: ten workers on three hosts with one
// API key stay under the key's quota together, as one process would.
//
//     weir::redis::client redis(ex, {.port = 6379});
//     weir::redis::rate_limiter<> shared(ex, redis, {.name = "openai-prod",
//                                                    .requests = weir::limit::per_minute(500),
//                                                    .tokens = weir::limit::per_minute(200'000)});
//     co_await shared.async_acquire({.requests = 1, .tokens = 1200}, asio::use_awaitable);
//     auto guarded = weir::pipeline(retry, shared, breaker);  // or as a pipeline stage
//
// The state is one GCRA arrival time per dimension, in Redis, moved by a Lua script (EVALSHA;
// EVAL where a server does not have it yet) that checks every dimension and charges all or none,
// on Redis's own clock. Keys expire once their bucket is full again, so idle limiters leave
// nothing. Concurrent acquires share script runs (auto-pipelining), a refused acquire reserves
// its slot (fair shares), and the keys carry the name as a hash tag, so a cluster works.
//
// Part of the optional weir::redis target (links hiredis).
#pragma once

#include <weir/core/error.hpp>
#include <weir/detail/limiter_stage.hpp>
#include <weir/redis/client.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/request_queue.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace weir::redis {

// Where admission decisions come from right now.
enum class limiter_mode {
  shared,  // Redis
  local,   // Redis is unreachable: a local bucket at a fraction of the quota
  closed,  // Redis is unreachable and the policy is to fail closed
};

enum class when_unreachable { fail_closed, use_local };

struct rate_limiter_options {
  // Names the quota (a provider, an API key's label — never the key itself); the Redis keys are
  // "weir:{name}:requests" and "weir:{name}:tokens".
  std::string name = "default";
  std::optional<limit> requests{};
  std::optional<limit> tokens{};
  when_unreachable fallback = when_unreachable::fail_closed;
  double local_fraction = 0.25;  // with use_local: the share of the quota this process may use
  // While on the fallback, how often to look whether Redis is back.
  std::chrono::milliseconds probe_every{250};
  // Leases (request-only acquisitions): take up to `max_lease` requests from Redis in one round
  // trip, sized to what this process used in the last `lease_horizon`, and hand them out
  // locally; what is left when the lease expires goes back. 1 disables leases.
  std::uint32_t max_lease = 1;
  std::chrono::milliseconds lease_horizon{100};
  // Fair shares when the fleet is saturated. A refused acquire reserves the next free slot in
  // Redis instead of sleeping and asking again (where whoever asks first wins): the fleet is
  // then served first come, first served. Each process holds at most `share_weight` such
  // reservations at a time (its other callers queue locally, in order), so processes share the
  // quota in proportion to their weights whatever their concurrency. 0: no reservations.
  std::uint32_t share_weight = 1;
  std::function<void(limiter_mode from, limiter_mode to)> on_mode_change{};
};

namespace detail {

// Decides a batch of requests, in order, exactly as one call each would. ARGV: per dimension its
// emission interval and tolerance (µs); then per request its cost in each dimension and how far
// ahead (µs) it may reserve a slot. "now" is Redis's clock. Returns, per request, {1, 0} when
// admitted now, {1, µs} when a slot that many µs ahead is reserved (charged: the caller goes
// then without asking again), or {0, µs until it might fit} (nothing charged). A reservation is
// GCRA's own rule moved forward: the slot is the first time the request conforms.
inline constexpr const char* acquire_script = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local d = #KEYS
local tat, interval, tolerance = {}, {}, {}
for i = 1, d do
  interval[i] = tonumber(ARGV[2 * i - 1])
  tolerance[i] = tonumber(ARGV[2 * i])
  tat[i] = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat[i] < now then tat[i] = now end
end
local out = {}
local charged = false
local at = 2 * d + 1
while at <= #ARGV do
  local wait = 0
  local next = {}
  for i = 1, d do
    next[i] = tat[i] + interval[i] * tonumber(ARGV[at + i - 1])
    local w = next[i] - tolerance[i] - now
    if w > wait then wait = w end
  end
  if wait > tonumber(ARGV[at + d]) then
    out[#out + 1] = 0
  else
    for i = 1, d do tat[i] = next[i] end
    out[#out + 1] = 1
    charged = true
  end
  out[#out + 1] = math.ceil(wait)
  at = at + d + 1
end
if charged then
  for i = 1, d do
    redis.call('SET', KEYS[i], string.format('%.0f', tat[i]), 'PX', math.ceil((tat[i] - now) / 1000) + 1)
  end
end
return out
)lua";

// ARGV per dimension: emission interval (µs), units to add (negative: give back). Unconditional.
inline constexpr const char* settle_script = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local delta = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tat = tat + interval * delta
  if tat <= now then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
return 1
)lua";

}  // namespace detail

// Copies share one limiter. Safe from any thread. The executor type gives the operations their
// default completion token, as token_bucket's does: `asio::use_awaitable.as_default_on(shared)`
// makes a copy whose `co_await shared.async_acquire(cost)` names none.
template <class Clock = std::chrono::steady_clock, class Executor = boost::asio::any_io_executor>
class rate_limiter {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using executor_type = Executor;
  using acquire_signature = void(error_code, std::chrono::nanoseconds);
  using cost_type = usage;
  static const usage& cost_of(const usage& u) noexcept { return u; }

  // Throws weir::exception(invalid_argument) for no limit, a bad rate or burst, a fraction outside
  // (0, 1] or max_lease 0.
  rate_limiter(executor_type ex, client redis, rate_limiter_options options)
      : executor_(ex),
        state_(
            std::make_shared<shared_state>(std::move(ex), std::move(redis), std::move(options))) {}

  // Waits until `cost` is admitted, as rate_limits::async_acquire does, so the two swap by
  // changing a type.
  //
  // Completion signature: void(error_code ec, std::chrono::nanoseconds waited)
  //   ec empty          admitted
  //   rate_limited      the wait would exceed max_wait (`waited` is that wait); nothing charged
  //   unavailable       Redis cannot be reached and the policy is fail_closed
  //   invalid_argument  a cost above a limit's burst
  //   operation_aborted cancelled
  // Per-operation cancellation: terminal, partial and total alike end a wait between attempts
  // at once, charging nothing; an attempt already sent to Redis finishes first.
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(
      usage cost, std::chrono::nanoseconds max_wait,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<CompletionToken, acquire_signature>(
        typename core::initiate_async_acquire{state_}, token, cost, max_wait);
  }
  template <boost::asio::completion_token_for<acquire_signature> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(usage cost, CompletionToken&& token =
                                     boost::asio::default_completion_token_t<executor_type>()) {
    return async_acquire(cost, std::chrono::nanoseconds::max(),
                         std::forward<CompletionToken>(token));
  }

  // One attempt, no waiting.
  // Completion signature: void(error_code ec, bool admitted); errors as async_acquire's.
  // Per-operation cancellation: as async_acquire's (the attempt in flight finishes first).
  template <boost::asio::completion_token_for<void(error_code, bool)> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_try_acquire(usage cost, CompletionToken&& token =
                                         boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<CompletionToken, void(error_code, bool)>(
        typename core::initiate_async_try_acquire{state_}, token, cost);
  }

  // Charges what a call used beyond its estimate, or gives back what it did not use.
  // Completion signature: void(error_code ec); unavailable when Redis cannot be reached.
  // Per-operation cancellation: as async_acquire's.
  template <boost::asio::completion_token_for<void(error_code)> CompletionToken =
                boost::asio::default_completion_token_t<executor_type>>
  auto async_settle(
      usage estimated, usage actual,
      CompletionToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<CompletionToken, void(error_code)>(
        typename core::initiate_async_settle{state_}, token, estimated, actual);
  }

  // The shared limiter as a pipeline stage: the same stage as rate_limits', which waits here
  // on every call (each admission is a round trip, or a lease) and settles in the background.
  weir::detail::limiter_stage<rate_limiter> stage() const { return {*this}; }

  limiter_mode mode() const noexcept { return state_->mode.load(); }
  const std::string& name() const noexcept { return state_->options.name; }
  const executor_type& get_executor() const noexcept { return executor_; }

  // The same limiter with another executor type (copies share the state): what Asio's
  // as_default_on makes.
  template <class Executor1>
  struct rebind_executor {
    using other = rate_limiter<Clock, Executor1>;
  };
  template <class Executor1>
  requires(!std::is_same_v<Executor1, Executor> &&
           std::is_constructible_v<
               Executor,
               const Executor1&>) explicit rate_limiter(const rate_limiter<Clock, Executor1>& other)
      : executor_(other.executor_), state_(other.state_) {}

 private:
  template <class, class>
  friend class rate_limiter;
  // One implementation whatever the executor type, so that rebound copies share it: its state
  // keeps the executor as an any_io_executor, the limiter the type its user named.
  using core = rate_limiter<Clock, boost::asio::any_io_executor>;
  struct state;
  using shared_state = typename core::state;

  struct state : std::enable_shared_from_this<state> {
    state(boost::asio::any_io_executor ex, client c, rate_limiter_options o)
        : executor(std::move(ex)), redis(std::move(c)), options(std::move(o)) {
      if (!options.requests && !options.tokens)
        throw weir::exception(error::invalid_argument, "redis rate_limiter: no limit given");
      constexpr const char* who = "redis rate_limiter";
      if (!(options.local_fraction > 0 && options.local_fraction <= 1))
        weir::detail::invalid_option(who, "local_fraction", options.local_fraction, "be in (0, 1]");
      if (options.max_lease == 0)
        weir::detail::invalid_option(who, "max_lease", options.max_lease, "be at least 1");
      for (const auto& [field, l] :
           {std::pair{"requests", &options.requests}, std::pair{"tokens", &options.tokens}}) {
        if (!*l) continue;
        // As token_bucket: no rate of zero. And no weir::unlimited: leave the dimension out.
        if (!((*l)->rate.per_second > 0) || !std::isfinite((*l)->rate.per_second))
          weir::detail::invalid_option(who, fmt::format("{}.rate", field), (*l)->rate.per_second,
                                       "be positive and finite (per second); for no limit, "
                                       "leave the dimension out");
        if ((*l)->burst == 0)
          weir::detail::invalid_option(who, fmt::format("{}.burst", field), (*l)->burst,
                                       "be at least 1");
      }
      if (options.requests)
        dims.push_back(
            {true, fmt::format("weir:{{{}}}:requests", options.name), *options.requests});
      if (options.tokens)
        dims.push_back({false, fmt::format("weir:{{{}}}:tokens", options.name), *options.tokens});
      rate_limits_options local{.name = options.name + " (local fallback)"};
      const auto scaled = [&](const limit& l) {
        return limit{
            weir::per_second(l.rate.per_second * options.local_fraction),
            std::max<std::uint64_t>(1, static_cast<std::uint64_t>(static_cast<double>(l.burst) *
                                                                  options.local_fraction))};
      };
      if (options.requests) local.requests = scaled(*options.requests);
      if (options.tokens) local.tokens = scaled(*options.tokens);
      fallback_limits.emplace(executor, local);
      if (options.share_weight > 0)
        reservations.emplace(
            executor, request_queue_options{.max_concurrent = options.share_weight,
                                            .max_queued = std::numeric_limits<std::size_t>::max(),
                                            .name = options.name + " (reservations)"});
    }

    struct dimension_spec {
      bool requests;    // else tokens
      std::string key;  // weir:{name}:requests or :tokens
      limit l;
      double interval_us() const { return 1e6 / l.rate.per_second; }
    };

    // A cost in the order of `dims`.
    std::array<std::uint64_t, 2> units(const usage& u) const {
      std::array<std::uint64_t, 2> out{};
      for (std::size_t i = 0; i < dims.size(); ++i)
        out[i] = dims[i].requests ? u.requests : u.tokens;
      return out;
    }

    // EVALSHA with the script's digest (learned once with SCRIPT LOAD). A server without the
    // script (restarted, failed over to, or another node of a cluster) answers NOSCRIPT: EVAL
    // then sends it whole, which also leaves it there for the next EVALSHA.
    boost::asio::awaitable<std::optional<reply>> eval(std::size_t which,
                                                      std::vector<std::string> args) {
      const char* script = which == 0 ? detail::acquire_script : detail::settle_script;
      std::string sha;
      {
        std::lock_guard lock(sha_mutex);
        sha = shas[which];
      }
      if (sha.empty()) {
        std::vector<std::string> load{"SCRIPT", "LOAD", script};
        auto [ec, loaded] = co_await redis.async_command(
            std::move(load), boost::asio::as_tuple(boost::asio::use_awaitable));
        if (ec || loaded.says_unavailable()) co_return std::nullopt;
        if (loaded.type != reply::kind::string)
          throw weir::exception(error::invalid_argument,
                                "redis rate_limiter: SCRIPT LOAD gave no digest");
        sha = loaded.text;
        std::lock_guard lock(sha_mutex);
        shas[which] = sha;
      }
      std::vector<std::string> words{"EVALSHA", sha, std::to_string(dims.size())};
      for (const auto& d : dims) words.push_back(d.key);
      for (auto& a : args) words.push_back(std::move(a));
      for (int round = 0; round < 2; ++round) {
        // Named, not a temporary in the co_await: g++ 12 mishandles those (see router.hpp).
        std::vector<std::string> command = round == 0 ? words : std::move(words);
        const auto sent = std::chrono::steady_clock::now();
        auto [ec, r] = co_await redis.async_command(
            std::move(command), boost::asio::as_tuple(boost::asio::use_awaitable));
        if (ec) co_return std::nullopt;
        note_round_trip(std::chrono::steady_clock::now() - sent);
        if (round == 0 && r.is_error() && r.text.starts_with("NOSCRIPT")) {
          words[0] = "EVAL";
          words[1] = script;
          continue;
        }
        // Loading, failing over, busy, out of memory: unavailable for now, as a lost connection.
        if (r.says_unavailable()) co_return std::nullopt;
        if (r.is_error())
          throw weir::exception(
              error::invalid_argument,
              fmt::format("redis rate_limiter: the script failed ({})", r.text.substr(0, 80)));
        co_return r;
      }
      co_return std::nullopt;
    }

    void switch_to(limiter_mode to) {
      const auto from = mode.exchange(to);
      if (from != to && options.on_mode_change) options.on_mode_change(from, to);
    }

    limiter_mode unreachable_mode() const {
      return options.fallback == when_unreachable::use_local ? limiter_mode::local
                                                             : limiter_mode::closed;
    }

    // One decision: admitted, or not and (through `wait`, when given) how long until it might be.
    boost::asio::awaitable<bool> attempt(const usage& cost, std::chrono::microseconds* wait) {
      const auto n = units(cost);
      for (std::size_t i = 0; i < dims.size(); ++i)
        if (n[i] > dims[i].l.burst)
          throw weir::exception(error::invalid_argument, "cost exceeds a limit's burst");
      if (mode.load() != limiter_mode::shared && Clock::now() < next_probe.load()) {
        co_return local_attempt(cost, wait);
      }
      if (lease_hit(cost)) co_return true;
      const auto take = lease_size(cost);
      auto charged = n;
      if (take > 1) charged[0] = take;
      const auto answer = co_await decide(charged, std::chrono::microseconds(0));
      if (answer.error) std::rethrow_exception(answer.error);
      if (!answer.reached) {
        went_away();
        co_return local_attempt(cost, wait);
      }
      switch_to(limiter_mode::shared);
      const bool admitted = answer.admitted;
      if (admitted && take > 1) open_lease(take - 1);
      if (!admitted && take > 1) {
        // The batch did not fit: ask for this request alone.
        lease_rate_reset();
        co_return co_await attempt(cost, wait);
      }
      if (admitted) note_use();
      if (!admitted && wait) *wait = answer.wait;
      co_return admitted;
    }

    // One request's answer from the acquire script.
    struct decision {
      bool reached = false;  // false: Redis did not answer (usably)
      bool admitted = false;
      std::chrono::microseconds wait{0};
      std::exception_ptr error;  // the script failed
    };

    // Asks Redis whether `charged` fits now, or reserves the first slot within `reserve` ahead.
    // Auto-pipelining: the requests made while a batch is on its way go together in the next
    // one, and one EVALSHA decides each of them in order, exactly as one call each would; so
    // concurrent callers share round trips and script runs, and a lone caller waits for nobody.
    boost::asio::awaitable<decision> decide(std::array<std::uint64_t, 2> charged,
                                            std::chrono::microseconds reserve) {
      return boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(decision)>(
          [this, charged, reserve](auto handler) {
            auto waiting = std::make_shared<decltype(handler)>(std::move(handler));
            enqueue({charged, reserve, [waiting](decision d) {
                       auto ex = boost::asio::get_associated_executor(*waiting);
                       boost::asio::post(ex, boost::asio::append(std::move(*waiting), d));
                     }});
          },
          boost::asio::use_awaitable);
    }

    struct queued {
      std::array<std::uint64_t, 2> charged{};
      std::chrono::microseconds reserve{0};
      std::function<void(decision)> answer;
    };
    static constexpr std::size_t max_batch = 256;  // keeps one script run short for Redis

    void enqueue(queued q) {
      {
        std::lock_guard lock(batch_mutex);
        batch.push_back(std::move(q));
        if (batch_in_flight) return;
        batch_in_flight = true;
      }
      boost::asio::co_spawn(executor, send_batches(this->shared_from_this()),
                            boost::asio::detached);
    }

    // Sends what is queued, one batch at a time, until nothing is.
    static boost::asio::awaitable<void> send_batches(std::shared_ptr<state> self) {
      for (;;) {
        std::vector<queued> going;
        {
          std::lock_guard lock(self->batch_mutex);
          const auto n = static_cast<std::ptrdiff_t>(std::min(self->batch.size(), max_batch));
          going.assign(std::make_move_iterator(self->batch.begin()),
                       std::make_move_iterator(self->batch.begin() + n));
          self->batch.erase(self->batch.begin(), self->batch.begin() + n);
          if (going.empty()) self->batch_in_flight = false;
        }
        if (going.empty()) co_return;
        std::vector<std::string> args;
        for (const auto& d : self->dims) {
          args.push_back(fmt::format("{:.3f}", d.interval_us()));
          args.push_back(std::to_string(
              static_cast<std::int64_t>(d.interval_us() * static_cast<double>(d.l.burst))));
        }
        for (const auto& q : going) {
          for (std::size_t i = 0; i < self->dims.size(); ++i)
            args.push_back(std::to_string(q.charged[i]));
          args.push_back(std::to_string(q.reserve.count()));
        }
        std::vector<decision> answers(going.size());
        try {
          const auto r = co_await self->eval(0, std::move(args));
          // Anything but the script's answer counts as no answer.
          if (r && r->type == reply::kind::array && r->elements.size() == 2 * going.size())
            for (std::size_t k = 0; k < going.size(); ++k)
              answers[k] = {true,
                            r->elements[2 * k].integer == 1,
                            std::chrono::microseconds(r->elements[2 * k + 1].integer),
                            {}};
        } catch (...) {
          for (auto& a : answers) a.error = std::current_exception();
        }
        for (std::size_t k = 0; k < going.size(); ++k) going[k].answer(answers[k]);
      }
    }

    // Redis did not answer (or not usably): the fallback decides until the next probe.
    void went_away() {
      next_probe = Clock::now() + options.probe_every;
      switch_to(unreachable_mode());
    }

    // What a reservation came to.
    struct reservation {
      enum { slot, refused, unreachable } outcome = unreachable;
      std::chrono::microseconds wait{0};  // until the slot, or (refused) until one might be free
    };

    // Reserves the next slot that `cost` fits in, if it comes within `within`.
    boost::asio::awaitable<reservation> reserve(const usage& cost,
                                                std::chrono::nanoseconds within) {
      const auto ahead = std::chrono::duration_cast<std::chrono::microseconds>(
          std::min<std::chrono::nanoseconds>(within, std::chrono::hours(24)));
      const auto answer = co_await decide(units(cost), ahead);
      if (answer.error) std::rethrow_exception(answer.error);
      if (!answer.reached) {
        went_away();
        co_return reservation{};
      }
      switch_to(limiter_mode::shared);
      if (!answer.admitted) co_return reservation{reservation::refused, answer.wait};
      note_use();
      co_return reservation{reservation::slot, answer.wait};
    }

    // A smoothed round trip to Redis, for releasing a reservation's turn a round trip early.
    void note_round_trip(std::chrono::steady_clock::duration took) {
      const auto sample = std::chrono::duration_cast<std::chrono::nanoseconds>(took).count();
      const auto old = round_trip_ns.load(std::memory_order_relaxed);
      round_trip_ns.store(old == 0 ? sample : old + (sample - old) / 8, std::memory_order_relaxed);
    }
    std::chrono::nanoseconds round_trip() const {
      return std::chrono::nanoseconds(round_trip_ns.load(std::memory_order_relaxed));
    }

    bool local_attempt(const usage& cost, std::chrono::microseconds* wait) {
      if (mode.load() == limiter_mode::closed)
        throw weir::exception(error::unavailable, "the shared rate limiter is unreachable");
      if (fallback_limits->try_acquire(cost)) return true;
      if (wait)
        *wait = std::chrono::duration_cast<std::chrono::microseconds>(
            fallback_limits->time_until(cost));
      return false;
    }

    // ---- leases: request-only costs, first dimension "requests" ----
    bool leasable(const usage& cost) const {
      return options.max_lease > 1 && options.requests && cost.tokens == 0 && cost.requests == 1;
    }
    bool lease_hit(const usage& cost) {
      if (!leasable(cost)) return false;
      std::lock_guard lock(lease_mutex);
      if (leased == 0 || Clock::now() >= lease_expiry) return false;
      --leased;
      note_use_locked();
      return true;
    }
    std::uint64_t lease_size(const usage& cost) {
      if (!leasable(cost)) return 1;
      std::lock_guard lock(lease_mutex);
      const double horizon = std::chrono::duration<double>(options.lease_horizon).count();
      const auto want = static_cast<std::uint64_t>(std::ceil(recent_rate * horizon));
      return std::clamp<std::uint64_t>(
          want, 1, std::min<std::uint64_t>(options.max_lease, options.requests->burst));
    }
    void open_lease(std::uint64_t n) {
      std::lock_guard lock(lease_mutex);
      leased += n;
      lease_expiry = Clock::now() + options.lease_horizon;
      note_use_locked();
    }
    void lease_rate_reset() {
      std::lock_guard lock(lease_mutex);
      recent_rate = 0;
    }
    void note_use() {
      std::lock_guard lock(lease_mutex);
      note_use_locked();
    }
    // An exponentially decaying count of acquisitions per second.
    void note_use_locked() {
      const auto now = Clock::now();
      const double dt = std::chrono::duration<double>(now - last_use).count();
      const double horizon = std::chrono::duration<double>(options.lease_horizon).count();
      const double keep = std::exp(-std::max(0.0, dt) / (10 * horizon));
      recent_rate = recent_rate * keep + (1 - keep) / std::max(dt, 1e-6);
      last_use = now;
    }
    // What an expired lease left over, to give back.
    std::uint64_t expired_lease() {
      std::lock_guard lock(lease_mutex);
      if (leased == 0 || Clock::now() < lease_expiry) return 0;
      return std::exchange(leased, 0);
    }

    boost::asio::awaitable<void> settle(const usage& estimated, const usage& actual) {
      const auto before = units(estimated), after = units(actual);
      std::vector<std::string> args;
      bool any = false;
      for (std::size_t i = 0; i < dims.size(); ++i) {
        const auto delta =
            static_cast<std::int64_t>(after[i]) - static_cast<std::int64_t>(before[i]);
        any = any || delta != 0;
        args.push_back(fmt::format("{:.3f}", dims[i].interval_us()));
        args.push_back(std::to_string(delta));
      }
      if (!any) co_return;
      if (mode.load() != limiter_mode::shared) {
        fallback_limits->settle(estimated, actual);
        co_return;
      }
      co_await eval(1, std::move(args));
    }

    boost::asio::awaitable<void> give_back_lease() {
      if (const auto left = expired_lease(); left > 0 && mode.load() == limiter_mode::shared) {
        usage none{.requests = 0}, took{.requests = left};
        co_await settle(took, none);
      }
    }

    boost::asio::any_io_executor executor;
    client redis;
    rate_limiter_options options;
    std::vector<dimension_spec> dims;
    std::optional<rate_limits<Clock>> fallback_limits;
    std::optional<request_queue> reservations;  // at most share_weight reservations at a time
    std::atomic<std::int64_t> round_trip_ns{0};
    std::mutex batch_mutex;
    std::vector<queued> batch;  // waiting for the batch on its way to come back
    bool batch_in_flight = false;
    std::mutex sha_mutex;
    std::array<std::string, 2> shas;  // the loaded scripts: acquire, settle
    std::atomic<limiter_mode> mode{limiter_mode::shared};
    std::atomic<time_point> next_probe{time_point{}};
    std::mutex lease_mutex;
    std::uint64_t leased = 0;
    time_point lease_expiry{};
    double recent_rate = 0;
    time_point last_use = Clock::now();
  };

  // The initiation objects, named as Asio names its own: each runs its work as a coroutine on
  // the limiter's executor.
  struct initiate_async_acquire {
    std::shared_ptr<state> s;
    template <class Handler>
    void operator()(Handler&& handler, usage cost, std::chrono::nanoseconds max_wait) const {
      spawn(s, acquire(s, cost, max_wait), std::forward<Handler>(handler));
    }
  };
  struct initiate_async_try_acquire {
    std::shared_ptr<state> s;
    template <class Handler>
    void operator()(Handler&& handler, usage cost) const {
      spawn(s, try_once(s, cost), std::forward<Handler>(handler));
    }
  };
  struct initiate_async_settle {
    std::shared_ptr<state> s;
    template <class Handler>
    void operator()(Handler&& handler, usage estimated, usage actual) const {
      spawn(s, settle_once(s, estimated, actual), std::forward<Handler>(handler));
    }
  };

  // What acquire comes to when it ends without an exception.
  struct acquired {
    error_code code;  // rate_limited when max_wait refused the wait
    std::chrono::nanoseconds waited{0};
  };

  // The completion arguments after the error_code, for each kind of work.
  static auto arguments(error_code ec, bool admitted) { return std::tuple(ec, admitted); }
  static auto arguments(error_code ec, const acquired& a) {
    return std::tuple(ec ? ec : a.code, a.waited);
  }

  // Runs `work` on the limiter's executor and completes `handler` with its result, an error_code
  // first, on the handler's own executor. The handler's cancellation slot reaches the coroutine.
  template <class T, class Handler>
  static void spawn(const std::shared_ptr<state>& s, boost::asio::awaitable<T> work,
                    Handler handler) {
    namespace asio = boost::asio;
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto deliver = [handler = std::move(handler)](auto args) mutable {
      auto ex = asio::get_associated_executor(handler);
      asio::dispatch(
          ex, std::apply([&](auto... a) { return asio::append(std::move(handler), a...); }, args));
    };
    if constexpr (std::is_void_v<T>) {
      asio::co_spawn(s->executor, std::move(work),
                     asio::bind_cancellation_slot(
                         slot, [d = std::move(deliver)](std::exception_ptr e) mutable {
                           d(std::tuple(code_of(e)));
                         }));
    } else {
      asio::co_spawn(s->executor, std::move(work),
                     asio::bind_cancellation_slot(
                         slot, [d = std::move(deliver)](std::exception_ptr e, T value) mutable {
                           d(arguments(code_of(e), value));
                         }));
    }
  }

  static error_code code_of(const std::exception_ptr& e) {
    if (!e) return {};
    return weir::detail::weir_code(e).value_or(error::unavailable);
  }

  static boost::asio::awaitable<bool> try_once(std::shared_ptr<state> s, usage cost) {
    co_return co_await s->attempt(cost, nullptr);
  }
  static boost::asio::awaitable<void> settle_once(std::shared_ptr<state> s, usage estimated,
                                                  usage actual) {
    co_await s->settle(estimated, actual);
  }

  static boost::asio::awaitable<acquired> acquire(std::shared_ptr<state> s, usage cost,
                                                  std::chrono::nanoseconds max_wait) {
    boost::asio::basic_waitable_timer<Clock> timer(co_await boost::asio::this_coro::executor);
    const auto started = Clock::now();
    for (;;) {
      co_await s->give_back_lease();
      std::chrono::microseconds wait{0};
      const auto waited =
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started);
      if (co_await s->attempt(cost, &wait)) co_return acquired{{}, waited};
      if (wait > max_wait - std::min(max_wait, waited))
        co_return acquired{error::rate_limited, waited + wait};
      if (s->reservations && s->mode.load() == limiter_mode::shared) {
        if (auto done = co_await reserve_and_wait(s, cost, max_wait, started)) co_return *done;
        continue;  // Redis went away meanwhile: on to the fallback
      }
      // Not admitted: sleep until it may be, but look again at least every probe period while
      // on the fallback, so a returning Redis is noticed.
      if (s->mode.load() != limiter_mode::shared)
        wait = std::min<std::chrono::microseconds>(wait, s->options.probe_every);
      timer.expires_after(std::max<std::chrono::microseconds>(wait, std::chrono::microseconds(50)));
      co_await timer.async_wait(boost::asio::use_awaitable);
    }
  }

  // Waits for this process's turn to hold a reservation, reserves, and waits for the slot. The
  // turn passes on a round trip before the slot, so that the next reservation is made in time to
  // follow it. nullopt when Redis could not be reached. Cancelled while waiting for the slot, the
  // slot is given back.
  static boost::asio::awaitable<std::optional<acquired>> reserve_and_wait(
      std::shared_ptr<state> s, usage cost, std::chrono::nanoseconds max_wait, time_point started) {
    auto turn = co_await s->reservations->admit();
    const auto waited = [&] {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started);
    };
    const auto r = co_await s->reserve(cost, max_wait - std::min(max_wait, waited()));
    if (r.outcome == state::reservation::unreachable) co_return std::nullopt;
    if (r.outcome == state::reservation::refused)
      co_return acquired{error::rate_limited, waited() + r.wait};
    const auto slot = Clock::now() + r.wait;
    boost::asio::basic_waitable_timer<Clock> timer(co_await boost::asio::this_coro::executor);
    bool cancelled = false;
    try {
      timer.expires_at(slot - std::min<std::chrono::nanoseconds>(s->round_trip(), r.wait));
      co_await timer.async_wait(boost::asio::use_awaitable);
      turn.release();
      timer.expires_at(slot);
      co_await timer.async_wait(boost::asio::use_awaitable);
    } catch (const boost::system::system_error&) {
      cancelled = true;
    }
    if (cancelled) {
      // The slot is charged in Redis: give it back (in the background), then end as cancelled.
      boost::asio::co_spawn(s->executor, settle_once(s, cost, usage{.requests = 0, .tokens = 0}),
                            boost::asio::detached);
      throw boost::system::system_error(boost::asio::error::operation_aborted);
    }
    co_return acquired{{}, waited()};
  }

  executor_type executor_;
  std::shared_ptr<shared_state> state_;
};

}  // namespace weir::redis
