// Pacing on virtual time, refereed by server models (issue 30).
//
// Included by simulation.cpp after its helpers (violation, fail, pick, uniform, chance, sleep_for,
// sim_clock), outside its anonymous namespace (g++ 12 refuses coroutine frames of types from an
// anonymous namespace in a template with external linkage): one seed decides a server model, a
// limit, a round trip and a client (what it is told of the limit, its token estimates, its callers,
// its retries), runs it for 30–90 virtual seconds and checks what the *server* counted against the
// properties of issue 30. The servers decide on their own counters, never weir's, and answer
// with the status and header fields real ones send; weir reads them through judge_status, so
// the real header parsing is exercised.
//
// Two ways to drive a client: the asio pipeline (retry, limits, adaptation stage; coroutines,
// timers, settlement through ctx.actual_*), where refunds, debts and the stages' order matter,
// and a drive loop that steps time itself (try_acquire / observe / settle by hand), ten times
// cheaper, for the rest of the seeds.
//
// Server models:
//   nginx-strict         limit_req, no burst: GCRA decided in whole milliseconds, 429 +
//                        Retry-After: 1 (sent on every answer, as `add_header ... always` does); goodput
//                        is measured against what a perfect pacer gets through the jitter
//   nginx-delay          burst N: the excess up to N is delayed, not refused
//   nginx-nodelay        burst N nodelay
//   fixed-legacy         a fixed window: X-RateLimit-Limit/Remaining/Reset (epoch seconds,
//                        rounded up), no window reported
//   fixed-draft6[-w]     RateLimit-Limit/Remaining/Reset (delta seconds); "-w": RateLimit-Policy
//                        "L;w=W" reports the window
//   fixed-draft8[-w]     RateLimit: "default";r=..;t=.. and RateLimit-Policy: "default";q=..[;w=..]
//   haproxy              sc_http_req_rate over a sliding second in which refusals count
//   openai               continuously refilled requests and tokens per minute, reported as
//                        x-ratelimit-*-requests/-tokens with Go-duration resets
//   anthropic            the same with requests, input and output tokens apart, reported as
//                        anthropic-ratelimit-* with RFC 3339 resets (whole seconds or ms)
//   concurrency          503 past N in flight (reported only: no rate property applies)
// and twists on top of one: "+change" (the limit halves at a third of the run and comes back at
// two thirds), "+flaky" (a gateway answers 5–20% 429s or 503s at random, in front of the
// limit), "+shared" (2–4 clients, each with its own limiter and adaptation, share the limit; a
// strict nginx limit gets a burst of 4 when shared, as uncoordinated clients need, and a fixed
// or HAProxy window's goodput is measured against what perfect uncoordinated pacers get through
// it).
//
// Properties, per seed (while the callers could send well above the limit):
//   - steady-state goodput (what the server admitted over the second half) ≥ 95% of the limit
//     when it was given or reported, ≥ 90% when discovered; refusals ≤ 1% / ≤ 3%;
//   - after any burst of refusals, back to ≥ 80% of the limit within 10 s;
//   - never below 50% of the limit for more than 10 s;
//   - a limit that changes is followed (≥ 80% of the new limit, ≤ 10% refusals) within 10 s;
//   - random refusals unrelated to the rate cost at most 10% of the goodput the same scenario
//     has without them;
//   - a limiter given a token limit lets through no more true tokens than that limit allows
//     (plus its burst and what the callers in flight can carry): a debt is paid before anything
//     else is admitted;
//   - constructing a server_adaptation leaves its limiter as configured.
#pragma once

namespace pacing {

using header_fields = std::vector<std::pair<std::string, std::string>>;
constexpr ns bucket_width = 100ms;  // the resolution of the server's tallies
constexpr ns max_jitter = 2ms;      // added to each way of a round trip, uniformly from zero
inline ns buckets(std::size_t n) { return bucket_width * static_cast<std::int64_t>(n); }

// The wall clock the servers and weir's header parser share: a fixed epoch plus virtual time.
inline std::chrono::system_clock::time_point wall_now() {
  const auto epoch = std::chrono::sys_days(std::chrono::year(2026) / 1 / 1);
  return std::chrono::time_point_cast<std::chrono::system_clock::duration>(
      epoch + sim_clock::now().time_since_epoch());
}
inline std::int64_t wall_ns() {
  return std::chrono::duration_cast<ns>(wall_now().time_since_epoch()).count();
}

// ---- how servers write numbers ----------------------------------------------------------------

inline std::string whole_seconds_up(ns d) {
  return std::to_string(std::max<std::int64_t>(0, (d.count() + 999'999'999) / 1'000'000'000));
}

inline std::string trimmed(double v) {
  auto s = fmt::format("{:.3f}", v);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s;
}

// As OpenAI writes a reset: "17ms", "1.5s", "6m0s", "2m59.56s".
inline std::string go_duration(ns d) {
  if (d <= 0ns) return "0s";
  if (d < 1s) return fmt::format("{}ms", (d.count() + 999'999) / 1'000'000);
  const double seconds = std::chrono::duration<double>(d).count();
  if (d < 60s) return trimmed(seconds) + "s";
  const auto minutes = static_cast<std::int64_t>(seconds / 60);
  return fmt::format("{}m{}s", minutes, trimmed(seconds - 60.0 * static_cast<double>(minutes)));
}

// As Anthropic writes a reset: an RFC 3339 instant, in whole seconds (rounded up) or with ms.
inline std::string rfc3339(std::chrono::system_clock::time_point t, bool whole_seconds) {
  using namespace std::chrono;
  const auto at =
      whole_seconds ? time_point_cast<milliseconds>(ceil<seconds>(t)) : ceil<milliseconds>(t);
  const auto day = floor<days>(at);
  const year_month_day ymd(day);
  const hh_mm_ss hms(at - day);
  const auto date =
      fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", static_cast<int>(ymd.year()),
                  static_cast<unsigned>(ymd.month()), static_cast<unsigned>(ymd.day()),
                  hms.hours().count(), hms.minutes().count(), hms.seconds().count());
  if (whole_seconds) return date + "Z";
  return fmt::format("{}.{:03}Z", date, hms.subseconds().count());
}

// Moves virtual time by `d` through every timer deadline on the way, as manual_clock's advance()
// does, with half its polls: each poll is a system call or two (the reactor), and a pacing run
// steps through tens of thousands of deadlines.
inline void step_through(asio::io_context& io, ns d) {
  const auto target = sim_clock::now() + d;
  for (;;) {
    sim_clock::forget_deadline();
    do io.restart();
    while (io.poll() > 0);
    const auto next = sim_clock::next_deadline();
    if (!next || *next <= sim_clock::now() || *next > target) break;
    sim_clock::set(*next);
  }
  sim_clock::set(target);
  do io.restart();
  while (io.poll() > 0);
}

// ---- the referees ------------------------------------------------------------------------------

// One request as the server sees it: what it truly uses.
struct job {
  std::uint64_t input = 0, output = 0;
  std::uint64_t total() const { return input + output; }
};

struct reply {
  unsigned status = 200;
  header_fields fields;
  ns delay{0};  // held by the server before answering (nginx's delay, a worker's service)
};

class referee {
 public:
  virtual ~referee() = default;
  // Decides on a request arriving `at` after the run started, on the server's own counters.
  virtual reply decide(ns at, const job& j) = 0;
  // The requests per second it allows at `at`, sustained (tokens at their mean).
  virtual double limit_at(ns at) const = 0;
  // What the properties measure goodput against: the limit, or less where no client could reach
  // it through the network's jitter.
  virtual double reachable_at(ns at) const { return limit_at(at); }
  // Whether its answers report the limit with its period, so that a client may learn it.
  virtual bool reports_limit() const { return false; }
  // Whether the rate properties apply (a concurrency limit is no rate).
  virtual bool is_rate_limit() const { return true; }
  virtual std::string describe() const = 0;

  // The limit halves at halve_at and comes back at restore_at.
  std::optional<ns> halve_at, restore_at;
  // Clients that share the limit, each pacing on its own ("+shared").
  int sharers = 1;
  double scale(ns at) const {
    return halve_at && at >= *halve_at && (!restore_at || at < *restore_at) ? 0.5 : 1.0;
  }
};

// nginx limit_req (ngx_http_limit_req_module.c): `excess` in thousandths of a request, time in
// whole milliseconds; a refusal changes nothing; the first request of a zone is always served.
class nginx_limit_req : public referee {
 public:
  nginx_limit_req(int per_second, int burst, bool delay)
      : per_second_(per_second), burst_(burst), delay_(delay) {}

  reply decide(ns at, const job&) override {
    const std::int64_t now_ms = wall_ns() / 1'000'000;
    const auto rate = static_cast<std::int64_t>(std::llround(per_second_ * scale(at) * 1000));
    header_fields fields{{"Retry-After", "1"}};
    if (!seen_) {
      seen_ = true;
      excess_ = 0;
      last_ms_ = now_ms;
      return {200, std::move(fields)};
    }
    const auto ms = std::max<std::int64_t>(0, now_ms - last_ms_);
    const auto excess = std::max<std::int64_t>(0, excess_ - rate * ms / 1000 + 1000);
    if (excess > burst_ * 1000) return {429, std::move(fields)};
    excess_ = excess;
    last_ms_ = now_ms;
    const ns held = delay_ ? ns(std::chrono::milliseconds(excess * 1000 / rate)) : ns(0);
    return {200, std::move(fields), held};
  }
  double limit_at(ns at) const override { return per_second_ * scale(at); }
  // A limit with no burst refuses a request that arrives a millisecond early, and jitter of up
  // to max_jitter brings some that early however evenly they are sent: the best any client can
  // do is what a perfect pacer gets through with at most 0.5% refused.
  double reachable_at(ns at) const override {
    if (burst_ != 0) return limit_at(at);
    auto& reach = scale(at) < 1 ? reach_halved_ : reach_;
    if (reach == 0) reach = perfect_pacer_goodput(limit_at(at));
    return reach;
  }
  std::string describe() const override {
    return fmt::format("nginx limit_req {}r/s burst={}{}", per_second_, burst_,
                       burst_ == 0 ? ""
                       : delay_    ? " (delay)"
                                   : " nodelay");
  }

 private:
  double per_second_;
  int burst_;
  bool delay_;
  bool seen_ = false;
  std::int64_t excess_ = 0, last_ms_ = 0;
  mutable double reach_ = 0, reach_halved_ = 0;

  // The admitted rate of the fastest even pace (in steps of 0.25% of the limit) whose arrivals,
  // each late by up to max_jitter, are refused at most 0.5% of the time by this module's rule.
  static double perfect_pacer_goodput(double per_second) {
    const auto rate = static_cast<std::int64_t>(std::llround(per_second * 1000));
    std::mt19937_64 rng(static_cast<std::uint64_t>(rate));
    constexpr int arrivals = 4000;
    std::vector<double> late(arrivals);
    for (auto& l : late) l = uniform(rng, 0ns, max_jitter).count() / 1e6;  // ms
    const double phase = uniform(rng, 0ns, ns(1ms)).count() / 1e6;
    for (double pace = 1.0; pace > 0.8; pace -= 0.0025) {
      const double interval_ms = 1000 / (per_second * pace);
      std::int64_t excess = 0, last_ms = 0;
      int refused = 0;
      for (int i = 0; i < arrivals; ++i) {
        const auto ms = static_cast<std::int64_t>(phase + i * interval_ms + late[i]);
        const auto e =
            i == 0 ? 0 : std::max<std::int64_t>(0, excess - rate * (ms - last_ms) / 1000 + 1000);
        if (e > 0) {
          ++refused;
          continue;
        }
        excess = e;
        last_ms = ms;
      }
      if (refused <= arrivals / 200) return per_second * pace * (1 - refused / double(arrivals));
    }
    return per_second * 0.8;
  }
};

// The admitted rate of the fastest even pace (in steps of 1% of the limit) at which `sharers`
// perfect pacers, each at its share of `per_second` and its own phase, each arrival late by up to
// max_jitter, are refused at most 0.5% of the time by a server's rule over `span_s` seconds; over
// several draws of phases. `rule` is copied fresh for each run: arrival time (s) -> admitted.
template <class Rule>
double shared_pacers_goodput(double per_second, int sharers, std::uint64_t seed, double span_s,
                             const Rule& rule) {
  std::mt19937_64 rng(seed);
  constexpr int draws = 6;
  std::vector<std::vector<double>> phases(draws), late(draws);
  for (int d = 0; d < draws; ++d) {
    for (int c = 0; c < sharers; ++c)
      phases[d].push_back(std::uniform_real_distribution<>(0, 1)(rng));
    for (int i = 0; i < static_cast<int>(span_s * per_second * 2); ++i)
      late[d].push_back(std::chrono::duration<double>(uniform(rng, 0ns, max_jitter)).count());
  }
  std::vector<double> arrivals;
  for (double pace = 1.0; pace > 0.5; pace -= 0.01) {
    const double interval = sharers / (per_second * pace);  // one client's
    long admitted = 0, refused = 0;
    for (int d = 0; d < draws; ++d) {
      arrivals.clear();
      std::size_t k = 0;
      for (int c = 0; c < sharers; ++c)
        for (double t = phases[d][c] * interval; t < span_s; t += interval)
          arrivals.push_back(t + late[d][k++ % late[d].size()]);
      std::sort(arrivals.begin(), arrivals.end());
      auto admits = rule;
      for (double t : arrivals) (admits(t) ? admitted : refused) += 1;
    }
    if (refused * 200 <= admitted + refused)
      return per_second * pace * (1 - static_cast<double>(refused) / (admitted + refused));
  }
  return per_second * 0.5;
}

enum class window_style { legacy, draft6, draft8 };

// A fixed window of `limit` per `window`, opening on the wall clock's multiples of the window or
// at the first request after the last window ended; refusals do not count. Resets in whole
// seconds, rounded up.
class fixed_window : public referee {
 public:
  fixed_window(int limit, ns window, bool from_first_request, window_style style,
               bool reports_window)
      : limit_(limit),
        window_(window),
        from_first_(from_first_request),
        style_(style),
        reports_window_(reports_window && style != window_style::legacy) {}

  reply decide(ns at, const job&) override {
    const auto wall = wall_ns();
    std::int64_t opens = 0;
    if (from_first_) {
      // As Python's `limits` (Flask-Limiter) and most in-memory stores keep it: a window begins
      // at the first request after the last one ended, so windows do not follow each other on
      // whole seconds, and their whole-second resets step by one second or two.
      if (!origin_ || wall >= *origin_ + window_.count()) origin_ = wall, used_ = 0;
      opens = *origin_ + window_.count();
    } else {
      const auto index = wall / window_.count();
      opens = (index + 1) * window_.count();
      if (index != index_) index_ = index, used_ = 0;
    }
    const int limit = std::max(1, static_cast<int>(limit_ * scale(at)));
    const bool ok = used_ < limit;
    if (ok) ++used_;
    const auto left = ns(opens - wall);
    const auto remaining = std::to_string(std::max(0, limit - used_));
    const auto w = std::to_string(window_ / 1s);
    header_fields f;
    switch (style_) {
      case window_style::legacy:
        f = {{"X-RateLimit-Limit", std::to_string(limit)},
             {"X-RateLimit-Remaining", remaining},
             {"X-RateLimit-Reset", whole_seconds_up(ns(opens))}};
        break;
      case window_style::draft6:
        f = {{"RateLimit-Limit", std::to_string(limit)},
             {"RateLimit-Remaining", remaining},
             {"RateLimit-Reset", whole_seconds_up(left)}};
        if (reports_window_) f.emplace_back("RateLimit-Policy", fmt::format("{};w={}", limit, w));
        break;
      case window_style::draft8:
        f = {{"RateLimit", fmt::format("\"default\";r={};t={}", remaining, whole_seconds_up(left))},
             {"RateLimit-Policy", reports_window_ ? fmt::format("\"default\";q={};w={}", limit, w)
                                                  : fmt::format("\"default\";q={}", limit)}};
        break;
    }
    if (!ok) f.emplace_back("Retry-After", whole_seconds_up(left));
    return {ok ? 200u : 429u, std::move(f)};
  }
  double limit_at(ns at) const override {
    return std::max(1, static_cast<int>(limit_ * scale(at))) /
           std::chrono::duration<double>(window_).count();
  }
  // Shared by clients that do not coordinate, a window whose limit they cannot split evenly
  // overflows however evenly each paces its share: two clients paced at 97% of their half of 5
  // each send 3 in some windows, 6 in all. The best they can do is what perfect pacers get
  // through with at most 0.5% refused.
  double reachable_at(ns at) const override {
    if (sharers == 1) return limit_at(at);
    auto& reach = scale(at) < 1 ? reach_halved_ : reach_;
    if (reach == 0)
      reach = shared_pacers_goodput(std::max(1, static_cast<int>(limit_ * scale(at))));
    return reach;
  }
  bool reports_limit() const override { return reports_window_; }
  std::string describe() const override {
    static const char* styles[] = {"X-RateLimit (epoch reset)", "RateLimit-* (delta reset)",
                                   "RateLimit structured"};
    return fmt::format("fixed window {} per {} s from {}, {}{}", limit_, window_ / 1s,
                       from_first_ ? "the first request" : "the second",
                       styles[static_cast<int>(style_)],
                       reports_window_ ? ", window reported" : ", no window reported");
  }

 private:
  int limit_;
  ns window_;
  bool from_first_;
  window_style style_;
  bool reports_window_;
  std::optional<std::int64_t> origin_;
  std::int64_t index_ = -1;
  int used_ = 0;
  mutable double reach_ = 0, reach_halved_ = 0;

  // What perfect uncoordinated pacers get through this window's rule (refusals do not count).
  double shared_pacers_goodput(int limit) const {
    const double window_s = std::chrono::duration<double>(window_).count();
    return pacing::shared_pacers_goodput(
        limit / window_s, sharers, static_cast<std::uint64_t>(limit * 131 + sharers),
        100 * window_s, [&, origin = -1e18, index = -1L, used = 0](double t) mutable {
          if (from_first_) {
            if (t >= origin + window_s) origin = t, used = 0;
          } else if (const auto i = static_cast<long>(t / window_s); i != index) {
            index = i, used = 0;
          }
          if (used == limit) return false;
          ++used;
          return true;
        });
  }
};

// HAProxy's `sc_http_req_rate(0) gt N` over a one-second stick-table period: the request is
// counted when tracked, before the check, so a refused knock counts too; the rate is the
// current period's count plus the previous one's, weighted by what is left of the period.
class haproxy_sliding : public referee {
 public:
  explicit haproxy_sliding(int per_second) : per_second_(per_second) {}

  reply decide(ns at, const job&) override {
    const auto ms = wall_ns() / 1'000'000;
    const auto period = ms / 1000;
    if (period != period_) {
      previous_ = period == period_ + 1 ? current_ : 0;
      current_ = 0;
      period_ = period;
    }
    ++current_;
    const auto elapsed = ms % 1000;
    const auto rate = current_ + previous_ * (1000 - elapsed) / 1000;
    const auto limit = std::max<std::int64_t>(1, std::llround(per_second_ * scale(at)));
    if (rate > limit)
      return {429,
              {{"Retry-After", "1"},
               {"X-RateLimit-Limit", std::to_string(limit)},
               {"X-RateLimit-Remaining", "0"}}};
    return {200,
            {{"X-RateLimit-Limit", std::to_string(limit)},
             {"X-RateLimit-Remaining", std::to_string(limit - rate)}}};
  }
  double limit_at(ns at) const override {
    return static_cast<double>(std::max<std::int64_t>(1, std::llround(per_second_ * scale(at))));
  }
  // Shared by clients that do not coordinate, the window overflows however evenly each paces its
  // share (two paced at 97% of their half of 7 put 8 in some seconds, and each refused knock
  // counts): the best they can do is what perfect pacers get through with at most 0.5% refused.
  double reachable_at(ns at) const override {
    if (sharers == 1) return limit_at(at);
    auto& reach = scale(at) < 1 ? reach_halved_ : reach_;
    if (reach == 0) {
      const auto limit = static_cast<std::int64_t>(limit_at(at));
      reach = shared_pacers_goodput(
          limit_at(at), sharers, static_cast<std::uint64_t>(limit * 137 + sharers), 100,
          [limit, period = std::int64_t{-2}, current = std::int64_t{0},
           previous = std::int64_t{0}](double t) mutable {
            const auto ms = static_cast<std::int64_t>(t * 1000);
            if (ms / 1000 != period) {
              previous = ms / 1000 == period + 1 ? current : 0;
              current = 0;
              period = ms / 1000;
            }
            ++current;
            return current + previous * (1000 - ms % 1000) / 1000 <= limit;
          });
    }
    return reach;
  }
  std::string describe() const override {
    return fmt::format("HAProxy sc_http_req_rate(1s) gt {}", per_second_);
  }

 private:
  int per_second_;
  std::int64_t period_ = -2, current_ = 0, previous_ = 0;
  mutable double reach_ = 0, reach_halved_ = 0;
};

// Continuously refilled limits over a window (a minute), as OpenAI and Anthropic document
// theirs: requests and tokens (OpenAI) or requests, input and output tokens (Anthropic), each a
// bucket of `limit` refilled at limit/window; the server charges what a request truly uses.
class refilling_limits : public referee {
 public:
  enum class shape { openai, anthropic };

  refilling_limits(shape s, ns window, double requests, double tokens_or_input, double output,
                   double mean_input, double mean_output, bool whole_second_resets)
      : shape_(s),
        window_(window),
        mean_input_(mean_input),
        mean_output_(mean_output),
        whole_seconds_(whole_second_resets) {
    buckets_.push_back({"requests", requests, requests});
    buckets_.push_back(
        {s == shape::openai ? "tokens" : "input-tokens", tokens_or_input, tokens_or_input});
    if (s == shape::anthropic) buckets_.push_back({"output-tokens", output, output});
  }

  reply decide(ns at, const job& j) override {
    const double k = scale(at);
    const double elapsed = std::chrono::duration<double>(at - last_).count();
    last_ = at;
    const double window_s = std::chrono::duration<double>(window_).count();
    for (auto& b : buckets_)
      b.level = std::min(b.limit * k, b.level + b.limit * k * elapsed / window_s);
    const double cost[3] = {1, static_cast<double>(shape_ == shape::openai ? j.total() : j.input),
                            static_cast<double>(j.output)};
    bool ok = true;
    double wait_s = 0;  // until the shortest dimension has room for this request
    for (std::size_t d = 0; d < buckets_.size(); ++d)
      if (buckets_[d].level < cost[d]) {
        ok = false;
        wait_s =
            std::max(wait_s, (cost[d] - buckets_[d].level) * window_s / (buckets_[d].limit * k));
      }
    if (ok)
      for (std::size_t d = 0; d < buckets_.size(); ++d) buckets_[d].level -= cost[d];
    header_fields f;
    const auto now = wall_now();
    for (const auto& b : buckets_) {
      const double limit = b.limit * k;
      const auto full_in =
          ns(static_cast<std::int64_t>((limit - b.level) / limit * window_s * 1e9));
      const auto limit_s = std::to_string(static_cast<std::int64_t>(limit));
      const auto remaining = std::to_string(static_cast<std::int64_t>(std::max(0.0, b.level)));
      if (shape_ == shape::openai) {
        f.emplace_back(fmt::format("x-ratelimit-limit-{}", b.name), limit_s);
        f.emplace_back(fmt::format("x-ratelimit-remaining-{}", b.name), remaining);
        f.emplace_back(fmt::format("x-ratelimit-reset-{}", b.name), go_duration(full_in));
      } else {
        f.emplace_back(fmt::format("anthropic-ratelimit-{}-limit", b.name), limit_s);
        f.emplace_back(fmt::format("anthropic-ratelimit-{}-remaining", b.name), remaining);
        f.emplace_back(
            fmt::format("anthropic-ratelimit-{}-reset", b.name),
            rfc3339(now + std::chrono::duration_cast<std::chrono::system_clock::duration>(full_in),
                    whole_seconds_));
      }
    }
    if (!ok && shape_ == shape::anthropic)
      f.emplace_back("retry-after", whole_seconds_up(ns(static_cast<std::int64_t>(wait_s * 1e9))));
    return {ok ? 200u : 429u, std::move(f)};
  }

  double limit_at(ns at) const override {
    const double window_s = std::chrono::duration<double>(window_).count();
    double r = buckets_[0].limit;
    if (shape_ == shape::openai)
      r = std::min(r, buckets_[1].limit / (mean_input_ + mean_output_));
    else
      r = std::min({r, buckets_[1].limit / mean_input_, buckets_[2].limit / mean_output_});
    return r * scale(at) / window_s;
  }
  bool reports_limit() const override { return true; }
  std::string describe() const override {
    std::string s = shape_ == shape::openai ? "OpenAI-style" : "Anthropic-style";
    for (const auto& b : buckets_) s += fmt::format(" {} {:.0f}", b.name, b.limit);
    s += fmt::format(" per {} s (mean tokens in {:.0f} out {:.0f}){}", window_ / 1s, mean_input_,
                     mean_output_,
                     shape_ == shape::anthropic
                         ? (whole_seconds_ ? ", resets in whole seconds" : ", resets in ms")
                         : "");
    return s;
  }

 private:
  struct bucket {
    std::string name;
    double limit, level;
  };
  shape shape_;
  ns window_;
  double mean_input_, mean_output_;
  bool whole_seconds_;
  std::vector<bucket> buckets_;
  ns last_{0};
};

// A server with `workers` slots: a request beyond them is answered 503 at once.
class concurrency_limit : public referee {
 public:
  concurrency_limit(int workers, ns service) : workers_(workers), service_(service) {}

  reply decide(ns at, const job&) override {
    while (!busy_until_.empty() && busy_until_.top() <= at) busy_until_.pop();
    if (static_cast<int>(busy_until_.size()) >= workers_) return {503, {}};
    busy_until_.push(at + service_);
    return {200, {}, service_};
  }
  double limit_at(ns) const override {
    return workers_ / std::chrono::duration<double>(service_).count();
  }
  bool is_rate_limit() const override { return false; }
  std::string describe() const override {
    return fmt::format("{} workers, {} ms each, 503 beyond", workers_, service_ / 1ms);
  }

 private:
  int workers_;
  ns service_;
  std::priority_queue<ns, std::vector<ns>, std::greater<>> busy_until_;
};

// A gateway in front of a limit that refuses a share of requests at random, whatever the rate.
class flaky_gateway : public referee {
 public:
  flaky_gateway(std::unique_ptr<referee> inner, double share, bool with_503, std::uint64_t seed)
      : inner_(std::move(inner)), share_(share), with_503_(with_503), rng_(seed) {}

  reply decide(ns at, const job& j) override {
    if (share_ > 0 && chance(rng_, share_))
      return with_503_ ? reply{503, {}} : reply{429, {{"Retry-After", "1"}}};
    return inner_->decide(at, j);
  }
  double limit_at(ns at) const override { return inner_->limit_at(at); }
  double reachable_at(ns at) const override { return inner_->reachable_at(at); }
  bool reports_limit() const override { return inner_->reports_limit(); }
  bool is_rate_limit() const override { return inner_->is_rate_limit(); }
  std::string describe() const override {
    return fmt::format("{} behind a gateway refusing {:.0f}% at random with {}", inner_->describe(),
                       share_ * 100, with_503_ ? "503" : "429");
  }

 private:
  std::unique_ptr<referee> inner_;
  double share_;
  bool with_503_;
  std::mt19937_64 rng_;
};

// ---- the scenario's settings -------------------------------------------------------------------

enum class estimate_kind { none, exact, high, low, zero };
const char* name_of(estimate_kind e) {
  static const char* names[] = {"-", "exact", "high", "low", "zero"};
  return names[static_cast<int>(e)];
}
enum class retry_order { none, outside, inside };

struct settings {
  std::string model;      // for the report: "nginx-strict+flaky"
  std::string knowledge;  // given, reported, discovered
  estimate_kind estimate = estimate_kind::none;
  bool pipeline = false;  // the asio pipeline, or the drive loop
  retry_order retries = retry_order::none;
  unsigned attempts = 1;
  int clients = 1;
  int callers = 1;  // per client
  ns rtt{0};
  ns length{0};
  double flaky = 0;
  bool flaky_503 = false;
  bool anthropic_dims = false;  // estimates and limits on input/output tokens
  bool token_server = false;
  double mean_input = 0, mean_output = 0;
  // What each client's limiter is told.
  std::optional<weir::limit> given_requests, given_tokens, given_input, given_output;
  double tokens_factor = 1;  // a given tokens limit over what true usage needs
  std::function<std::unique_ptr<referee>(std::uint64_t flaky_seed, double flaky)> make_server;
  std::string server_text;

  std::string describe() const {
    std::string given;
    const auto add = [&](const char* what, const std::optional<weir::limit>& l) {
      if (l) given += fmt::format(" {} {:.2f}/s burst {}", what, l->rate.per_second, l->burst);
    };
    add("requests", given_requests);
    add("tokens", given_tokens);
    add("input", given_input);
    add("output", given_output);
    static const char* orders[] = {"no retry", "pipeline(retry, limits, adaptation)",
                                   "pipeline(limits, retry, adaptation)"};
    return fmt::format(
        "server: {}; client: {} ({}), {} estimates, {} client(s) x {} callers, rtt {} ms, {}, {} "
        "({} attempts), run {} s{}",
        server_text, knowledge, given.empty() ? "told nothing" : "told" + given, name_of(estimate),
        clients, callers, rtt / 1ms, pipeline ? "asio pipeline" : "drive loop",
        orders[static_cast<int>(retries)], attempts, length / 1s,
        flaky > 0 ? fmt::format(", {:.0f}% random {}", flaky * 100, flaky_503 ? 503 : 429) : "");
  }
};

// ---- what the server counted -------------------------------------------------------------------

struct tally {
  std::vector<std::uint32_t> admitted, refused;
  std::vector<double> tokens_sent;  // true tokens of admitted requests, by when weir let them go

  explicit tally(ns length)
      : admitted(static_cast<std::size_t>(length / bucket_width)),
        refused(admitted.size()),
        tokens_sent(admitted.size()) {}

  void note(ns at, bool ok) {
    const auto i = static_cast<std::size_t>(at / bucket_width);
    if (i < admitted.size()) ++(ok ? admitted : refused)[i];
  }
  void note_tokens(ns sent, double tokens) {
    const auto i = static_cast<std::size_t>(sent / bucket_width);
    if (i < tokens_sent.size()) tokens_sent[i] += tokens;
  }
};

// One client: its limiter and adaptation, and what it saw of its own pacing.
struct client {
  client(asio::io_context& io, const settings& s)
      : limits(io.get_executor(), options(s)), adapt(limits) {}

  static weir::rate_limits_options options(const settings& s) {
    return {.requests = s.given_requests,
            .tokens = s.given_tokens,
            .input_tokens = s.given_input,
            .output_tokens = s.given_output,
            .name = "pacing"};
  }

  // Watches the paced rate for decreases (one per congestion event).
  void sample(sim_clock::time_point now) {
    const double rate = adapt.state().rate.per_second;
    if (last_rate > 0 && rate < last_rate * 0.995) decreases.push_back(now);
    last_rate = rate;
  }

  weir::rate_limits<sim_clock> limits;
  weir::http::server_adaptation<sim_clock> adapt;
  double last_rate = 0;
  std::vector<sim_clock::time_point> decreases;
  int in_flight = 0;
};

// What weir is told a request will use, for the estimate kind.
inline weir::usage estimate_of(const settings& s, const job& j) {
  const auto scaled = [&](std::uint64_t v) -> std::uint64_t {
    switch (s.estimate) {
      case estimate_kind::high: return v * 2;
      case estimate_kind::low: return v / 2;
      case estimate_kind::zero: return 0;
      default: return v;
    }
  };
  weir::usage u{.requests = 1};
  if (s.estimate == estimate_kind::none) return u;
  if (s.anthropic_dims) {
    u.input_tokens = scaled(j.input);
    u.output_tokens = scaled(j.output);
    u.tokens = u.input_tokens + u.output_tokens;
  } else {
    u.tokens = scaled(j.total());
  }
  return u;
}
inline weir::usage actual_of(const job& j) {
  return {.requests = 1, .tokens = j.total(), .input_tokens = j.input, .output_tokens = j.output};
}

// ---- one run -----------------------------------------------------------------------------------

struct run_result {
  tally counted;
  std::vector<double> expected;  // admissions the limit allows per bucket
  std::vector<std::string> states;
  std::vector<std::vector<sim_clock::time_point>> decreases;
  sim_clock::time_point start{};
};

class run {
 public:
  run(const settings& s, std::uint64_t seed, double flaky)
      : s_(s), rng_(seed), server_(s.make_server(seed ^ 0xf1a4e, flaky)), counted_(s.length) {}

  run_result go() {
    sim_clock::reset();
    asio::io_context io;
    sim_clock::advance(uniform(rng_, 0ns, ns(1s)));  // the client starts at any phase of a second
    start_ = traced_ = sim_clock::now();
    std::vector<std::unique_ptr<client>> clients;
    for (int c = 0; c < s_.clients; ++c) {
      clients.push_back(std::make_unique<client>(io, s_));
      // Nothing changes until the adaptation is used.
      const auto configured = client::options(s_).requests;
      const auto in_force = clients.back()->limits.get_limit(weir::dimension::requests);
      if (configured.has_value() != in_force.has_value() ||
          (configured && in_force->rate.per_second != configured->rate.per_second))
        fail("constructing a server_adaptation changed its limiter's request rate from {} to {}",
             configured ? fmt::format("{:.3f}/s", configured->rate.per_second) : "none",
             in_force ? fmt::format("{:.3f}/s", in_force->rate.per_second) : "none");
    }
    if (s_.pipeline)
      drive_pipelines(io, clients);
    else
      drive_by_hand(clients);

    run_result r{std::move(counted_), {}, {}, {}, start_};
    for (std::size_t i = 0; i < r.counted.admitted.size(); ++i)
      r.expected.push_back(server_->reachable_at(buckets(i) + bucket_width / 2) *
                           std::chrono::duration<double>(bucket_width).count());
    for (auto& c : clients) {
      const auto st = c->adapt.state();
      const auto in_force = c->limits.get_limit(weir::dimension::requests);
      r.states.push_back(fmt::format(
          "paced {:.3f}/s burst {} (in force {}), ceiling {}, known {}, {}", st.rate.per_second,
          st.burst, in_force ? fmt::format("{:.3f}/s", in_force->rate.per_second) : "none",
          st.ceiling ? fmt::format("{:.3f}/s", st.ceiling->per_second) : "none",
          st.known ? fmt::format("{:.3f}/s", st.known->per_second) : "none",
          st.slow_start ? "slow start" : "holding"));
      r.decreases.push_back(c->decreases);
    }
    return r;
  }

 private:
  job next_job() {
    const auto vary = [&](double mean) {
      return static_cast<std::uint64_t>(
          std::max(1.0, mean * std::uniform_real_distribution<>(0.5, 1.5)(rng_)));
    };
    return {vary(s_.mean_input), vary(s_.mean_output)};
  }
  // WEIR_SIM_TRACE=1: the server's count and client 0's pacing every half second, to see why a
  // seed fails.
  void trace(const client& c, sim_clock::time_point now) {
    const auto from = static_cast<std::size_t>((traced_ - start_) / bucket_width);
    const auto to = static_cast<std::size_t>((now - start_) / bucket_width);
    std::uint32_t ok = 0, refused = 0;
    for (auto i = from; i < to && i < counted_.admitted.size(); ++i) {
      ok += counted_.admitted[i];
      refused += counted_.refused[i];
    }
    const auto seconds = std::chrono::duration<double>(now - traced_).count();
    const auto st = c.adapt.state();
    fmt::print(
        "  {:6.1f} s  limit {:7.2f}/s  served {:7.2f}/s  refused {:6.2f}/s  paced {:7.2f}/s "
        "ceiling {}\n",
        std::chrono::duration<double>(now - start_).count(), server_->limit_at(now - start_),
        ok / seconds, refused / seconds, st.rate.per_second,
        st.ceiling ? fmt::format("{:.2f}/s", st.ceiling->per_second) : "none");
    traced_ = now;
  }
  const bool trace_ = std::getenv("WEIR_SIM_TRACE") != nullptr;
  sim_clock::time_point traced_{};

  // Small jitter: up to 2 ms each way.
  ns half_trip() { return s_.rtt / 2 + uniform(rng_, 0ns, max_jitter); }
  ns since_start() const { return sim_clock::now() - start_; }

  reply decide(const job& j, sim_clock::time_point sent) {
    auto r = server_->decide(since_start(), j);
    counted_.note(since_start(), r.status == 200);
    // The tokens the given limit counts: the total, or the input tokens of an input limit.
    if (r.status == 200)
      counted_.note_tokens(sent - start_,
                           static_cast<double>(s_.anthropic_dims ? j.input : j.total()));
    return r;
  }

  static weir::classification judge(const reply& r) {
    return weir::http::judge_status(r.status, r.fields, {}, {}, wall_now());
  }

  // The drive loop: each client's callers send as soon as its limiter lets them; every answer is
  // observed and settled by hand, as adaptation.hpp's by-hand form does.
  void drive_by_hand(std::vector<std::unique_ptr<client>>& clients) {
    struct event {
      sim_clock::time_point at;
      std::uint64_t order;
      bool arrives;  // at the server; otherwise the answer at the client
      std::size_t who;
      job j;
      weir::usage estimate;
      sim_clock::time_point sent;
      reply answer;
      bool operator>(const event& o) const { return std::tie(at, order) > std::tie(o.at, o.order); }
    };
    std::priority_queue<event, std::vector<event>, std::greater<>> events;
    std::uint64_t order = 0;
    std::vector<std::optional<std::pair<job, weir::usage>>> next(clients.size());
    const auto end = start_ + s_.length;
    for (auto& c : clients) c->adapt.engage(sim_clock::now());
    while (sim_clock::now() < end) {
      const auto now = sim_clock::now();
      while (!events.empty() && events.top().at <= now) {
        auto e = events.top();
        events.pop();
        auto& c = *clients[e.who];
        if (e.arrives) {
          e.answer = decide(e.j, e.sent);
          e.arrives = false;
          e.at = now + e.answer.delay + half_trip();
          e.order = order++;
          events.push(std::move(e));
          continue;
        }
        --c.in_flight;
        c.adapt.observe(judge(e.answer), e.sent, now);
        if (e.answer.status == 200 && e.estimate != actual_of(e.j))
          c.limits.settle(e.estimate, actual_of(e.j), e.sent);
        c.sample(now);
        if (trace_ && e.who == 0 && now - traced_ >= 500ms) trace(c, now);
      }
      auto wake = end;
      for (std::size_t k = 0; k < clients.size(); ++k) {
        auto& c = *clients[k];
        while (c.in_flight < s_.callers) {
          if (!next[k]) {
            const auto j = next_job();
            next[k].emplace(j, estimate_of(s_, j));
          }
          if (!c.limits.try_acquire(next[k]->second, now)) {
            wake = std::min(wake, now + c.limits.time_until(next[k]->second, now));
            break;
          }
          ++c.in_flight;
          events.push(
              {now + half_trip(), order++, true, k, next[k]->first, next[k]->second, now, {}});
          next[k].reset();
        }
      }
      if (!events.empty()) wake = std::min(wake, events.top().at);
      sim_clock::advance(std::max<ns>(wake - now, 1us));
    }
  }

  // The asio pipeline: every caller is a coroutine sending through retry, limits and the
  // adaptation's stage; the call sets ctx.actual_* from the server's count, which the limits
  // settle against.
  void drive_pipelines(asio::io_context& io, std::vector<std::unique_ptr<client>>& clients) {
    int running = 0;
    std::deque<asio::cancellation_signal> signals;
    for (auto& c : clients)
      for (int i = 0; i < s_.callers; ++i) {
        ++running;
        start_caller(io, *c, running, signals.emplace_back());
      }
    // A collapsed pacing may hold callers for longer than anyone cares to wait: half a minute
    // after the run they are cancelled, and each must then end at once.
    step_through(io, s_.length + 30s);
    if (running > 0) {
      for (auto& signal : signals) signal.emit(asio::cancellation_type::terminal);
      step_through(io, 10min);
    }
    if (running > 0) {
      std::string limiters;
      for (auto& c : clients) {
        const auto st = c->adapt.state();
        limiters +=
            fmt::format("; a request waits {:.1f} s, paced {:.3f}/s",
                        c->limits.time_until({.requests = 1}).count() / 1e9, st.rate.per_second);
      }
      fail("pacing: {} callers did not end 10 minutes after they were cancelled{}\n    {}", running,
           limiters, s_.describe());
    }
  }

  struct wire_reply {
    unsigned status = 200;
    header_fields fields;
  };
  // The server's answer read as any HTTP client's: status and header pairs, at the wall time
  // the client receives it.
  struct wire_classifier {
    template <class T>
    weir::classification operator()(const weir::outcome<T>& o) const {
      if constexpr (std::is_same_v<T, wire_reply>)
        if (o.has_value())
          return weir::http::judge_status(o.value().status, o.value().fields, {}, {}, wall_now());
      return weir::default_classifier{}(o);
    }
  };
  using retry_type = weir::retry<sim_clock, wire_classifier>;

  void start_caller(asio::io_context& io, client& c, int& running,
                    asio::cancellation_signal& signal) {
    const auto stage = c.adapt.stage(wire_classifier{});
    retry_type retry({.max_attempts = s_.attempts, .seed = rng_() | 1});
    const auto spawn = [&](auto pipeline) {
      asio::co_spawn(io, caller(std::move(pipeline), c),
                     asio::bind_cancellation_slot(signal.slot(), [&running](std::exception_ptr e) {
                       --running;
                       if (e && !weir::is_cancellation(e)) std::rethrow_exception(e);
                     }));
    };
    switch (s_.retries) {
      case retry_order::none: spawn(weir::pipeline(c.limits, stage)); break;
      case retry_order::outside: spawn(weir::pipeline(retry, c.limits, stage)); break;
      case retry_order::inside: spawn(weir::pipeline(c.limits, retry, stage)); break;
    }
  }

  template <class Pipeline>
  asio::awaitable<void> caller(Pipeline pipeline, client& c) {
    const auto end = start_ + s_.length;
    while (sim_clock::now() < end) {
      const auto j = next_job();
      const auto estimate = estimate_of(s_, j);
      weir::basic_call_context<sim_clock> ctx{.tokens = s_.anthropic_dims ? 0 : estimate.tokens,
                                              .input_tokens = estimate.input_tokens,
                                              .output_tokens = estimate.output_tokens};
      auto attempt = [&]() -> asio::awaitable<wire_reply> {
        const auto sent = sim_clock::now();
        c.sample(sent);
        co_await sleep_for(half_trip());
        auto r = decide(j, sent);
        if (r.delay > 0ns) co_await sleep_for(r.delay);
        co_await sleep_for(half_trip());
        if (r.status == 200) {
          ctx.actual_input_tokens = j.input;
          ctx.actual_output_tokens = j.output;
        }
        c.sample(sim_clock::now());
        co_return wire_reply{r.status, std::move(r.fields)};
      };
      try {
        co_await pipeline(ctx, attempt);
      } catch (const weir::exception&) {
        // retries given up, or a limiter wait refused: the caller sends its next request
      }
    }
  }

  const settings& s_;
  std::mt19937_64 rng_;
  std::unique_ptr<referee> server_;
  tally counted_;
  sim_clock::time_point start_{};
};

// ---- measures and properties
// ---------------------------------------------------------------------

struct measures {
  double goodput = 0;                // admitted over the second half, as a fraction of the limit
  double refusals = 0;               // refused among answers over the second half
  ns longest_low{0};                 // the longest stretch below 50% of the limit
  std::optional<ns> worst_recovery;  // the longest return to ≥ 80% after a burst of refusals
  ns recovery_burst_at{0};
  std::optional<ns> follow_halve, follow_restore;
  std::size_t decreases_per_rtt = 0;  // the most decreases within one round trip
  double tokens_overshoot = 0;        // true tokens sent over what the given limit allows
};

inline measures measure(const settings& s, const run_result& r, const referee& server) {
  measures m;
  const auto& a = r.counted.admitted;
  const auto& f = r.counted.refused;
  const std::size_t n = a.size();
  std::vector<double> pa(n + 1), pf(n + 1), pe(n + 1);
  for (std::size_t i = 0; i < n; ++i) {
    pa[i + 1] = pa[i] + a[i];
    pf[i + 1] = pf[i] + f[i];
    pe[i + 1] = pe[i] + r.expected[i];
  }
  const auto sum = [](const std::vector<double>& p, std::size_t from, std::size_t to) {
    return p[to] - p[from];
  };
  const std::size_t half = n / 2;
  m.goodput = sum(pa, half, n) / sum(pe, half, n);
  const double answers = sum(pa, half, n) + sum(pf, half, n);
  m.refusals = answers > 0 ? sum(pf, half, n) / answers : 0;

  // Windows long enough to hold several requests and a fixed window's whole period.
  const double lowest = *std::min_element(r.expected.begin(), r.expected.end()) * 10;  // per s
  const auto w = static_cast<std::size_t>(std::clamp(std::max(2.0, 8.0 / lowest), 2.0, 8.0) * 10);
  const auto good = [&](std::size_t to, double share) {
    return sum(pa, to - w, to) >= share * sum(pe, to - w, to);
  };

  // Below 50% for how long: consecutive window ends that are low, plus the window.
  std::size_t run_start = 0;
  bool low = false;
  for (std::size_t k = w; k <= n; ++k) {
    if (!good(k, 0.5)) {
      if (!low) run_start = k, low = true;
      m.longest_low = std::max(m.longest_low, buckets(k - run_start) + buckets(w));
    } else {
      low = false;
    }
  }

  // Bursts of refusals (a window with ≥ 3 and ≥ 20% refused) and the return to ≥ 80% after.
  for (std::size_t k = w; k <= n; ++k) {
    const double refused = sum(pf, k - w, k), all = refused + sum(pa, k - w, k);
    const bool burst = refused >= 3 && refused >= 0.2 * all;
    const bool ends = burst && (k == n || [&] {
                        const double r2 = sum(pf, k + 1 - w, k + 1),
                                     all2 = r2 + sum(pa, k + 1 - w, k + 1);
                        return !(r2 >= 3 && r2 >= 0.2 * all2);
                      }());
    if (!ends) continue;
    std::size_t back = k;
    while (back <= n && !good(back, 0.8)) ++back;
    const ns recovery = buckets(back - k);
    if (back > n && buckets(n - k) < 10s) continue;  // the run ended too soon to tell
    if (!m.worst_recovery || recovery > *m.worst_recovery) {
      m.worst_recovery = recovery;
      m.recovery_burst_at = buckets(k);
    }
  }

  // Following a change: a window after it at ≥ 80% of the new limit with ≤ 10% refused.
  const auto follow = [&](ns change) -> ns {
    const auto c = static_cast<std::size_t>(change / bucket_width);
    for (std::size_t k = c + w; k <= n; ++k) {
      const double refused = sum(pf, k - w, k), all = refused + sum(pa, k - w, k);
      if (good(k, 0.8) && refused <= 0.1 * all) return buckets(k - c);
    }
    return buckets(n - c) + 1s;  // never, within the run
  };
  if (server.halve_at) m.follow_halve = follow(*server.halve_at);
  if (server.restore_at) m.follow_restore = follow(*server.restore_at);

  for (const auto& d : r.decreases) {
    std::size_t j = 0;
    for (std::size_t i = 0; i < d.size(); ++i) {
      while (d[i] - d[j] >= s.rtt) ++j;
      m.decreases_per_rtt = std::max(m.decreases_per_rtt, i - j + 1);
    }
  }

  // A given token limit bounds the true tokens its limiter lets through over the second half:
  // its rate times the span, plus its burst and what the callers already in flight carry.
  const auto& given = s.given_tokens ? s.given_tokens : s.given_input;
  if (given) {
    double sent = 0;
    for (std::size_t i = half; i < n; ++i) sent += r.counted.tokens_sent[i];
    const double span = std::chrono::duration<double>(buckets(n - half)).count();
    const double largest =
        s.anthropic_dims ? 1.5 * s.mean_input : 1.5 * (s.mean_input + s.mean_output);
    const double allowed =
        s.clients * (given->rate.per_second * span + static_cast<double>(given->burst)) +
        s.clients * s.callers * largest;
    m.tokens_overshoot = sent / allowed;
  }
  return m;
}

// ---- drawing a scenario
// --------------------------------------------------------------------------

inline double log_uniform(std::mt19937_64& rng, double low, double high) {
  return std::exp(std::uniform_real_distribution<>(std::log(low), std::log(high))(rng));
}

inline settings draw(std::mt19937_64& rng, bool through_pipeline) {
  settings s;
  s.pipeline = through_pipeline;
  const int model = pick(rng, 0, 11);
  const int twist = pick(rng, 0, 19);  // 0-10 none, 11-13 change, 14-16 flaky, 17-19 shared
  const double rate = log_uniform(rng, 2, 40);
  s.rtt = uniform(rng, 20ms, 300ms);
  s.length = twist >= 11 && twist <= 13 ? uniform(rng, 60s, 90s) : uniform(rng, 30s, 60s);
  if (s.pipeline) s.length = s.length / 2 + 10s;  // an asio run costs ten times a drive loop's
  s.length = std::chrono::duration_cast<std::chrono::seconds>(s.length);
  s.mean_input = std::round(log_uniform(rng, 50, 2000));
  s.mean_output = std::round(log_uniform(rng, 10, 500));
  s.retries = static_cast<retry_order>(pick(rng, 0, 2));
  s.attempts = s.retries == retry_order::none ? 1 : pick(rng, 2u, 4u);
  if (!s.pipeline) s.retries = retry_order::none, s.attempts = 1;
  const bool given = chance(rng, 0.4);

  // The server, as a factory so that a flaky run can be repeated without the gateway.
  bool concurrency = false;
  const bool from_first = chance(rng, 0.5);
  const ns window = chance(rng, 0.7) ? ns(1s) : ns(2s);
  const int nginx_rate = std::max(2, static_cast<int>(std::lround(rate)));
  const int nginx_burst = pick(rng, 2, 10);
  const bool whole_seconds = chance(rng, 0.5);
  const double tokens_share = chance(rng, 0.5) ? 0.5 : 2.0;  // tokens bind, or requests do
  const int workers = pick(rng, 2, 16);
  const ns service = uniform(rng, 50ms, 500ms);
  double requests_per_s = rate;
  std::function<std::unique_ptr<referee>()> make;
  switch (model) {
    case 0:
    case 1:
      requests_per_s = nginx_rate;
      if (twist >= 17) {
        // A limit with no burst cannot be shared by clients that do not coordinate: two
        // requests from two clients within one emission interval collide however each paces
        // (at 97% of the limit, only a few percent of the phases between two clients avoid it).
        // Shared, nginx gets the burst of one per client that such a zone needs; a limit with no
        // burst is shared through one limiter (weir::redis's fleet), not by pacing.
        s.model = "nginx-nodelay";
        make = [=] { return std::make_unique<nginx_limit_req>(nginx_rate, 4, false); };
        break;
      }
      s.model = "nginx-strict";
      make = [=] { return std::make_unique<nginx_limit_req>(nginx_rate, 0, false); };
      break;
    case 2:
      s.model = "nginx-delay";
      requests_per_s = nginx_rate;
      make = [=] { return std::make_unique<nginx_limit_req>(nginx_rate, nginx_burst, true); };
      break;
    case 3:
      s.model = "nginx-nodelay";
      requests_per_s = nginx_rate;
      make = [=] { return std::make_unique<nginx_limit_req>(nginx_rate, nginx_burst, false); };
      break;
    case 4:
    case 5:
    case 6:
    case 7:
    case 8: {
      // 4 legacy; 5, 6 draft-6 without and with the window; 7, 8 draft-8 without and with it.
      const auto style = model == 4   ? window_style::legacy
                         : model <= 6 ? window_style::draft6
                                      : window_style::draft8;
      const bool reports = model == 6 || model == 8;
      const int limit = std::max(2, static_cast<int>(std::lround(rate * (window / 1s))));
      requests_per_s = limit / std::chrono::duration<double>(window).count();
      static const char* names[] = {"fixed-legacy", "fixed-draft6", "fixed-draft8"};
      s.model = std::string(names[static_cast<int>(style)]) + (reports ? "-w" : "") +
                (from_first ? "-first" : "-second");
      make = [=] {
        return std::make_unique<fixed_window>(limit, window, from_first, style, reports);
      };
      break;
    }
    case 9:
      s.model = "haproxy";
      requests_per_s = nginx_rate;
      make = [=] { return std::make_unique<haproxy_sliding>(nginx_rate); };
      break;
    case 10:
    case 11: {
      if (model == 11 && chance(rng, 0.3)) {
        s.model = "concurrency";
        concurrency = true;
        requests_per_s = workers / std::chrono::duration<double>(service).count();
        make = [=] { return std::make_unique<concurrency_limit>(workers, service); };
        break;
      }
      const bool openai = model == 10;
      s.model = openai ? "openai" : "anthropic";
      s.token_server = true;
      s.anthropic_dims = !openai;
      // Over 10 s rather than a minute: a bucket that starts full holds a window's worth, which
      // must be spent well before the second half, where the steady state is measured.
      const ns refill_window = 10s;
      const double per_window = std::round(rate * 10);
      const double tokens_per_window =
          std::round(per_window * tokens_share * (s.mean_input + s.mean_output));
      const double input_per_window = std::round(per_window * tokens_share * s.mean_input);
      const double output_per_window =
          std::round(per_window * (tokens_share == 2.0 ? 2.0 : 0.7) * s.mean_output);
      const auto shape =
          openai ? refilling_limits::shape::openai : refilling_limits::shape::anthropic;
      const double mi = s.mean_input, mo = s.mean_output;
      make = [=] {
        return std::make_unique<refilling_limits>(shape, refill_window, per_window,
                                                  openai ? tokens_per_window : input_per_window,
                                                  output_per_window, mi, mo, whole_seconds);
      };
      {
        refilling_limits probe(shape, refill_window, per_window,
                               openai ? tokens_per_window : input_per_window, output_per_window, mi,
                               mo, whole_seconds);
        requests_per_s = probe.limit_at(0s);
        if (given) {
          const auto minute = [](double n, double burst) {
            return weir::limit{weir::per_second(n / 10),
                               static_cast<std::uint64_t>(std::max(1.0, burst))};
          };
          const int which = pick(rng, 0, 4);  // 0-2 both, 3 requests only, 4 tokens only
          if (which != 4) s.given_requests = weir::limit{weir::per_second(per_window / 10), 1};
          if (which != 3) {
            const double burst = chance(rng, 0.5) ? 1.0 : 0.1;
            if (openai)
              s.given_tokens = minute(tokens_per_window, burst * tokens_per_window);
            else {
              s.given_input = minute(input_per_window, burst * input_per_window);
              s.given_output = minute(output_per_window, burst * output_per_window);
            }
          }
        }
      }
      break;
    }
  }

  // Twists.
  if (twist >= 11 && twist <= 13 && !concurrency) s.model += "+change";
  if (twist >= 14 && twist <= 16) {
    s.model += "+flaky";
    s.flaky = std::uniform_real_distribution<>(0.05, 0.2)(rng);
    s.flaky_503 = chance(rng, 0.4);
  }
  if (twist >= 17) {
    s.model += "+shared";
    s.clients = pick(rng, 2, 4);
  }
  const bool changes = s.model.find("+change") != std::string::npos;
  const auto length = s.length;
  s.make_server = [make, changes, length, s_flaky_503 = s.flaky_503, sharers = s.clients](
                      std::uint64_t seed, double flaky) {
    auto server = make();
    server->sharers = sharers;
    if (changes) {
      server->halve_at = length / 3;
      server->restore_at = 2 * length / 3;
    }
    if (flaky > 0)
      return std::unique_ptr<referee>(
          std::make_unique<flaky_gateway>(std::move(server), flaky, s_flaky_503, seed));
    return server;
  };
  s.server_text = s.make_server(1, s.flaky)->describe();

  // What the client is told, for the request-only servers (the token servers drew it above).
  if (given && !s.token_server) {
    s.given_requests = weir::limit{weir::per_second(requests_per_s / s.clients), 1};
    if (chance(rng, 0.4)) {
      // A tokens limit that binds a little above the request limit at true usage (×1.3: requests
      // vary ±50%) or at estimates twice as high (×2: issue 30's refund case).
      s.tokens_factor = chance(rng, 0.5) ? 1.3 : 2.0;
      const double per_s =
          requests_per_s / s.clients * s.tokens_factor * (s.mean_input + s.mean_output);
      s.given_tokens = weir::limit{weir::per_second(per_s), 1};
    }
  } else if (given && s.clients > 1) {
    const auto share = [&](std::optional<weir::limit>& l) {
      if (l) l->rate = weir::per_second(l->rate.per_second / s.clients);
    };
    share(s.given_requests);
    share(s.given_tokens);
    share(s.given_input);
    share(s.given_output);
  }
  const bool told_tokens = s.given_tokens || s.given_input;
  if (s.token_server || told_tokens) s.estimate = static_cast<estimate_kind>(pick(rng, 1, 4));
  s.knowledge = given ? "given" : s.make_server(1, 0)->reports_limit() ? "reported" : "discovered";

  // Callers: mostly enough to send well above the limit, sometimes too few.
  const double needed =
      requests_per_s *
      std::chrono::duration<double>(s.rtt + (concurrency ? service : 0ns)).count() / s.clients;
  s.callers = pick(rng, 1, 64);
  if (chance(rng, 0.8))
    s.callers = std::max(s.callers, std::min(64, static_cast<int>(std::ceil(2 * needed))));
  return s;
}

// ---- a scenario, its properties and the report
// -----------------------------------------------------

struct report_row {
  int runs = 0, checked = 0, failed = 0;
  double goodput = 0, goodput_min = 1e9, refusals = 0, refusals_max = 0;
  std::size_t decreases_max = 0;
};

struct report {
  std::map<std::tuple<std::string, std::string, std::string>, report_row> rows;
  std::map<std::string, std::vector<std::uint64_t>> failures;  // property -> seeds
  // Failures by twist ("" for none, "+change", ...) and limit knowledge, per property.
  std::map<std::pair<std::string, std::string>, std::map<std::string, int>> by_family;
  std::vector<std::string> first_messages;

  void print() const {
    fmt::print("\n{:<30} {:<10} {:<6} {:>5} {:>7} {:>8} {:>8} {:>9} {:>8} {:>7} {:>6}\n",
               "server model", "limit", "est.", "runs", "checked", "goodput", "min", "refusals",
               "max ref", "dec/rtt", "failed");
    for (const auto& [key, r] : rows)
      fmt::print(
          "{:<30} {:<10} {:<6} {:>5} {:>7} {:>7.1f}% {:>7.1f}% {:>8.2f}% {:>7.1f}% {:>7} {:>6}\n",
          std::get<0>(key), std::get<1>(key), std::get<2>(key), r.runs, r.checked,
          100 * r.goodput / r.runs, 100 * r.goodput_min, 100 * r.refusals / r.runs,
          100 * r.refusals_max, r.decreases_max, r.failed);
    fmt::print(
        "\n(goodput and refusals over each run's second half; \"checked\": runs whose callers "
        "could send above the limit, where the properties apply)\n");
    for (const auto& [property, seeds] : failures) {
      std::string some;
      for (std::size_t i = 0; i < std::min<std::size_t>(seeds.size(), 12); ++i)
        some += fmt::format(" {}", seeds[i]);
      fmt::print("property failed {} times: {} — seeds{}\n", seeds.size(), property, some);
    }
    if (!by_family.empty()) fmt::print("\nfailures by twist and limit knowledge:\n");
    for (const auto& [family, properties] : by_family) {
      std::string line;
      for (const auto& [property, n] : properties) line += fmt::format(" {} {};", n, property);
      fmt::print("  {:<8} {:<10}{}\n", family.first.empty() ? "-" : family.first, family.second,
                 line);
    }
    for (const auto& m : first_messages) fmt::print("  {}\n", m);
  }

  // The failures by twist, knowledge and property, one per line: "<twist> <knowledge> <count>
  // <property>", the twist "-" for none. What --pacing-baseline compares against.
  std::string baseline() const {
    std::string out;
    for (const auto& [family, properties] : by_family)
      for (const auto& [property, n] : properties)
        out += fmt::format("{} {} {} {}\n", family.first.empty() ? "-" : family.first,
                           family.second, n, property);
    return out;
  }

  // Against a baseline written by baseline(): each failure count that grew past it (by more than
  // max(2, 10%), the slack of a change that moves a few seeds either way), as one line each.
  std::vector<std::string> regressions(std::istream& known) const {
    std::map<std::tuple<std::string, std::string, std::string>, int> before;
    for (std::string line; std::getline(known, line);) {
      std::istringstream in(line);
      std::string twist, knowledge, property;
      int n = 0;
      if (!(in >> twist >> knowledge >> n) || !std::getline(in >> std::ws, property)) continue;
      before[{twist, knowledge, property}] = n;
    }
    std::vector<std::string> worse;
    for (const auto& [family, properties] : by_family)
      for (const auto& [property, n] : properties) {
        const auto twist = family.first.empty() ? std::string("-") : family.first;
        const auto it = before.find({twist, family.second, property});
        const int was = it == before.end() ? 0 : it->second;
        if (n > was + std::max(2, was / 10))
          worse.push_back(fmt::format("{} {}: {} failed {} times, {} in the baseline", twist,
                                      family.second, property, n, was));
      }
    return worse;
  }
};

// Runs the pacing scenario of `seed`. A broken property throws violation, unless `collect` is
// given: then every broken property is counted there and the run goes on.
inline void scenario(std::uint64_t seed, bool verbose, report* collect) {
  std::mt19937_64 rng(seed ^ 0x9ac1e6);
  // The asio pipeline for one seed in 32: its timers cost a system call or two per step.
  const auto s = draw(rng, seed % 32 == 0);
  const auto probe = s.make_server(1, 0);
  const auto result = run(s, seed, s.flaky).go();
  const auto m = measure(s, result, *probe);

  std::optional<measures> clean;
  if (s.flaky > 0) clean = measure(s, run(s, seed, 0).go(), *probe);

  // Only where the callers could send well above the limit do the rate properties apply.
  double most = 0;
  for (double e : result.expected) most = std::max(most, e * 10);
  const double could_send = s.clients * s.callers / std::chrono::duration<double>(s.rtt).count();
  const bool demand = could_send >= 1.5 * most && probe->is_rate_limit();
  const bool discovered = s.knowledge == "discovered";
  const bool changes = probe->halve_at.has_value();

  std::vector<std::pair<std::string, std::string>> broken;  // property, details
  const auto check = [&](bool ok, std::string property, std::string details) {
    if (!ok) broken.emplace_back(std::move(property), std::move(details));
  };
  if (demand) {
    const double floor = discovered ? 0.90 : 0.95, ceiling = discovered ? 0.03 : 0.01;
    if (!changes && s.flaky == 0) {
      check(m.goodput >= floor, fmt::format("steady-state goodput >= {:.0f}%", floor * 100),
            fmt::format("goodput {:.1f}% of the limit", m.goodput * 100));
      check(m.refusals <= ceiling, fmt::format("refusals <= {:.0f}%", ceiling * 100),
            fmt::format("{:.2f}% refused", m.refusals * 100));
    }
    if (s.flaky == 0)
      check(!m.worst_recovery || *m.worst_recovery <= 10s,
            "back to >= 80% within 10 s of a burst of refusals",
            fmt::format("{:.1f} s to recover from the burst ending at +{:.1f} s",
                        m.worst_recovery ? m.worst_recovery->count() / 1e9 : 0.0,
                        m.recovery_burst_at.count() / 1e9));
    check(m.longest_low <= 10s, "never below 50% for more than 10 s",
          fmt::format("below 50% for {:.1f} s", m.longest_low.count() / 1e9));
    if (m.follow_halve)
      check(*m.follow_halve <= 10s, "a halved limit is followed within 10 s",
            fmt::format("{:.1f} s", m.follow_halve->count() / 1e9));
    if (m.follow_restore)
      check(*m.follow_restore <= 10s, "a restored limit is followed within 10 s",
            fmt::format("{:.1f} s", m.follow_restore->count() / 1e9));
    // The requests a gateway refuses at random are lost where nothing retries them, and a
    // strict server has no room to take one in a lost one's place (it would come too early after
    // the next): what the pacing answers for is the rest, at most 10% below the run without them.
    if (clean)
      check(m.goodput >= 0.9 * (1 - s.flaky) * clean->goodput,
            "random refusals cost at most 10% of goodput beyond their own share",
            fmt::format("goodput {:.1f}% with {:.0f}% refused at random, {:.1f}% without",
                        m.goodput * 100, s.flaky * 100, clean->goodput * 100));
  }
  // What the limiter promises whatever the server does: a hard invariant in every run.
  if (m.tokens_overshoot > 1.0)
    fail(
        "pacing: a token limit's debts are paid before anything else passes: true tokens sent "
        "over the second half are {:.2f}x what the given limit allows\n    {}",
        m.tokens_overshoot, s.describe());

  std::string states;
  for (const auto& st : result.states) states += "\n    pacing: " + st;
  const auto summary = fmt::format(
      "{}\n    goodput {:.1f}% of the limit, {:.2f}% refused (second half); below 50% at most "
      "{:.1f} s; worst recovery {}; follow halve {} restore {}; at most {} decreases per round "
      "trip{}{}",
      s.describe(), m.goodput * 100, m.refusals * 100, m.longest_low.count() / 1e9,
      m.worst_recovery ? fmt::format("{:.1f} s", m.worst_recovery->count() / 1e9) : "-",
      m.follow_halve ? fmt::format("{:.1f} s", m.follow_halve->count() / 1e9) : "-",
      m.follow_restore ? fmt::format("{:.1f} s", m.follow_restore->count() / 1e9) : "-",
      m.decreases_per_rtt,
      clean ? fmt::format("; without random refusals {:.1f}%", clean->goodput * 100) : "", states);
  if (verbose) fmt::print("  pacing: {}\n", summary);

  if (collect) {
    auto& row = collect->rows[{s.model, s.knowledge, name_of(s.estimate)}];
    ++row.runs;
    row.checked += demand ? 1 : 0;
    row.failed += broken.empty() ? 0 : 1;
    row.goodput += m.goodput;
    row.goodput_min = std::min(row.goodput_min, m.goodput);
    row.refusals += m.refusals;
    row.refusals_max = std::max(row.refusals_max, m.refusals);
    row.decreases_max = std::max(row.decreases_max, m.decreases_per_rtt);
    const auto twist = s.model.find('+');
    auto& family = collect->by_family[{
        twist == std::string::npos ? std::string() : s.model.substr(twist), s.knowledge}];
    for (const auto& [property, details] : broken) {
      ++family[property];
      auto& seeds = collect->failures[property];
      static const bool every_seed = std::getenv("WEIR_SIM_EVERY_FAILURE") != nullptr;
      if (seeds.size() < 2 || every_seed)
        collect->first_messages.push_back(
            fmt::format("seed {}: {}: {}\n    {}", seed, property, details, summary));
      seeds.push_back(seed);
    }
    return;
  }
  if (!broken.empty())
    fail("pacing: {}: {}\n    {}", broken.front().first, broken.front().second, summary);
}

}  // namespace pacing
