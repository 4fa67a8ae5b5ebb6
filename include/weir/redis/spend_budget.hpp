// A spend budget shared by a fleet: every process that names the same budget reserves from and
// settles into one spend in Redis, so ten workers together stay within a tenant's $5 a day.
//
//     weir::redis::spend_budget<> tenants(ex, redis, {.name = "tenants", .limit = 5,
//                                                     .per = weir::budget_scope::tenant});
//     auto guarded = weir::pipeline(tenants.stage(price), limits);  // key: call_context::tenant
//
// Each key's spend is one hash, "weir:{budget:<name>:<key>}", changed by one Lua script that
// decides and reserves atomically. Windows are those of weir::spend_budget, numbered by the
// process's clock (a fleet's clocks agree to well within a window). A reservation a crashed
// process never settled expires after `reservation_ttl`, so it cannot hold the budget forever.
#pragma once

#include <weir/redis/client.hpp>
#include <weir/throttling/spend_budget.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>

namespace weir::redis {

namespace detail {

// KEYS[1]: the key's hash. ARGV: op ("reserve" | "settle"), window ("c<number>" for a calendar
// window, "r<sixtieth>" for a rolling one), limit, amount (reserve: the estimate; settle: the
// actual cost), reservation id, now (ms), reservation ttl (ms), the hash's ttl (ms).
// Fields: w (calendar window), spent, s<n> (rolling: spend per sixtieth), r<id> / e<id> (a
// reservation's amount and expiry). Returns {admitted (1/0), spent, reserved, oldest sixtieth}
// with amounts as strings.
inline constexpr const char* budget_script = R"lua(
local key, op, window, limit, amount, id = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local now, reservation_ttl, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local all = redis.call('HGETALL', key)
local spent, reserved, oldest = 0, 0, -1
local rolling = string.sub(window, 1, 1) == 'r'
local current = tonumber(string.sub(window, 2))
local fields = {}
for i = 1, #all, 2 do fields[all[i]] = all[i + 1] end
if not rolling and fields['w'] ~= window then
  redis.call('HSET', key, 'w', window, 'spent', '0')
  fields['spent'] = '0'
end
for f, v in pairs(fields) do
  local kind = string.sub(f, 1, 1)
  if rolling and kind == 's' then
    local n = tonumber(string.sub(f, 2)) or current
    if n > current - 61 then
      spent = spent + tonumber(v)
      if oldest < 0 or n < oldest then oldest = n end
    else
      redis.call('HDEL', key, f)
    end
  elseif kind == 'r' then
    local expires = tonumber(fields['e' .. string.sub(f, 2)] or '0')
    if expires < now then
      redis.call('HDEL', key, f, 'e' .. string.sub(f, 2))
    elseif f ~= 'r' .. id then
      reserved = reserved + tonumber(v)
    end
  end
end
if not rolling then spent = tonumber(fields['spent'] or '0') end
local held = tonumber(fields['r' .. id] or '0')
local admitted = 1
if op == 'reserve' then
  if spent + reserved + amount > limit * (1 + 1e-12) then
    admitted = 0
  else
    redis.call('HSET', key, 'r' .. id, string.format('%.12f', amount), 'e' .. id, tostring(now + reservation_ttl))
    reserved = reserved + amount
  end
else
  redis.call('HDEL', key, 'r' .. id, 'e' .. id)
  if amount > 0 then
    spent = spent + amount
    if rolling then
      redis.call('HINCRBYFLOAT', key, 's' .. current, string.format('%.12f', amount))
      if oldest < 0 then oldest = current end
    else
      redis.call('HSET', key, 'spent', string.format('%.12f', spent))
    end
  end
end
redis.call('PEXPIRE', key, ttl)
return {admitted, string.format('%.12f', spent), string.format('%.12f', reserved), oldest}
)lua";

}  // namespace detail

template <class Clock>
class redis_budget_stage;

// Copies share the budget. Safe from any thread. Alerts fire in the process whose settle crossed
// the threshold, once per crossing.
template <class Clock = std::chrono::steady_clock>
class spend_budget {
  struct state;

 public:
  using clock_type = Clock;

  // Throws weir::exception(invalid_argument) for the options weir::spend_budget refuses.
  spend_budget(boost::asio::any_io_executor ex, client redis, spend_budget_options options,
               std::chrono::milliseconds reservation_ttl = std::chrono::minutes(10))
      : state_(std::make_shared<state>(std::move(ex), std::move(redis), std::move(options),
                                       reservation_ttl)) {}

  // Money held in Redis for one call. Destroyed unsettled, it charges the whole estimate (the
  // call may have been sent). Settling is sent in the background.
  class reservation {
   public:
    reservation() = default;
    reservation(reservation&& o) noexcept
        : state_(std::move(o.state_)), key_(std::move(o.key_)), id_(o.id_), amount_(o.amount_) {}
    reservation& operator=(reservation&& o) noexcept {
      if (this != &o) {
        finish(amount_);
        state_ = std::move(o.state_);
        key_ = std::move(o.key_);
        id_ = o.id_;
        amount_ = o.amount_;
      }
      return *this;
    }
    ~reservation() { finish(amount_); }

    double amount() const noexcept { return amount_; }
    void settle(double actual) { finish(actual); }
    void release() { finish(0); }

   private:
    friend class spend_budget;
    reservation(std::shared_ptr<state> s, std::string key, std::uint64_t id, double amount)
        : state_(std::move(s)), key_(std::move(key)), id_(id), amount_(amount) {}
    void finish(double spent) {
      if (auto s = std::move(state_))
        boost::asio::co_spawn(s->executor, state::settle(s, std::move(key_), id_, spent),
                              boost::asio::detached);
    }

    std::shared_ptr<state> state_;
    std::string key_;
    std::uint64_t id_ = 0;
    double amount_ = 0;
  };

  // Holds `usd` of `key`'s budget, or throws: weir::exception::refusal(over_budget) saying when
  // it fits again (as weir::spend_budget::reserve), or weir::exception(unavailable) when Redis
  // cannot be reached (a budget fails closed: spending without one is what it exists to stop).
  boost::asio::awaitable<reservation> reserve(std::string key, double usd) {
    return state::reserve(state_, std::move(key), usd);
  }

  const std::string& name() const noexcept { return state_->options.name; }
  budget_scope scope() const noexcept { return state_->options.per; }
  std::string_view key_for(std::string_view tenant, std::string_view provider) const noexcept {
    return weir::detail::budget_key(scope(), tenant, provider);
  }

  redis_budget_stage<Clock> stage(weir::price p, std::string provider = {}) const {
    return redis_budget_stage<Clock>(*this, p, std::move(provider));
  }

 private:
  struct reply_values {
    bool admitted = false;
    double spent = 0;
    double reserved = 0;
    std::int64_t oldest = -1;
  };

  struct state {
    state(boost::asio::any_io_executor ex, client c, spend_budget_options o,
          std::chrono::milliseconds ttl)
        : executor(std::move(ex)),
          redis(std::move(c)),
          options(std::move(o)),
          reservation_ttl(ttl),
          calendar_offset(weir::detail::calendar_offset<Clock>()),
          next_id(std::random_device{}() * 0x9E3779B97F4A7C15ull) {
      weir::detail::validate(options);
    }

    std::int64_t unix_ns() const {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
                 .count() +
             calendar_offset;
    }
    bool rolling() const { return options.window.type() == budget_window::kind::rolling; }
    std::int64_t sixtieth() const { return options.window.length().count() / 60; }

    // The script's window argument and the hash's time to live (ms), for now.
    std::pair<std::string, std::int64_t> window(std::int64_t t) const {
      if (rolling())
        return {fmt::format("r{}", t / sixtieth()),
                options.window.length().count() / 1'000'000 * 2 + 1000};
      const auto [number, next] = weir::detail::calendar_window(options.window, t);
      return {fmt::format("c{}", number), (next - t) / 1'000'000 + 1000};
    }

    static boost::asio::awaitable<reply_values> run(std::shared_ptr<state> s, std::string_view op,
                                                    const std::string& key, std::uint64_t id,
                                                    double amount, double limit) {
      const auto t = s->unix_ns();
      auto [window, ttl] = s->window(t);
      std::vector<std::string> words{"EVAL",
                                     detail::budget_script,
                                     "1",
                                     s->hash_key(key),
                                     std::string(op),
                                     std::move(window),
                                     fmt::format("{:.12f}", limit),
                                     fmt::format("{:.12f}", amount),
                                     std::to_string(id),
                                     std::to_string(t / 1'000'000),
                                     std::to_string(s->reservation_ttl.count()),
                                     std::to_string(std::max<std::int64_t>(ttl, 1000))};
      auto [ec, r] = co_await s->redis.async_command(
          std::move(words), boost::asio::as_tuple(boost::asio::use_awaitable));
      if (ec || r.type != reply::kind::array || r.elements.size() != 4)
        throw weir::exception(
            error::unavailable,
            fmt::format("{}: Redis did not answer the budget script{}", s->options.name,
                        r.is_error() ? ": " + r.text.substr(0, 80) : ""));
      co_return reply_values{r.elements[0].integer == 1, std::atof(r.elements[1].text.c_str()),
                             std::atof(r.elements[2].text.c_str()), r.elements[3].integer};
    }

    std::string hash_key(std::string_view key) const {
      return fmt::format("weir:{{budget:{}:{}}}", options.name, key);
    }

    double limit_of(std::string_view key) const {
      if (!options.limit_of) return options.limit;
      const double l = options.limit_of(key);
      if (!(l >= 0) || !std::isfinite(l))
        weir::detail::invalid_option(options.name, "limit_of", l, "give a finite amount ≥ 0");
      return l;
    }

    static boost::asio::awaitable<reservation> reserve(std::shared_ptr<state> s, std::string key,
                                                       double usd) {
      if (!(usd >= 0) || !std::isfinite(usd))
        weir::detail::invalid_option(s->options.name, "reserved cost", usd,
                                     "be a finite amount ≥ 0");
      const double limit = s->limit_of(key);
      const auto id = s->next_id.fetch_add(1, std::memory_order_relaxed);
      const auto r = co_await run(s, "reserve", key, id, usd, limit);
      if (r.admitted) co_return reservation(s, std::move(key), id, usd);
      std::optional<std::chrono::nanoseconds> when;
      if (usd <= limit && r.reserved + usd <= limit) {
        const auto t = s->unix_ns();
        if (!s->rolling())
          when = std::chrono::nanoseconds(
              weir::detail::calendar_window(s->options.window, t).second - t);
        else if (r.oldest >= 0)
          when = std::chrono::nanoseconds((r.oldest + 61) * s->sixtieth() - t);
      }
      throw weir::detail::over_budget(s->options.name, key, usd, r.spent, r.reserved, limit, when);
    }

    static boost::asio::awaitable<void> settle(std::shared_ptr<state> s, std::string key,
                                               std::uint64_t id, double spent) {
      try {
        const double limit = s->limit_of(key);
        const auto r = co_await run(s, "settle", key, id, spent, limit);
        if (!s->options.watch) co_return;
        for (double t : s->options.alert_at)
          if (r.spent - spent < t * limit && r.spent >= t * limit && limit > 0)
            s->options.watch(budget_alert{.operation = {},
                                          .budget = s->options.name,
                                          .key = key,
                                          .threshold = t,
                                          .spent = r.spent,
                                          .limit = limit});
      } catch (const std::exception&) {
        // Redis unreachable: the reservation expires there by itself; the spend is not known.
      }
    }

    boost::asio::any_io_executor executor;
    client redis;
    const spend_budget_options options;
    std::chrono::milliseconds reservation_ttl;
    std::int64_t calendar_offset;
    std::atomic<std::uint64_t> next_id;
  };

  std::shared_ptr<state> state_;
};

// The shared budget in a pipeline: as weir::spend_budget's stage, with the reservation made in
// Redis (every call waits one round trip) and settled in the background.
template <class Clock>
class redis_budget_stage : public weir::detail::budget_stage_base<spend_budget<Clock>> {
  using base = weir::detail::budget_stage_base<spend_budget<Clock>>;

 public:
  using base::base;

  bool try_enter(typename base::slot&, stage_context<Clock>&) { return false; }

  boost::asio::awaitable<void> wait_enter(typename base::slot& s, stage_context<Clock>& context) {
    auto held = co_await this->budget_.reserve(std::string(this->key_of(context.call)),
                                               this->estimate_of(context.call));
    s.held.emplace(std::move(held));
  }
};

}  // namespace weir::redis
