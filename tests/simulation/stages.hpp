// Every stage in the library under one seeded scenario (issue 30, item 4), on virtual time.
//
// Included by simulation.cpp after its helpers, outside its anonymous namespace (as pacing.hpp,
// for g++ 12's coroutine frames). One seed decides a pipeline order (three shapes), which stages
// are present in it (an absent one passes every call through), their settings, whether calls
// return whole responses or streams, the callers (tenants, priorities, deadlines, arrivals,
// cancellations), what each attempt and each stream does, and how each stream is read (to the
// end, closed early, dropped, a read cancelled).
//
// Each stage sits inside a watcher (`watched`), a stage of the simulation's own that forwards to
// it and sees every entry, wait, refusal, exit and abandon; the watchers keep their own books
// and check, for every seed:
//   - every stage a call entered is left exactly once (exit or abandon), by quiescence;
//   - keyed limits: per key, admissions over any window stay within rate × window + burst, with
//     each key's own limit; a key's first call is admitted at once, whatever other keys did;
//   - spend budgets: at every admission, the spend of the window plus the estimates in flight
//     stay within the limit, and after every settlement the spend stays within the limit plus
//     what calls cost above their estimates; a refusal only when the estimate does not fit; at
//     quiescence nothing is left reserved and the budget's spend is the books' (every
//     reservation settled or released once, by the documented rule);
//   - the fair queue: never more in flight than max_concurrent; while a tenant waits at a
//     priority, the other tenants are admitted at most (the sum of their weights + the slots)
//     times at that priority before it is (no tenant starves);
//   - hedging: at most 1 + max_hedges attempts per call through it, no more hedges running
//     than max_in_flight, and when the call returns every attempt has left its stages (losers
//     cancelled and settled), none running at quiescence;
//   - fallback: its handler sees only failures it is told to handle, never a cancellation;
//     outermost, no call ends with a failure it handles;
//   - streams: settled exactly once, at the moment the stream ends (read to the end, broken,
//     closed early, dropped or a read cancelled);
//   - adaptive concurrency: the limit within [min_limit, max_limit], and in flight never grows
//     while above the limit in force;
//   - every call ends exactly once, as the main scenario's; nothing pending at quiescence.
#pragma once

#include <weir/composition/stream.hpp>
#include <weir/failure/fallback.hpp>
#include <weir/failure/hedging.hpp>
#include <weir/throttling/adaptive_concurrency.hpp>
#include <weir/throttling/keyed_limiter.hpp>
#include <weir/throttling/spend_budget.hpp>

#include <set>

namespace stages {

using stream_type = weir::basic_stream<int, sim_clock>;
using stage_env = weir::stage_context<sim_clock>;

// Values as sim_classifier judges them (-429, -503 fail); streams as the default does.
struct stage_classifier {
  template <class T>
  weir::classification operator()(const weir::outcome<T>& o) const {
    if constexpr (std::is_same_v<T, int>)
      return sim_classifier{}(o);
    else
      return weir::default_classifier{}(o);
  }
};

// Which call a stage sees (read from its context, kept in the slot for abandon).
struct visit {
  std::size_t call = 0;
  std::string_view tenant;
  weir::priority priority = weir::priority::normal;
  weir::usage estimate{};
};

// How a call left a stage.
struct ending {
  bool abandoned = false;
  bool refused_locally = false;
  bool cancelled = false;
  weir::verdict judged = weir::verdict::success;
  bool delivered = false;  // a stream settling at its end
  bool cut_short = false;  // by the call's own deadline, once sent
};

// The books one watcher keeps, and what it checks. A violation is kept (the first one), not
// thrown: hooks run inside the pipeline, in destructors and in stream settlers.
class checks {
 public:
  checks(std::string who, std::size_t calls) : who(std::move(who)), per_call(calls) {}
  virtual ~checks() = default;

  virtual void declined(const visit&) {}
  virtual void waiting(const visit&) {}
  virtual void stopped_waiting(const visit&) {}
  virtual void admitted(const visit&, bool /*waited*/) {}
  virtual void refused(const visit&, const std::exception_ptr&) {}
  virtual void left(const visit&, const ending&, const context* /*null: abandoned*/) {}
  virtual void after() {}  // after every hook
  virtual void at_quiescence() {}

  template <class... Args>
  void complain(fmt::format_string<Args...> f, Args&&... args) {
    if (!broken)
      broken = fmt::format("{} at +{:.3f} s: {}", who, seconds_now(),
                           fmt::format(f, std::forward<Args>(args)...));
  }
  static double seconds_now() {
    return std::chrono::duration<double>(sim_clock::now() - sim_clock::start_time).count();
  }

  struct tally {
    int entered = 0;
    int inside = 0;
    int delivered = 0;  // left at a stream's end
  };
  const std::string who;
  std::vector<tally> per_call;
  std::optional<std::string> broken;
};

// A stage that is there only to be watched.
struct nothing {
  struct slot {};
  bool try_enter(slot&, stage_env&) { return true; }
  template <class Outcome>
  weir::stage_action exit(slot&, stage_env&, const Outcome&) {
    return {};
  }
};

// `Inner` with its checks around every hook; when it is absent, calls pass straight through
// (and its checks see nothing).
template <class Inner>
class watched {
 public:
  using clock_type = sim_clock;

  watched(std::optional<Inner> inner, std::shared_ptr<checks> c)
      : inner_(std::move(inner)), checks_(std::move(c)) {}

  std::string_view name() const noexcept { return checks_->who; }

  struct slot {
    typename Inner::slot inner{};
    visit v{};
    bool in = false;
  };
  static constexpr bool reads_clock = true;
  static constexpr bool reads_verdict = true;

  bool try_enter(slot& s, stage_env& c) {
    if (!inner_) return true;
    s.v = visit_of(c.call);
    bool ok = true;
    {
      try {
        ok = inner_->try_enter(s.inner, c);
      } catch (...) {
        checks_->refused(s.v, std::current_exception());
        checks_->after();
        throw;
      }
    }
    if (ok)
      enter(s, false);
    else
      checks_->declined(s.v);
    checks_->after();
    return ok;
  }

  asio::awaitable<void> wait_enter(slot& s, stage_env& c) {
    if constexpr (requires { inner_->wait_enter(s.inner, c); }) {
      checks_->waiting(s.v);
      still_waiting guard{checks_, s.v};
      co_await inner_->wait_enter(s.inner, c);
      guard.over();
      enter(s, true);
      checks_->after();
    } else {
      throw std::logic_error("a stage without wait_enter declined");
    }
  }

  template <class Outcome>
  weir::stage_action exit(slot& s, stage_env& c, const Outcome& o) {
    if (!inner_) return {};
    auto action = inner_->exit(s.inner, c, o);
    leave(s,
          {false, o.refused_locally(), o.cancelled(), c.judged, c.delivered,
           c.call.cut_by_deadline(o)},
          &c.call);
    checks_->after();
    return action;
  }

  void abandon(slot& s) {
    if (!inner_) return;
    if constexpr (requires { inner_->abandon(s.inner); }) inner_->abandon(s.inner);
    leave(s, {.abandoned = true}, nullptr);
    checks_->after();
  }

 private:
  // Leaves the books as the call stops waiting, however it stops (the frame may be destroyed).
  struct still_waiting {
    std::shared_ptr<checks> c;
    visit v;
    bool done = false;
    void over() {
      done = true;
      c->stopped_waiting(v);
    }
    ~still_waiting() {
      if (!done) c->stopped_waiting(v);
    }
  };

  static visit visit_of(const context& call) {
    // Calls are named "call N": the index survives the copy a stream's settler makes.
    std::size_t i = 0;
    const auto name = call.operation;
    std::from_chars(name.data() + 5, name.data() + name.size(), i);
    return {i, call.tenant, call.priority, call.estimated_usage()};
  }

  void enter(slot& s, bool waited) {
    s.in = true;
    auto& t = checks_->per_call[s.v.call];
    ++t.entered;
    ++t.inside;
    checks_->admitted(s.v, waited);
  }

  void leave(slot& s, const ending& e, const context* call) {
    if (!std::exchange(s.in, false)) {
      checks_->complain("call {} left a stage it had not entered", s.v.call);
      return;
    }
    auto& t = checks_->per_call[s.v.call];
    --t.inside;
    if (e.delivered) ++t.delivered;
    checks_->left(s.v, e, call);
  }

  std::optional<Inner> inner_;
  std::shared_ptr<checks> checks_;
};

const char* const tenant_names[] = {"tenant-a", "tenant-b", "tenant-c", "tenant-d"};

// Keyed limits: per key, admissions within rate × window + burst; a new key admits at once.
class keyed_checks final : public checks {
 public:
  using limiter_type = weir::keyed_limiter<sim_clock>;
  struct shape {
    ns interval;
    std::uint64_t burst;
  };

  keyed_checks(asio::io_context& io, std::mt19937_64& rng, std::size_t calls, int tenants)
      : checks("keyed_limiter", calls),
        limits_(make_limits(rng, tenants)),
        limiter(io.get_executor(), {.limit_of = [limits = limits_](std::string_view key) {
                  const auto& s = limits.at(std::string(key));
                  return weir::key_limit{
                      weir::per_second(1e9 / static_cast<double>(s.interval.count())), s.burst};
                }}) {}

  void declined(const visit& v) override {
    if (tried_.insert(std::string(v.tenant)).second)
      complain("the first call of {} had to wait", v.tenant);
  }
  void admitted(const visit& v, bool) override {
    tried_.insert(std::string(v.tenant));
    log_[std::string(v.tenant)].push_back(sim_clock::now());
  }

  void at_quiescence() override {
    for (const auto& [key, times] : log_) {
      const auto& s = limits_.at(key);
      for (const ns window : {s.interval, ns(1s), ns(5s), ns(60s)}) {
        const auto allowed = static_cast<std::size_t>(window / s.interval) + s.burst;
        std::size_t j = 0;
        for (std::size_t i = 0; i < times.size(); ++i) {
          while (j < times.size() && times[j] < times[i] + window) ++j;
          if (j - i > allowed)
            return complain("{} was admitted {} times in {} ns from +{:.3f} s, more than {} allow",
                            key, j - i, window.count(),
                            std::chrono::duration<double>(times[i] - sim_clock::start_time).count(),
                            allowed);
        }
      }
    }
  }

 private:
  static std::map<std::string, shape> make_limits(std::mt19937_64& rng, int tenants) {
    std::map<std::string, shape> m;
    for (int t = 0; t < tenants; ++t)
      m[tenant_names[t]] = {ns(1s) / pick(rng, 1, 20), pick<std::uint64_t>(rng, 1, 4)};
    return m;
  }

  std::map<std::string, shape> limits_;
  std::set<std::string, std::less<>> tried_;
  std::map<std::string, std::vector<sim_clock::time_point>> log_;

 public:
  limiter_type limiter;
};

// Spend budgets: books of their own, by the documented rule of how a reservation ends.
class budget_checks final : public checks {
 public:
  budget_checks(std::mt19937_64& rng, std::size_t calls)
      : checks("spend_budget", calls),
        price{static_cast<double>(pick(rng, 1, 10)), static_cast<double>(pick(rng, 1, 30))},
        window_(chance(rng, 0.5) ? weir::budget_window::hourly() : weir::budget_window::daily()),
        scope_(chance(rng, 0.5) ? weir::budget_scope::tenant : weir::budget_scope::overall),
        limit_(static_cast<double>(pick(rng, 1, 100)) / 1000),
        budget({.name = "budget", .limit = limit_, .window = window_, .per = scope_}) {}

  void admitted(const visit& v, bool) override {
    auto& a = accounts_[key(v)];
    a.in_flight += price.of(v.estimate);
    const auto spent = spent_now(a);
    if (spent + a.in_flight > limit_ * (1 + 1e-9) + 1e-12)
      complain("admitted call {}: ${:.6f} spent and ${:.6f} in flight pass the limit ${:.6f}",
               v.call, spent, a.in_flight, limit_);
  }
  void refused(const visit& v, const std::exception_ptr& e) override {
    if (describe(e) != fmt::format("weir {}", static_cast<int>(weir::error::over_budget)))
      return complain("call {} refused with {}", v.call, describe(e));
    auto& a = accounts_[key(v)];
    const auto usd = price.of(v.estimate);
    if (spent_now(a) + a.in_flight + usd <= limit_ * (1 - 1e-9) - 1e-12)
      complain("refused call {} (${:.6f}) with ${:.6f} spent and ${:.6f} in flight of ${:.6f}",
               v.call, usd, spent_now(a), a.in_flight, limit_);
  }
  void left(const visit& v, const ending& e, const context* call) override {
    auto& a = accounts_[key(v)];
    const auto estimate = price.of(v.estimate);
    a.in_flight -= estimate;
    // How a reservation ends (detail::budget_stage_base): released if refused before it was
    // sent; the actual tokens when told; else the estimate on success, cancellation or a cut by
    // the call's deadline (or with no outcome at all), nothing on a failure.
    double amount = estimate;
    if (e.abandoned)
      amount = estimate;
    else if (e.refused_locally)
      amount = 0;
    else if (call->actual_tokens || call->actual_input_tokens || call->actual_output_tokens)
      amount = price.of(call->actual_usage(call->estimated_usage()));
    else if (e.judged != weir::verdict::success && !e.cancelled && !e.cut_short)
      amount = 0;
    const auto w = window_at(sim_clock::now());
    a.settled.push_back({w, amount, std::max(0.0, amount - estimate)});
    double spent = 0, above = 0;
    for (const auto& s : a.settled)
      if (s.window == w) spent += s.usd, above += s.above_estimate;
    if (spent > limit_ * (1 + 1e-9) + above + 1e-12)
      complain(
          "${:.6f} spent in the window, past the limit ${:.6f} plus ${:.6f} spent above "
          "estimates",
          spent, limit_, above);
  }

  void at_quiescence() override {
    for (const auto& [k, a] : accounts_)
      if (std::abs(a.in_flight) > 1e-9) complain("the books hold ${:.9f} in flight", a.in_flight);
    for (const auto& s : budget.status()) {
      if (s.reserved > 1e-9) complain("{} left ${:.9f} reserved at quiescence", s.key, s.reserved);
      const auto it = accounts_.find(s.key);
      const double books = it == accounts_.end() ? 0.0 : spent_now(it->second);
      if (std::abs(s.spent - books) > 1e-9 * std::max(1.0, books))
        complain("{} spent ${:.9f}, the books say ${:.9f}", s.key, s.spent, books);
    }
  }

  const weir::price price;

 private:
  struct settlement {
    std::int64_t window;
    double usd;
    double above_estimate;
  };
  struct account {
    double in_flight = 0;
    std::vector<settlement> settled;
  };

  std::string key(const visit& v) const {
    return std::string(weir::detail::budget_key(scope_, v.tenant, {}));
  }
  std::int64_t window_at(sim_clock::time_point t) const {
    return weir::detail::calendar_window(window_, ns(t.time_since_epoch()).count()).first;
  }
  double spent_now(const account& a) const {
    const auto w = window_at(sim_clock::now());
    double spent = 0;
    for (const auto& s : a.settled)
      if (s.window == w) spent += s.usd;
    return spent;
  }

  weir::budget_window window_;
  weir::budget_scope scope_;
  double limit_;
  std::map<std::string, account, std::less<>> accounts_;

 public:
  weir::spend_budget<sim_clock> budget;
};

// The fair queue: in flight within max_concurrent; no tenant starves behind others.
class queue_checks final : public checks {
 public:
  queue_checks(asio::io_context& io, std::mt19937_64& rng, std::size_t calls, int tenants)
      : checks("fair queue", calls),
        max_concurrent_(pick<std::size_t>(rng, 1, 4)),
        weights_(make_weights(rng, tenants)),
        queue(io.get_executor(),
              {.max_concurrent = max_concurrent_,
               .max_queued = pick<std::size_t>(rng, 1, 30),
               .fair_between_tenants = true,
               .weight_of =
                   [w = weights_](std::string_view t) {
                     const auto it = w.find(std::string(t));
                     return it == w.end() ? 1.0 : it->second;  // "" when the queue is not fair
                   },
               .evict_lower_priority = chance(rng, 0.3)}) {}

  void waiting(const visit& v) override {
    auto& w = waits_[{v.priority, std::string(v.tenant)}];
    if (w.count++ == 0) w.others = 0;
  }
  void stopped_waiting(const visit& v) override {
    --waits_[{v.priority, std::string(v.tenant)}].count;
  }
  void admitted(const visit& v, bool waited) override {
    if (!waited) return;  // a free slot with nobody waiting
    for (auto& [k, w] : waits_) {
      if (k.first != v.priority || k.second == v.tenant || w.count == 0) continue;
      if (++w.others > bound(k.second))
        complain("{} waits at priority {} while others were admitted {} times, more than {}",
                 k.second, static_cast<int>(k.first), w.others, bound(k.second));
    }
    waits_[{v.priority, std::string(v.tenant)}].others = 0;
  }
  void after() override {
    if (queue.in_flight() > max_concurrent_)
      complain("{} in flight, more than max_concurrent = {}", queue.in_flight(), max_concurrent_);
  }
  void at_quiescence() override {
    if (queue.in_flight() != 0 || queue.queued() != 0)
      complain("{} in flight and {} queued at quiescence", queue.in_flight(), queue.queued());
  }

 private:
  static std::map<std::string, double> make_weights(std::mt19937_64& rng, int tenants) {
    std::map<std::string, double> m;
    for (int t = 0; t < tenants; ++t) m[tenant_names[t]] = static_cast<double>(pick(rng, 1, 3));
    return m;
  }
  // Deficit round robin with whole weights: before a waiting tenant's turn, each other tenant
  // takes at most its weight; admissions already handed out (not yet resumed) add the slots.
  std::size_t bound(const std::string& tenant) const {
    double others = 0;
    for (const auto& [t, w] : weights_)
      if (t != tenant) others += w;
    return static_cast<std::size_t>(others) + max_concurrent_;
  }

  struct wait {
    int count = 0;
    std::size_t others = 0;  // admissions of other tenants since this one last was
  };
  std::size_t max_concurrent_;
  std::map<std::string, double> weights_;
  std::map<std::pair<weir::priority, std::string>, wait> waits_;

 public:
  weir::request_queue queue;
};

// Adaptive concurrency: the limit within its bounds; in flight never grows above it.
class adaptive_checks final : public checks {
 public:
  adaptive_checks(asio::io_context& io, std::mt19937_64& rng, std::size_t calls)
      : checks("adaptive_concurrency", calls),
        options_(make_options(rng)),
        limit(io.get_executor(), options_) {}

  void after() override {
    const auto n = limit.in_flight(), l = limit.limit();
    if (l < options_.min_limit || l > options_.max_limit)
      complain("the limit {} is outside [{}, {}]", l, options_.min_limit, options_.max_limit);
    if (n > l && n > last_)
      complain("in flight grew from {} to {} above the limit {}", last_, n, l);
    last_ = n;
  }
  void at_quiescence() override {
    if (limit.in_flight() != 0 || limit.queued() != 0)
      complain("{} in flight and {} queued at quiescence", limit.in_flight(), limit.queued());
  }

 private:
  static weir::adaptive_concurrency_options make_options(std::mt19937_64& rng) {
    weir::adaptive_concurrency_options o;
    o.min_limit = pick<std::size_t>(rng, 1, 3);
    o.initial_limit = o.min_limit + pick<std::size_t>(rng, 0, 4);
    o.max_limit = o.initial_limit + pick<std::size_t>(rng, 0, 8);
    o.max_queued = pick<std::size_t>(rng, 1, 30);
    o.min_window = pick<std::size_t>(rng, 2, 6);
    o.probe_every = pick<std::size_t>(rng, 1, 4);
    o.fair_between_tenants = chance(rng, 0.5);
    o.slow_start = chance(rng, 0.5);
    return o;
  }

  weir::adaptive_concurrency_options options_;
  std::size_t last_ = 0;

 public:
  weir::adaptive_concurrency<sim_clock> limit;
};

// Hedging: the watcher inside the hedge counts its attempts per call.
class hedge_inner_checks final : public checks {
 public:
  using hedging_type = weir::hedging<sim_clock, stage_classifier>;

  hedge_inner_checks(std::mt19937_64& rng, std::size_t calls, const checks& outer)
      : checks("hedging (attempts)", calls), outer_(outer), hedge(make_options(rng)) {}

  void admitted(const visit& v, bool) override {
    const auto allowed =
        (1 + max_hedges_) * static_cast<std::size_t>(std::max(0, outer_.per_call[v.call].entered));
    if (static_cast<std::size_t>(per_call[v.call].entered) > allowed)
      complain("call {} made {} attempts through the hedge, more than {}", v.call,
               per_call[v.call].entered, allowed);
    if (hedge.hedges_in_flight() > max_in_flight_)
      complain("{} hedges run at once, more than max_in_flight = {}", hedge.hedges_in_flight(),
               max_in_flight_);
  }
  void at_quiescence() override {
    if (hedge.hedges_in_flight() != 0)
      complain("{} hedges still count as running at quiescence", hedge.hedges_in_flight());
  }

 private:
  hedging_type::options_type make_options(std::mt19937_64& rng) {
    hedging_type::options_type o;
    o.max_hedges = max_hedges_ = chance(rng, 0.3) ? 0 : pick<std::size_t>(rng, 1, 2);
    o.max_in_flight = max_in_flight_ = pick<std::size_t>(rng, 1, 4);
    o.delay = uniform(rng, 0s, 3s);
    if (chance(rng, 0.3)) {
      o.delay_percentile = 0.9;
      o.min_samples = pick<std::size_t>(rng, 1, 5);
    }
    if (chance(rng, 0.3)) o.budget.emplace(weir::retry_budget_options{.ratio = 0.2, .reserve = 2});
    return o;
  }

  const checks& outer_;
  std::size_t max_hedges_ = 0;
  std::size_t max_in_flight_ = 1;

 public:
  hedging_type hedge;
};

// ... and the watcher outside it sees every attempt gone when the call comes back.
class hedge_outer_checks final : public checks {
 public:
  explicit hedge_outer_checks(std::size_t calls) : checks("hedging", calls) {}
  void left(const visit& v, const ending&, const context*) override {
    if (inner && inner->per_call[v.call].inside != 0)
      complain("call {} came back from the hedge with {} attempts still holding their stages",
               v.call, inner->per_call[v.call].inside);
  }
  const checks* inner = nullptr;
};

// Fallback: the handler sees only failures it handles, and answers with a marker.
class fallback_checks final : public checks {
 public:
  fallback_checks(std::mt19937_64& rng, std::size_t calls) : checks("fallback", calls) {
    for (const auto kind : {weir::verdict::retryable, weir::verdict::rate_limited,
                            weir::verdict::fatal, weir::verdict::exhausted})
      if (chance(rng, 0.6)) handles.push_back(kind);
  }
  bool handled(const weir::classification& c) const {
    return std::find(handles.begin(), handles.end(), c.kind) != handles.end();
  }
  template <class T>
  void used(const weir::outcome<T>& failed) {
    ++uses;
    if (failed.cancelled()) return complain("the fallback replaced a cancellation");
    const auto c = stage_classifier{}(failed);
    if (!handled(c))
      complain("the fallback replaced a failure (verdict {}) it was not told to handle",
               static_cast<int>(c.kind));
  }
  std::vector<weir::verdict> handles;
  int uses = 0;
};

constexpr int fallback_value = 7777;

struct fallback_answer {
  std::shared_ptr<fallback_checks> checks;
  template <class T>
  T operator()(const weir::outcome<T>& failed) const {
    checks->used(failed);
    if constexpr (std::is_same_v<T, int>)
      return fallback_value;
    else
      return T{};  // an empty stream, ended
  }
};
using fallback_type = weir::fallback<fallback_answer, stage_classifier>;
using retry_stage_type = weir::retry<sim_clock, stage_classifier>;

// One call.
struct call {
  std::string name;  // "call N": the context's operation, which the watchers read
  context ctx;
  ns arrival{0};
  std::optional<ns> cancel_at;
  bool cancelled = false;
  int completions = 0;
  sim_clock::time_point ended{};
  std::string result;
  asio::cancellation_signal signal;
  // A stream it got, and how the caller reads it.
  bool got_stream = false;
  bool reading = false;
  int read_mode = 0;
  int read_chunks = 0;
  ns cancel_read_after{0};
};

// What one stream sends after its headers.
struct chunk_script {
  int left = 0;
  ns gap{0};
  int ending = 0;  // 0 the end, 1 a failure, 2 a hang
  int tokens = 1;
};

inline asio::awaitable<std::optional<int>> next_chunk(std::shared_ptr<chunk_script> s) {
  co_await sleep_for(s->gap);
  if (s->left > 0) {
    --s->left;
    co_return s->tokens;
  }
  if (s->ending == 1) throw sim_failure();
  if (s->ending == 2) co_await sleep_for(1h);
  co_return std::nullopt;
}

// Everything a scenario composes, with its checks.
struct setup {
  setup(asio::io_context& io, std::mt19937_64& rng, std::size_t n, int tenants)
      : outermost(std::make_shared<checks>("outermost", n)),
        keyed(std::make_shared<keyed_checks>(io, rng, n, tenants)),
        budget(std::make_shared<budget_checks>(rng, n)),
        queue(std::make_shared<queue_checks>(io, rng, n, tenants)),
        adaptive(std::make_shared<adaptive_checks>(io, rng, n)),
        hedge_outer(std::make_shared<hedge_outer_checks>(n)),
        hedge_inner(std::make_shared<hedge_inner_checks>(rng, n, *hedge_outer)),
        fallback_books(std::make_shared<fallback_checks>(rng, n)),
        w0(nothing{}, outermost),
        w_keyed(present(rng, keyed->limiter.stage()), keyed),
        w_budget(present(rng, budget->budget.stage(budget->price)), budget),
        w_queue(present(rng, queue->queue.stage()), queue),
        w_adaptive(present(rng, adaptive->limit.stage()), adaptive),
        w_hedge_outer(nothing{}, hedge_outer),
        w_hedge_inner(nothing{}, hedge_inner),
        hedge(hedge_inner->hedge),
        fallback(fallback_answer{fallback_books}, {.handles = fallback_books->handles}),
        retry(retry_options(rng)) {
    hedge_outer->inner = hedge_inner.get();
  }

  template <class S>
  static std::optional<S> present(std::mt19937_64& rng, S stage) {
    if (chance(rng, 0.35)) return std::nullopt;
    return stage;
  }
  static retry_stage_type::options_type retry_options(std::mt19937_64& rng) {
    retry_stage_type::options_type o;
    o.max_attempts = chance(rng, 0.4) ? 1 : pick(rng, 2u, 3u);
    o.backoff = weir::backoff::exponential(uniform(rng, 10ms, 2s), 2.0, 10s);
    o.max_retry_after = uniform(rng, 0s, 10s);
    o.seed = rng() | 1;
    return o;
  }

  std::vector<checks*> all() const {
    return {outermost.get(), keyed.get(),       budget.get(),      queue.get(),
            adaptive.get(),  hedge_outer.get(), hedge_inner.get(), fallback_books.get()};
  }

  std::shared_ptr<checks> outermost;
  std::shared_ptr<keyed_checks> keyed;
  std::shared_ptr<budget_checks> budget;
  std::shared_ptr<queue_checks> queue;
  std::shared_ptr<adaptive_checks> adaptive;
  std::shared_ptr<hedge_outer_checks> hedge_outer;
  std::shared_ptr<hedge_inner_checks> hedge_inner;
  std::shared_ptr<fallback_checks> fallback_books;

  watched<nothing> w0;
  watched<weir::keyed_limiter_stage<keyed_checks::limiter_type>> w_keyed;
  watched<weir::spend_budget_stage<sim_clock>> w_budget;
  watched<weir::request_queue_stage> w_queue;
  watched<weir::adaptive_concurrency_stage<sim_clock, asio::any_io_executor>> w_adaptive;
  watched<nothing> w_hedge_outer;
  watched<nothing> w_hedge_inner;
  hedge_inner_checks::hedging_type hedge;
  fallback_type fallback;
  retry_stage_type retry;
};

// The orders composed, outermost first: the fallback outermost, in the middle and innermost
// but two; the hedge outside and inside the queue and the budget; the retry at each end.
template <int Shape>
auto make_pipeline(const setup& s) {
  weir::basic_pipeline_options<stage_classifier> o;
  if constexpr (Shape == 0)
    return weir::pipeline(o, s.w0, s.fallback, s.w_hedge_outer, s.hedge, s.w_hedge_inner, s.w_keyed,
                          s.w_budget, s.w_queue, s.w_adaptive, s.retry);
  else if constexpr (Shape == 1)
    return weir::pipeline(o, s.w0, s.w_budget, s.retry, s.w_queue, s.fallback, s.w_hedge_outer,
                          s.hedge, s.w_hedge_inner, s.w_keyed, s.w_adaptive);
  else
    return weir::pipeline(o, s.w0, s.retry, s.w_adaptive, s.w_hedge_outer, s.hedge, s.w_hedge_inner,
                          s.fallback, s.w_queue, s.w_keyed, s.w_budget);
}
constexpr int shapes = 3;

class scenario {
 public:
  scenario(std::uint64_t seed, bool verbose) : seed_(seed), verbose_(verbose) {}

  void run() {
    std::mt19937_64 rng(seed_ ^ 0x57a6e5);
    sim_clock::reset();
    asio::io_context io;
    const auto n = pick<std::size_t>(rng, 1, 30);
    const int tenants = pick(rng, 1, 4);
    setup s(io, rng, n, tenants);
    const int shape = pick(rng, 0, shapes - 1);
    const bool streams = chance(rng, 0.4);
    try {
      switch (shape * 2 + (streams ? 1 : 0)) {
        case 0: run_shape<0, int>(io, rng, s, n, tenants); break;
        case 1: run_shape<0, stream_type>(io, rng, s, n, tenants); break;
        case 2: run_shape<1, int>(io, rng, s, n, tenants); break;
        case 3: run_shape<1, stream_type>(io, rng, s, n, tenants); break;
        case 4: run_shape<2, int>(io, rng, s, n, tenants); break;
        default: run_shape<2, stream_type>(io, rng, s, n, tenants); break;
      }
    } catch (const violation& v) {
      // Calls may still wait in the stages, their frames pointing at the scenario's calls:
      // destroying the io_context now would run them against freed memory. Report and stop.
      fmt::print(stderr, "weir_simulation: seed {} broke an invariant: {}\n", seed_, v.what());
      fmt::print(stderr, "replay: weir_simulation --seed {} --verbose\n", seed_);
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(1);
    }
  }

 private:
  // A whole response: what each attempt does is drawn when it starts.
  static asio::awaitable<int> answer(std::mt19937_64& rng, call& c) {
    const auto kind = pick(rng, 0, 9);
    const auto delay = uniform(rng, 0s, 3s);
    const auto value = pick(rng, 0, 1000);
    const auto hint = uniform(rng, 0s, 5s);
    const bool tell_tokens = chance(rng, 0.5);
    const auto actual = pick<std::uint64_t>(rng, 0, 2 * c.ctx.tokens + 10);
    switch (kind) {
      case 0:
      case 1:
      case 2:
        co_await sleep_for(delay);
        if (tell_tokens) c.ctx.actual_tokens = actual;
        co_return value;
      case 3: throw sim_failure();
      case 4: co_await sleep_for(delay); throw sim_failure();
      case 5: co_await sleep_for(1h); co_return 1;  // hangs until cancelled
      case 6:
        co_await sleep_for(delay);
        throw weir::exception(weir::error::rate_limited, "the server refused", hint);
      case 7: co_await sleep_for(delay); co_return -503;
      case 8: co_await sleep_for(delay); co_return -429;
      default: throw 42;
    }
  }

  // A stream: fails or hangs before its first chunk, or sends chunks and ends, breaks or hangs.
  static asio::awaitable<stream_type> open(std::mt19937_64& rng) {
    const auto kind = pick(rng, 0, 9);
    const auto delay = uniform(rng, 0s, 3s);
    auto script = std::make_shared<chunk_script>(
        chunk_script{pick(rng, 0, 6), uniform(rng, 0s, 2s), pick(rng, 0, 2), pick(rng, 1, 500)});
    weir::stream_options<int> o;
    if (chance(rng, 0.5)) o.first_token = uniform(rng, 500ms, 5s);
    if (chance(rng, 0.5)) o.idle = uniform(rng, 500ms, 3s);
    if (chance(rng, 0.3)) o.total = uniform(rng, 1s, 20s);
    if (chance(rng, 0.7))
      o.tally = [](const int& chunk, weir::stream_tally& t) {
        t.counted_output_tokens += static_cast<std::uint64_t>(chunk);
      };
    co_await sleep_for(delay);
    if (kind == 0) throw sim_failure();
    if (kind == 1) throw weir::exception(weir::error::rate_limited, "the server refused", delay);
    if (kind == 2) {
      co_await sleep_for(1h);
      throw sim_failure();
    }
    // Named first: g++ 12 destroys the temporaries of a co_await expression twice when it throws.
    auto pull = [script] { return next_chunk(script); };
    auto opening = weir::open_stream_on<int, sim_clock>(std::move(pull), std::move(o));
    co_return co_await std::move(opening);
  }

  // The caller reads its stream as drawn; the moment it ends, it must have settled once.
  static asio::awaitable<void> read(stream_type s, call& c, checks& outermost, std::size_t i) {
    using namespace asio::experimental::awaitable_operators;
    int got = 0;
    try {
      switch (c.read_mode) {
        case 0:
          while (co_await s.next()) {
          }
          break;
        case 1:
        case 2:
          for (; got < c.read_chunks; ++got) {
            auto chunk = co_await s.next();
            if (!chunk) break;
          }
          if (c.read_mode == 1) s.close();  // else dropped below
          break;
        default: {
          asio::basic_waitable_timer<sim_clock> stop(co_await asio::this_coro::executor,
                                                     c.cancel_read_after);
          for (;;) {
            auto either = s.next() || stop.async_wait(asio::use_awaitable);
            auto r = co_await std::move(either);
            if (r.index() == 1 || !std::get<0>(r)) break;
          }
        }
      }
    } catch (const weir::exception& e) {
      if (e.code() != weir::error::stream_broken)
        outermost.complain("reading call {}'s stream threw {}", i, e.what());
    } catch (const std::exception& e) {
      outermost.complain("reading call {}'s stream threw {}", i, e.what());
    }
    const bool ended = s.ended();
    { stream_type dropped = std::move(s); }
    const auto settled = outermost.per_call[i].delivered;
    if (settled != 1)
      outermost.complain("call {}'s stream ({}) settled {} times when it was {}", i,
                         ended ? "ended" : "open", settled,
                         c.read_mode == 2 ? "dropped" : "done with");
    c.reading = false;
  }

  template <int Shape, class T>
  void run_shape(asio::io_context& io, std::mt19937_64& rng, setup& s, std::size_t n, int tenants) {
    auto pipeline = make_pipeline<Shape>(s);
    constexpr bool streams = std::is_same_v<T, stream_type>;

    std::deque<call> calls;
    const auto t0 = sim_clock::now();
    for (std::size_t i = 0; i < n; ++i) {
      auto& c = calls.emplace_back();
      c.name = fmt::format("call {}", i);
      c.ctx.operation = c.name;
      c.ctx.tenant = tenant_names[pick(rng, 0, tenants - 1)];
      c.ctx.priority = static_cast<weir::priority>(pick(rng, 0, 2));
      c.ctx.tokens = pick<std::uint64_t>(rng, 0, 6000);
      c.arrival = uniform(rng, 0s, 30s);
      if (chance(rng, 0.3)) c.ctx.deadline = t0 + c.arrival + uniform(rng, 0s, 20s);
      if (chance(rng, 0.3)) c.cancel_at = c.arrival + uniform(rng, 0s, 15s);
      c.read_mode = pick(rng, 0, 3);
      c.read_chunks = pick(rng, 0, 4);
      c.cancel_read_after = uniform(rng, 0s, 5s);
    }

    auto start = [&](std::size_t i) {
      auto& c = calls[i];
      auto op = [&rng, &c, &s] {
        if (c.ctx.deadline && sim_clock::now() >= *c.ctx.deadline)
          s.outermost->complain("an attempt of {} was sent {} ns after its deadline", c.name,
                                (sim_clock::now() - *c.ctx.deadline).count());
        if constexpr (streams)
          return open(rng);
        else
          return answer(rng, c);
      };
      asio::co_spawn(io, pipeline(c.ctx, op),
                     asio::bind_cancellation_slot(
                         c.signal.slot(), [&calls, &s, &io, i](std::exception_ptr e, T value) {
                           ended(calls[i], i, e, std::move(value), s, Shape == 0, io);
                         }));
    };
    for (std::size_t i = 0; i < n; ++i) {
      auto& c = calls[i];
      auto arrive = std::make_shared<asio::basic_waitable_timer<sim_clock>>(io, t0 + c.arrival);
      arrive->async_wait([&start, i, arrive](weir::error_code) { start(i); });
      if (c.cancel_at) {
        auto cancel =
            std::make_shared<asio::basic_waitable_timer<sim_clock>>(io, t0 + *c.cancel_at);
        cancel->async_wait([&c, cancel](weir::error_code) {
          if (c.completions == 0 && c.cancel_at >= c.arrival) {
            c.cancelled = true;
            c.signal.emit(asio::cancellation_type::terminal);
          }
        });
      }
    }

    for (int hours = 0; hours < 48; ++hours) {
      advance<sim_clock>(io, 1h);
      if (std::all_of(calls.begin(), calls.end(),
                      [](const call& c) { return c.completions > 0 && !c.reading; }))
        break;
    }
    run_ready(io);

    for (std::size_t i = 0; i < n; ++i) {
      const auto& c = calls[i];
      if (c.completions != 1) fail("stages: call {} ended {} times", i, c.completions);
      if (c.reading) fail("stages: call {}'s stream is still being read at quiescence", i);
      if (verbose_)
        fmt::print("  call {:>2} ({}, priority {}): arrives +{:.3f} s{}{} -> {} at +{:.3f} s\n", i,
                   c.ctx.tenant, static_cast<int>(c.ctx.priority),
                   std::chrono::duration<double>(c.arrival).count(), c.cancel_at ? " (cancel)" : "",
                   c.cancelled ? " cancelled" : "", c.result,
                   std::chrono::duration<double>(c.ended - t0).count());
    }
    for (auto* k : s.all()) {
      for (std::size_t i = 0; i < n; ++i)
        if (k->per_call[i].inside != 0)
          k->complain("call {} still holds it at quiescence ({} entries)", i,
                      k->per_call[i].inside);
      k->at_quiescence();
    }
    if constexpr (streams)
      for (std::size_t i = 0; i < n; ++i)
        if (s.outermost->per_call[i].delivered != (calls[i].got_stream ? 1 : 0))
          s.outermost->complain("call {} {} a stream, and settled {} at a stream's end", i,
                                calls[i].got_stream ? "got" : "did not get",
                                s.outermost->per_call[i].delivered);
    for (auto* k : s.all())
      if (k->broken) fail("stages: {}", *k->broken);
    io.restart();
    io.poll();
    if (!io.stopped()) fail("stages: work is left pending at quiescence");
    if (verbose_)
      fmt::print("  stages: shape {}, {}, {} calls, {} tenants, fallback used {} times\n", Shape,
                 streams ? "streams" : "whole responses", n, tenants, s.fallback_books->uses);
  }

  template <class T>
  static void ended(call& c, std::size_t i, std::exception_ptr e, T value, setup& s,
                    bool fallback_outermost, asio::io_context& io) {
    ++c.completions;
    c.ended = sim_clock::now();
    if (e) {
      c.result = describe(e);
      if (weir::is_cancellation(e) && !c.cancelled)
        s.outermost->complain("uncancelled call {} ended as cancelled", i);
      if (!weir::is_cancellation(e) && !c.result.starts_with("weir") &&
          c.result != "operation failure" && c.result != "operation threw an int")
        s.outermost->complain("call {} ended with {}", i, c.result);
    } else if constexpr (std::is_same_v<T, int>) {
      c.result = fmt::format("value {}", value);
    } else {
      c.result = "a stream";
    }
    // Outermost, the fallback leaves no failure it handles (but for the call's own deadline,
    // kept outside it, and a call refused before any stage).
    if (fallback_outermost && !weir::is_cancellation(e) && s.outermost->per_call[i].entered > 0 &&
        !(c.ctx.deadline && c.ended >= *c.ctx.deadline)) {
      auto o =
          e ? weir::outcome<T>::from_exception(e) : weir::outcome<T>::from_value(std::move(value));
      if (s.fallback_books->handled(stage_classifier{}(o)))
        s.outermost->complain("call {} ended with {}, which the fallback handles", i, c.result);
      if (!e) value = std::move(o).get();
    }
    if constexpr (std::is_same_v<T, stream_type>) {
      if (!e) {
        c.got_stream = true;
        c.reading = true;
        asio::co_spawn(io, read(std::move(value), c, *s.outermost, i), asio::detached);
      }
    }
  }

  std::uint64_t seed_;
  bool verbose_;
};

}  // namespace stages
