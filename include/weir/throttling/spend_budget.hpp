// Dollars per window — an hour, a day, a calendar month (UTC) or a rolling window — overall, per
// tenant or per provider. A call reserves its estimated cost before it is sent and settles what
// it really cost from the response's usage; a call whose estimate would pass the budget fails at
// once with error::over_budget, saying which budget and when it has room again.
//
//     weir::spend_budget<> per_tenant({.name = "tenants", .limit = 5.00,
//                                      .window = weir::budget_window::daily(),
//                                      .per = weir::budget_scope::tenant});
//     auto guarded = weir::pipeline(per_tenant.stage({.input_per_million = 0.15,
//                                                     .output_per_million = 0.60}), limits);
//
// Since every call reserves before it is sent, concurrent calls cannot together pass the limit:
// whatever the concurrency, settled spend stays within it as long as no call costs more than its
// estimate (estimate output tokens by max_tokens, which bounds them).
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/price.hpp>
#include <weir/core/stage.hpp>
#include <weir/observability/metrics.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace weir {

// When a budget's spend starts again from zero.
class budget_window {
 public:
  enum class kind { hour, day, month, rolling };

  // Calendar windows, in UTC: the spend resets at the top of each hour, at midnight, on the 1st.
  static constexpr budget_window hourly() noexcept { return budget_window(kind::hour, {}); }
  static constexpr budget_window daily() noexcept { return budget_window(kind::day, {}); }
  static constexpr budget_window monthly() noexcept { return budget_window(kind::month, {}); }
  // The spend of the last `length`, kept in sixtieths: a call counts from when it settles until
  // the end of the sixtieth in which `length` has passed, so the window never forgets early.
  static constexpr budget_window rolling(std::chrono::nanoseconds length) noexcept {
    return budget_window(kind::rolling, length);
  }

  constexpr kind type() const noexcept { return kind_; }
  constexpr std::chrono::nanoseconds length() const noexcept { return length_; }

 private:
  constexpr budget_window(kind k, std::chrono::nanoseconds length) : kind_(k), length_(length) {}
  kind kind_;
  std::chrono::nanoseconds length_;
};

// What one budget is kept per.
enum class budget_scope {
  overall,   // one spend for every call
  tenant,    // per call_context::tenant (route_constraints::tenant in the router)
  provider,  // per provider (the stage's provider, the model's in the router)
};

struct spend_budget_options {
  std::string name = "budget";  // in refusals, events and metrics
  double limit = 0;             // USD per window, for every key unless limit_of gives one
  // A key's limit, asked when the key is first seen (under the budget's lock: keep it cheap).
  std::function<double(std::string_view key)> limit_of{};
  budget_window window = budget_window::daily();
  budget_scope per = budget_scope::overall;
  // Fractions of the limit at which a budget_alert is sent to `watch`, once per window each.
  std::vector<double> alert_at{0.5, 0.8, 1.0};
  observer watch{};
};

// One key's spend, for dashboards and the Prometheus output.
struct budget_status {
  std::string budget;
  std::string key;
  double spent = 0;     // USD settled in the current window
  double reserved = 0;  // USD held by calls in flight
  double limit = 0;
  std::chrono::nanoseconds resets_in{0};  // until the window starts again (rolling: until the
                                          // oldest spend in it leaves)
};

template <class Clock>
class spend_budget_stage;

namespace detail {
// The calendar window (hour, day or month, UTC) holding `unix_ns`: its number and when the next
// one starts (Unix ns).
inline std::pair<std::int64_t, std::int64_t> calendar_window(const budget_window& w,
                                                             std::int64_t unix_ns) {
  constexpr std::int64_t hour = 3'600'000'000'000;
  constexpr std::int64_t day = 24 * hour;
  const auto floor_div = [](std::int64_t a, std::int64_t b) { return a / b - (a % b < 0 ? 1 : 0); };
  switch (w.type()) {
    case budget_window::kind::hour:
      return {floor_div(unix_ns, hour), (floor_div(unix_ns, hour) + 1) * hour};
    case budget_window::kind::day:
      return {floor_div(unix_ns, day), (floor_div(unix_ns, day) + 1) * day};
    default: break;
  }
  using namespace std::chrono;
  const year_month_day date{sys_days{days{floor_div(unix_ns, day)}}};
  const auto next = year_month{date.year(), date.month()} + months{1};
  const auto next_start = sys_days{next / 1}.time_since_epoch().count() * day;
  return {static_cast<int>(date.year()) * 12 + static_cast<unsigned>(date.month()) - 1, next_start};
}

// Offset from `Clock`'s epoch to the Unix epoch: a steady clock counts from boot, so calendar
// windows need the wall clock's; any other clock's epoch is taken as Unix time.
template <class Clock>
std::int64_t calendar_offset() {
  if constexpr (std::is_same_v<Clock, std::chrono::steady_clock>)
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch())
               .count() -
           std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
               .count();
  else
    return 0;
}

// The refusal of a reservation that does not fit: which budget and key, the money, and when it
// fits again (`when`: nullopt when the amount is more than the limit, or fits only once calls in
// flight settle).
inline weir::exception over_budget(std::string_view budget, std::string_view key, double usd,
                                   double spent, double reserved, double limit,
                                   std::optional<std::chrono::nanoseconds> when) {
  const auto next =
      when ? fmt::format("room again in {:.0f} s", std::chrono::duration<double>(*when).count())
      : usd > limit ? std::string("it never fits")
                    : std::string("no room before calls in flight settle");
  return weir::exception::refusal(
      error::over_budget,
      fmt::format("{}{}{}: ${:.4f} would pass the limit (${:.4f} spent and ${:.4f} in flight of "
                  "${:.2f}); {}",
                  budget, key.empty() ? "" : " for ", key, usd, spent, reserved, limit, next),
      when);
}

// The key a budget of `scope` charges a call under.
inline std::string_view budget_key(budget_scope scope, std::string_view tenant,
                                   std::string_view provider) noexcept {
  switch (scope) {
    case budget_scope::tenant: return tenant;
    case budget_scope::provider: return provider;
    case budget_scope::overall: break;
  }
  return {};
}

// How money held for a call ends: the one rule of the budget stages and the router. A call never
// sent gives it back; one that ended is charged what it reported at its prices, else its estimate
// at the list price when it may have produced tokens (it succeeded, or was cancelled once sent),
// else nothing (a failure that reports no usage was not billed).
struct spend_ending {
  bool sent = true;
  std::optional<double> reported_cost{};
  bool maybe_billed = false;
  double estimated_cost = 0;
};
template <class Reservation>
void settle_spend(Reservation& held, const spend_ending& e) {
  if (!e.sent)
    held.release();
  else
    held.settle(e.reported_cost ? *e.reported_cost : e.maybe_billed ? e.estimated_cost : 0.0);
}

// What a budget's stages share (the local one reserves on entry, the Redis one waits for its
// round trip): the reservation a call holds and how it ends, by settle_spend's rule. One unwound
// with no outcome (cancelled further out) is charged its estimate, since it may have been sent.
template <class Budget>
class budget_stage_base {
 public:
  using clock_type = typename Budget::clock_type;

  budget_stage_base(Budget budget, weir::price p, std::string provider)
      : budget_(std::move(budget)), price_(p), provider_(std::move(provider)) {}

  std::string_view name() const noexcept { return budget_.name(); }

  struct slot {
    std::optional<typename Budget::reservation> held;
  };
  static constexpr bool reads_verdict = true;

  template <class Outcome>
  stage_action exit(slot& s, stage_context<clock_type>& context, const Outcome& result) {
    auto held = std::exchange(s.held, std::nullopt);
    if (!held) return {};
    const auto& call = context.call;
    settle_spend(*held, {.sent = !result.refused_locally(),
                         .reported_cost =
                             call.reported_usage() ? std::optional(cost_of(call)) : std::nullopt,
                         .maybe_billed = context.judged == verdict::success || result.cancelled() ||
                                         call.cut_by_deadline(result),
                         .estimated_cost = price_.of(call.estimated_usage())});
    return {};
  }

  void abandon(slot& s) { s.held.reset(); }

 protected:
  std::string_view key_of(const basic_call_context<clock_type>& call) const noexcept {
    return budget_key(budget_.scope(), call.tenant, provider_);
  }
  // The most the call can cost (see price::most_for), so that calls in flight never pass it.
  double estimate_of(const basic_call_context<clock_type>& call) const noexcept {
    const auto u = call.estimated_usage();
    if (u.input_tokens || u.output_tokens) return price_.most_for(u.input_tokens, u.output_tokens);
    return std::max(price_.of(u), price_.most_for(u.tokens, 0));
  }
  // What the call really cost: its cache reads and writes, when it reported them, at their rates.
  double cost_of(const basic_call_context<clock_type>& call) const noexcept {
    const auto used = call.actual_usage(call.estimated_usage());
    if (!call.actual_cache_read_tokens && !call.actual_cache_write_tokens) return price_.of(used);
    return price_.of(token_usage{.input_tokens = used.input_tokens,
                                 .output_tokens = used.output_tokens,
                                 .cache_read_tokens = call.actual_cache_read_tokens.value_or(0),
                                 .cache_write_tokens = call.actual_cache_write_tokens.value_or(0)});
  }

  Budget budget_;
  weir::price price_;
  std::string provider_;
};

// Checks what every spend budget's options must satisfy.
inline void validate(const spend_budget_options& o) {
  if (!(o.limit >= 0) || !std::isfinite(o.limit))
    invalid_option(o.name, "limit", o.limit, "be a finite amount ≥ 0");
  if (o.window.type() == budget_window::kind::rolling &&
      o.window.length() < std::chrono::nanoseconds(60))
    invalid_option(o.name, "window", o.window.length(), "be at least 60 ns long");
  if (o.alert_at.size() > 32)
    invalid_option(o.name, "alert_at", o.alert_at.size(), "hold at most 32");
  for (double t : o.alert_at)
    if (!(t > 0) || !std::isfinite(t))
      invalid_option(o.name, "alert_at", t, "hold positive fractions");
}
}  // namespace detail

// Copies share the spend. Thread-safe: one mutex, held for a few arithmetic operations.
template <class Clock = std::chrono::steady_clock>
class spend_budget {
  struct state;
  struct account;

 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;

  // Throws weir::exception(invalid_argument) for a negative or non-finite limit, a rolling
  // window shorter than 60 ns, or an alert threshold that is not a positive fraction.
  explicit spend_budget(spend_budget_options options)
      : state_(std::make_shared<state>(std::move(options))) {}

  // Money held for one call until it settles. Destroyed unsettled (the call's outcome is
  // unknown: it may have been sent), it charges the whole estimate.
  class reservation {
   public:
    reservation() = default;
    reservation(reservation&& o) noexcept
        : state_(std::move(o.state_)), account_(o.account_), amount_(o.amount_) {}
    reservation& operator=(reservation&& o) noexcept {
      if (this != &o) {
        finish(amount_);
        state_ = std::move(o.state_);
        account_ = o.account_;
        amount_ = o.amount_;
      }
      return *this;
    }
    ~reservation() { finish(amount_); }

    double amount() const noexcept { return amount_; }
    explicit operator bool() const noexcept { return state_ != nullptr; }

    // The call cost `actual` USD (more or less than reserved).
    void settle(double actual) { finish(actual); }
    // The call was never sent: nothing is spent.
    void release() { finish(0); }

   private:
    friend class spend_budget;
    reservation(std::shared_ptr<state> s, account* a, double amount)
        : state_(std::move(s)), account_(a), amount_(amount) {}
    void finish(double spent) {
      if (auto s = std::move(state_)) s->settle(*account_, amount_, spent, Clock::now());
    }

    std::shared_ptr<state> state_;
    account* account_ = nullptr;
    double amount_ = 0;
  };

  // Holds `usd` of `key`'s budget if it fits now; nullopt if it would pass the limit.
  std::optional<reservation> try_reserve(std::string_view key, double usd,
                                         time_point now = Clock::now()) {
    if (auto* a = state_->try_reserve(key, usd, now)) return reservation(state_, a, usd);
    return std::nullopt;
  }

  // The same, or a local refusal: weir::exception(over_budget) naming the budget, the key, the
  // spend and the limit, with retry_after set to when the estimate fits again (none when it
  // never can: it is more than the whole limit).
  reservation reserve(std::string_view key, double usd, time_point now = Clock::now()) {
    if (auto r = try_reserve(key, usd, now)) return std::move(*r);
    state_->refuse(key, usd, now);
  }

  // Whether `usd` would fit now, reserving nothing.
  bool fits(std::string_view key, double usd, time_point now = Clock::now()) const {
    return state_->fits(key, usd, now);
  }
  // How long until `usd` fits (zero if now; nullopt if never, or not before calls in flight
  // settle).
  std::optional<std::chrono::nanoseconds> room_in(std::string_view key, double usd,
                                                  time_point now = Clock::now()) const {
    return state_->room_in(key, usd, now);
  }

  // Every key seen, with its spend in the current window.
  std::vector<budget_status> status(time_point now = Clock::now()) const {
    return state_->status(now);
  }

  const std::string& name() const noexcept { return state_->options.name; }
  budget_scope scope() const noexcept { return state_->options.per; }

  // The key a call is charged under: its tenant, the given provider, or none.
  std::string_view key_for(std::string_view tenant, std::string_view provider) const noexcept {
    return detail::budget_key(scope(), tenant, provider);
  }

  // The budget as a pipeline stage for calls priced at `p` (and, for a per-provider budget,
  // charged to `provider`).
  spend_budget_stage<Clock> stage(weir::price p, std::string provider = {}) const {
    return spend_budget_stage<Clock>(*this, p, std::move(provider));
  }

 private:
  static constexpr std::size_t rolling_slots = 60;
  // A sixtieth is counted until its number is this far behind the current one.
  static constexpr std::int64_t rolling_span = rolling_slots + 1;
  using nanos = std::int64_t;

  struct account {
    double limit = 0;
    double spent = 0;
    double reserved = 0;
    std::int64_t window = std::numeric_limits<std::int64_t>::min();  // calendar window number
    std::uint32_t alerted = 0;  // bit i: alert_at[i] sent in this window
    // Rolling windows: the spend settled in each sixtieth, by the sixtieth's number.
    std::vector<std::pair<std::int64_t, double>> slots{};
  };

  struct state {
    explicit state(spend_budget_options o)
        : options(std::move(o)), calendar_offset(detail::calendar_offset<Clock>()) {
      detail::validate(options);
    }

    nanos unix_ns(time_point t) const {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count() +
             calendar_offset;
    }
    nanos slot_length() const { return options.window.length().count() / rolling_slots; }

    std::pair<std::int64_t, nanos> calendar(nanos t) const {
      return detail::calendar_window(options.window, t);
    }

    // Brings `a` to the window holding `now`: a new calendar window starts from zero; a rolling
    // one forgets what left it. Alerts above the spend are armed again.
    void roll(account& a, time_point now) const {
      const auto t = unix_ns(now);
      if (options.window.type() == budget_window::kind::rolling) {
        const auto current = t / slot_length();
        a.spent = 0;
        for (auto& [number, amount] : a.slots)
          if (number > current - rolling_span) a.spent += amount;
      } else if (const auto w = calendar(t).first; w != a.window) {
        a.window = w;
        a.spent = 0;
      }
      for (std::size_t i = 0; i < options.alert_at.size(); ++i)
        if (a.spent < options.alert_at[i] * a.limit) a.alerted &= ~(1u << i);
    }

    account& account_for(std::string_view key) {
      if (auto it = accounts.find(key); it != accounts.end()) return it->second;
      double limit = options.limit;
      if (options.limit_of) {
        limit = options.limit_of(key);
        if (!(limit >= 0) || !std::isfinite(limit))
          detail::invalid_option(options.name, "limit_of", limit, "give a finite amount ≥ 0");
      }
      auto& a = accounts[std::string(key)];
      a.limit = limit;
      if (options.window.type() == budget_window::kind::rolling)
        a.slots.assign(rolling_span, {std::numeric_limits<std::int64_t>::min() / 2, 0});
      return a;
    }

    static bool fits(const account& a, double usd) {
      return a.spent + a.reserved + usd <= a.limit * (1 + 1e-12);
    }

    account* try_reserve(std::string_view key, double usd, time_point now) {
      if (!(usd >= 0) || !std::isfinite(usd))
        detail::invalid_option(options.name, "reserved cost", usd, "be a finite amount ≥ 0");
      std::lock_guard lock(mutex);
      auto& a = account_for(key);
      roll(a, now);
      if (!fits(a, usd)) return nullptr;
      a.reserved += usd;
      return &a;
    }

    bool fits(std::string_view key, double usd, time_point now) {
      std::lock_guard lock(mutex);
      auto& a = account_for(key);
      roll(a, now);
      return fits(a, usd);
    }

    std::optional<std::chrono::nanoseconds> room_in(std::string_view key, double usd,
                                                    time_point now) {
      std::lock_guard lock(mutex);
      auto& a = account_for(key);
      roll(a, now);
      return room_in(a, usd, now);
    }

    // Under the lock, `a` rolled to now.
    std::optional<std::chrono::nanoseconds> room_in(const account& a, double usd,
                                                    time_point now) const {
      if (fits(a, usd)) return std::chrono::nanoseconds(0);
      if (usd > a.limit || a.reserved + usd > a.limit) return std::nullopt;
      const auto t = unix_ns(now);
      if (options.window.type() != budget_window::kind::rolling)
        return std::chrono::nanoseconds(calendar(t).second - t);
      // The oldest sixtieths leave first: when enough have left for `usd` to fit.
      auto slots = a.slots;
      std::sort(slots.begin(), slots.end());
      const auto current = t / slot_length();
      double over = a.spent + a.reserved + usd - a.limit;
      for (const auto& [number, amount] : slots) {
        if (number <= current - rolling_span || amount == 0) continue;
        over -= amount;
        if (over <= 1e-12 * a.limit)
          return std::chrono::nanoseconds((number + rolling_span) * slot_length() - t);
      }
      return std::nullopt;
    }

    [[noreturn]] void refuse(std::string_view key, double usd, time_point now) {
      std::unique_lock lock(mutex);
      auto& a = account_for(key);
      roll(a, now);
      const auto when = room_in(a, usd, now);
      const auto refusal =
          detail::over_budget(options.name, key, usd, a.spent, a.reserved, a.limit, when);
      lock.unlock();
      throw refusal;
    }

    void settle(account& a, double reserved, double spent, time_point now) {
      std::vector<budget_alert> alerts;
      std::string key;
      {
        std::lock_guard lock(mutex);
        a.reserved = std::max(0.0, a.reserved - reserved);
        roll(a, now);
        if (spent > 0) {
          a.spent += spent;
          if (options.window.type() == budget_window::kind::rolling) {
            const auto current = unix_ns(now) / slot_length();
            auto& slot = a.slots[static_cast<std::size_t>(current % rolling_span)];
            if (slot.first != current) slot = {current, 0};
            slot.second += spent;
          }
        }
        for (std::size_t i = 0; i < options.alert_at.size(); ++i)
          if (!(a.alerted & (1u << i)) && a.spent >= options.alert_at[i] * a.limit && a.limit > 0) {
            a.alerted |= 1u << i;
            alerts.push_back({.operation = {},
                              .budget = options.name,
                              .key = {},
                              .threshold = options.alert_at[i],
                              .spent = a.spent,
                              .limit = a.limit});
          }
        if (!alerts.empty() && options.watch)
          for (const auto& [k, v] : accounts)
            if (&v == &a) key = k;
      }
      if (options.watch)
        for (auto& alert : alerts) {
          alert.key = key;
          options.watch(alert);
        }
    }

    std::vector<budget_status> status(time_point now) {
      std::lock_guard lock(mutex);
      std::vector<budget_status> out;
      const auto t = unix_ns(now);
      for (auto& [key, a] : accounts) {
        roll(a, now);
        std::chrono::nanoseconds resets_in{0};
        if (options.window.type() != budget_window::kind::rolling) {
          resets_in = std::chrono::nanoseconds(calendar(t).second - t);
        } else {
          const auto current = t / slot_length();
          auto oldest = current;
          for (const auto& [number, amount] : a.slots)
            if (amount > 0 && number > current - rolling_span) oldest = std::min(oldest, number);
          if (a.spent > 0)
            resets_in = std::chrono::nanoseconds((oldest + rolling_span) * slot_length() - t);
        }
        out.push_back({options.name, key, a.spent, a.reserved, a.limit, resets_in});
      }
      std::sort(out.begin(), out.end(),
                [](const budget_status& x, const budget_status& y) { return x.key < y.key; });
      return out;
    }

    struct transparent_hash : std::hash<std::string_view> {
      using is_transparent = void;
    };

    const spend_budget_options options;
    nanos calendar_offset = 0;
    std::mutex mutex;
    // Node-based: a reservation points at its account, which never moves.
    std::unordered_map<std::string, account, transparent_hash, std::equal_to<>> accounts;
  };

  std::shared_ptr<state> state_;
};

// A spend budget in a pipeline: reserves the call's estimated cost at `price` on entry (see
// detail::budget_stage_base for how the call settles).
template <class Clock>
class spend_budget_stage : public detail::budget_stage_base<spend_budget<Clock>> {
  using base = detail::budget_stage_base<spend_budget<Clock>>;

 public:
  using base::base;
  static constexpr bool reads_clock = true;

  bool try_enter(typename base::slot& s, stage_context<Clock>& context) {
    s.held.emplace(this->budget_.reserve(this->key_of(context.call),
                                         this->estimate_of(context.call), context.now));
    return true;
  }
};

// Appends the budgets' spend to `out` in the Prometheus text format: spent, reserved and limit
// in USD, one sample per budget and key (the key label is empty for an overall budget).
inline void write_prometheus(std::string& out, const std::vector<budget_status>& budgets) {
  struct family {
    const char* name;
    const char* help;
    double budget_status::*value;
  };
  static constexpr family families[] = {
      {"weir_budget_spent_usd", "USD settled in the budget's current window.",
       &budget_status::spent},
      {"weir_budget_reserved_usd", "USD held by calls in flight.", &budget_status::reserved},
      {"weir_budget_limit_usd", "The budget's limit per window.", &budget_status::limit},
  };
  for (const auto& f : families) {
    fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} gauge\n", f.name, f.help,
                   f.name);
    for (const auto& b : budgets)
      fmt::format_to(std::back_inserter(out), "{}{{budget=\"{}\",key=\"{}\"}} {}\n", f.name,
                     detail::prometheus_label(b.budget), detail::prometheus_label(b.key),
                     b.*f.value);
  }
}

}  // namespace weir
