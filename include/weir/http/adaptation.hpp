// Lets the server steer a provider's rate_limits, the way TCP's congestion control steers a
// sender: it paces just under a limit it knows, finds one it does not, and reacts once to each
// congestion event.
//
//  - A limit it knows (given in the limiter, or reported with its period by the server) is paced
//    at `headroom` under it: strict servers decide in whole milliseconds and timers fire late.
//  - A limit it does not know is found by slow start: the rate doubles every round trip (every
//    few successes at least) until the first refusal, then holds just under the rate at which
//    refusals began, and after a long quiet stretch probes a little above it.
//  - A refusal is a congestion event: a 429, or a provider that says it is overloaded (Anthropic
//    529, Groq 498, OpenAI 503 Slow Down), which pauses nothing. Refusals of requests sent before the last decrease belong
//    to that decrease (one per round trip, as in TCP). An event first shrinks the burst to one;
//    at burst one it multiplies the rate by `decrease`.
//  - "Nothing left" pauses the dimension until its next unit: the whole reset for a fixed window,
//    reset / limit for a continuously refilling one (OpenAI, Anthropic). A refusal that says the
//    quota is spent also pauses requests as long as its largest hint (Retry-After included); a
//    success that says so ends slow start where it is.
//
//     weir::http::server_adaptation adapt(limits);
//     auto guarded = weir::pipeline(retry, limits, adapt.stage(weir::http::response_classifier{}));
//
// or by hand, after every response:
//
//     const auto sent = clock::now();
//     auto reply = co_await call();
//     adapt.observe(classifier(reply), sent, clock::now());
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/rate.hpp>
#include <weir/core/stage.hpp>
#include <weir/throttling/rate_limits.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>

namespace weir::http {

struct adaptation_options {
  // How far under a known limit to pace: a strict server refuses a request that comes a
  // millisecond early, and timer jitter makes some do.
  double headroom = 0.03;
  // A congestion event at burst one multiplies the request rate by this.
  double decrease = 0.8;
  // After a decrease, each success closes this fraction of the gap to the hold point.
  double recovery = 0.05;
  // Successes at the hold point without a refusal before probing above it (an unknown limit may
  // have risen, or the last refusal was bad luck), and two rounds at least since the last one.
  // Probing raises the ceiling by `probe_step`, then by three times the last step each round
  // (slow_start_round, or two round trips) that passes without a refusal once the rate has reached
  // it: slowly near where refusals began, so that a steady limit costs few, then fast, so that a
  // limit that doubled is found within seconds.
  unsigned probe_after = 16;
  double probe_step = 0.02;
  // Discovery, when the limiter has no request limit: where slow start begins, and the fewest
  // successes per doubling (more when a round trip holds more requests).
  weir::rate initial_rate = weir::per_second(2);
  std::uint64_t initial_burst = 4;  // shrunk to one by the first refusal
  unsigned slow_start_successes = 4;
  // The shortest time per doubling: a server that counts over a window (HAProxy's sliding
  // second, a fixed minute) answers a faster rate only after a while, not one round trip later.
  std::chrono::nanoseconds slow_start_round = std::chrono::seconds(1);
  weir::rate min_rate = weir::per_minute(1);
  // A learned token limit L gets a burst of L × this (it must hold the largest request).
  double burst_fraction = 0.1;
  // The period of limits reported without one (X-RateLimit-Limit, RateLimit-Limit). None by
  // default: such a limit says nothing about its rate, so the rate is left to discovery.
  std::optional<std::chrono::nanoseconds> assumed_window{};
};

// What the adaptation believes now, for dashboards and tests.
struct pacing_state {
  weir::rate rate{};                    // the request rate in force
  std::uint64_t burst = 1;              // the request burst in force
  std::optional<weir::rate> ceiling{};  // where refusals began, or the known limit
  std::optional<weir::rate> known{};    // the limit given or reported
  bool slow_start = false;              // still looking for the first refusal
};

namespace detail {

// All of server_adaptation, behind its shared pointer.
template <class Clock>
class adaptation_core {
 public:
  using time_point = typename Clock::time_point;

  // `limits` is shared, not copied: adaptation changes the limiter the calls go through. A
  // request limit configured there is the known limit; without one, the request rate is
  // discovered from `initial_rate` up. Throws weir::exception(invalid_argument) naming a bad
  // option.
  adaptation_core(rate_limits<Clock> limits, adaptation_options options)
      : limits_(std::move(limits)), options_(options) {
    validate(options);
    for (std::size_t d = 0; d < 4; ++d)
      if (auto l = limits_.get_limit(static_cast<dimension>(d))) given_[d] = l->rate.per_second;
    if (auto l = limits_.get_limit(dimension::requests)) {
      known_ = ceiling_ = l->rate.per_second;
      burst_ = l->burst;
      rate_ = hold();
    } else {
      slow_start_ = true;
      rate_ = options.initial_rate.per_second;
      burst_ = options.initial_burst;
    }
  }

  // The limiter is left as it was configured until the adaptation is first used: its stage
  // admits a call, or it observes an answer or a limit.
  void engage(time_point now) {
    if (engaged_.load(std::memory_order_acquire)) return;
    std::lock_guard lock(mutex_);
    engage_locked(now);
  }

  // Feeds one classified response to a request sent at `sent`. Returns whether its slot was
  // given back (give_back_slot).
  bool observe(const classification& c, time_point sent, time_point now) {
    std::lock_guard lock(mutex_);
    engage_locked(now);
    note_timing(sent, now);
    // An overloaded provider (Anthropic 529, Groq 498, OpenAI 503 Slow Down) says "send less"
    // as a 429 does, though nothing of the account's limit is spent: a decrease, never a pause.
    const bool refused =
        c.kind == verdict::rate_limited || c.reason.cause == refusal_cause::overloaded;
    // A refusal that says the limit has nothing left is the limit's, whoever spent it (other
    // clients sharing it, say): never noise.
    const bool spent = refused && c.hint.exhausted();
    if (spent) read_count_window(c.hint.requests, sent);
    const limit_snapshot* snapshots[4] = {&c.hint.requests, &c.hint.tokens, &c.hint.input_tokens,
                                          &c.hint.output_tokens};
    std::optional<double> reported_requests;
    for (std::size_t d = 0; d < 4; ++d)
      if (const auto reported = reported_rate(d, *snapshots[d], sent, now)) {
        if (d == 0) reported_requests = reported->per_second;
        learn_limit(static_cast<dimension>(d), reported->per_second, *snapshots[d]->limit, now,
                    reported->at_most);
      }
    if (c.kind == verdict::success && reported_requests)
      note_share(c.hint.requests, *reported_requests, now);
    if (c.hint.requests.limit && !reported_requests)
      follow_reported_count(*c.hint.requests.limit, now);
    if (refused || c.kind == verdict::success) {
      note_answer(refused, spent, sent, now);
      check_given_back(refused, sent);
    }
    const bool given_back = c.kind == verdict::retryable && c.status >= 500 && !refused &&
                            !c.hint.exhausted() && give_back_slot(sent, now);
    if (refused) {
      // The server may say when it has room again; it never says how fast to come back, so a
      // refusal is a congestion event, unless refusals have been seen not to follow the rate.
      if (sent > last_decrease_ && is_congestion(spent)) congestion_event(sent, spent, now);
    } else if (c.kind == verdict::success) {
      if (c.hint.exhausted())
        hold_here(now);  // the server is full at this rate: a warning before the refusal
      else
        grow(now);
    }
    // Pauses last, after the rate is settled for this response.
    for (std::size_t d = 0; d < 4; ++d)
      if (snapshots[d]->exhausted())
        if (auto wait = snapshots[d]->next_unit_after())
          limits_.pause_until(static_cast<dimension>(d), now + *wait);
    if (c.kind == verdict::rate_limited)
      if (auto wait = c.hint.exhausted_for()) limits_.pause_until(dimension::requests, now + *wait);
    return given_back;
  }

  // As above, for a request sent about one round trip ago.
  void observe(const classification& c, time_point now = Clock::now()) {
    std::chrono::nanoseconds rtt;
    {
      std::lock_guard lock(mutex_);
      rtt = std::chrono::nanoseconds(static_cast<std::int64_t>(srtt_));
    }
    observe(c, now - std::chrono::duration_cast<typename Clock::duration>(rtt), now);
  }

  // A request limit learned elsewhere (another member of a fleet heard it from the server):
  // taken as if this server had reported it.
  void learn_request_limit(weir::rate limit, time_point now = Clock::now()) {
    std::lock_guard lock(mutex_);
    engage_locked(now);
    learn_limit(dimension::requests, limit.per_second, 0, now);
  }

  // The request rate now in force.
  std::optional<weir::rate> request_rate() const {
    if (auto l = limits_.get_limit(dimension::requests)) return l->rate;
    return std::nullopt;
  }

  pacing_state state() const {
    std::lock_guard lock(mutex_);
    pacing_state s{.rate = weir::per_second(rate_), .burst = burst_, .slow_start = slow_start_};
    if (ceiling_) s.ceiling = weir::per_second(*ceiling_);
    if (known_) s.known = weir::per_second(*known_);
    return s;
  }

 private:
  using nanos = std::chrono::nanoseconds;

  static void validate(const adaptation_options& o) {
    const auto fail = [](const char* what) {
      throw weir::exception(error::invalid_argument, std::string("adaptation: ") + what);
    };
    if (!(o.headroom >= 0 && o.headroom < 0.5)) fail("headroom must be in [0, 0.5)");
    if (!(o.decrease > 0 && o.decrease < 1)) fail("decrease must be in (0, 1)");
    if (!(o.recovery > 0 && o.recovery <= 1)) fail("recovery must be in (0, 1]");
    if (!(o.probe_step >= 0 && o.probe_step < 1)) fail("probe_step must be in [0, 1)");
    if (o.probe_after == 0) fail("probe_after must be at least 1");
    if (o.slow_start_successes == 0) fail("slow_start_successes must be at least 1");
    if (o.slow_start_round.count() < 0) fail("slow_start_round must not be negative");
    if (o.initial_burst == 0) fail("initial_burst must be at least 1");
    if (!(o.min_rate.per_second > 0) || !std::isfinite(o.min_rate.per_second))
      fail("min_rate must be positive");
    if (!(o.initial_rate.per_second >= o.min_rate.per_second) ||
        !std::isfinite(o.initial_rate.per_second))
      fail("initial_rate must be finite and at least min_rate");
    if (!(o.burst_fraction > 0 && o.burst_fraction <= 1)) fail("burst_fraction must be in (0, 1]");
    if (o.assumed_window && o.assumed_window->count() <= 0) fail("assumed_window must be positive");
  }

  void engage_locked(time_point now) {
    if (engaged_.load(std::memory_order_relaxed)) return;
    apply(now);
    engaged_.store(true, std::memory_order_release);
  }

  // Just under the ceiling, and under this client's share of a limit others spend too.
  double hold() const { return std::min(*ceiling_, share_cap_) * (1 - options_.headroom); }

  // Others spending the same limit show in what it has left: between two of this client's
  // answers it falls by what everyone sent (plus what refilled meanwhile, for a bucket that
  // refills continuously). This client's part of that fall is its share of the limit, and the
  // reported limit times that share caps its pace: in proportion, so that clients that each do
  // this sum to the whole limit (each scales by limit / what all send), where each alone would
  // pace at all of it and refusals would sort them out.
  void note_share(const limit_snapshot& s, double limit_per_second, time_point now) {
    if (!s.remaining || !s.limit || *s.limit <= 0) return;
    const auto remaining = *s.remaining, limit = *s.limit;
    if (remaining < 0 || remaining > limit) return;  // a snapshot no server sends
    // A limit that changed between two answers counts its units anew: the pair says nothing.
    if (last_remaining_ && limit == last_limit_) {
      const double elapsed = std::chrono::duration<double>(now - last_remaining_at_).count();
      double spent = static_cast<double>(*last_remaining_ - remaining);
      const bool continuous = s.refill == refill::continuous;
      if (continuous) spent += limit_per_second * elapsed;
      // A window that opened between the two answers (the count jumps back up) measures nothing;
      // a small rise is two answers that crossed on the way, and counts, or the fall after it
      // would count twice. A bucket with more than half its units left binds nobody, whoever
      // else uses it: counted as this client's alone, so that a share measured while the
      // limit was contended fades once it is not (and a full bucket, refilling nothing, is not
      // read as others' use).
      const bool reopened = remaining > *last_remaining_ + std::max<std::int64_t>(2, limit / 4);
      if (continuous && 2 * remaining > limit) spent = 1;
      if (!reopened && elapsed >= 0) {
        share_mine_ = share_mine_ * share_decay + 1;
        share_all_ = share_all_ * share_decay + spent;
      }
    }
    last_remaining_ = remaining;
    last_limit_ = limit;
    last_remaining_at_ = now;
    const double share = share_all_ > 0 ? std::clamp(share_mine_ / share_all_, 0.02, 1.0) : 1.0;
    // Alone, the share reads about one: noise there must not cost the last percent of goodput.
    const double cap =
        share < 0.85 ? limit_per_second * share : std::numeric_limits<double>::infinity();
    share_cap_ = cap;
    if (ceiling_ && !slow_start_ && rate_ > hold()) {
      rate_ = hold();
      apply(now);
    }
  }
  static constexpr double share_decay = 0.95;  // about the last twenty answers

  // A rate read from a server's answer, and the highest its rounding allows.
  struct reported_limit {
    double per_second, at_most;
  };

  // The rate a snapshot reports, per second, when its period is known: said (the IETF policy's
  // w), inferred (a continuously refilling limit gives back limit − remaining in `reset`, so its
  // window is reset × limit / (limit − remaining)), or assumed by the options.
  std::optional<reported_limit> reported_rate(std::size_t d, const limit_snapshot& s,
                                              time_point sent, time_point now) {
    if (!s.limit || *s.limit <= 0) return std::nullopt;
    std::optional<nanos> window = s.window;
    if (!window && s.refill == refill::continuous && s.remaining && *s.remaining < *s.limit &&
        s.reset_after && s.reset_after->count() > 0) {
      const auto outstanding = static_cast<double>(*s.limit - *s.remaining);
      if (s.reset_rounded_to)
        bound_rounded_window(d, s, outstanding, sent, now);
      else
        infer_window(d, s, outstanding, now);
    }
    std::optional<nanos> shortest;
    if (!window && inferred_[d].outstanding > 0)
      window = inferred_[d].window, shortest = inferred_[d].shortest;
    if (!window && rounded_[d].trusted)
      window =
          nanos(static_cast<std::int64_t>(std::min(rounded_[d].shortest_ns, longest_window_ns)));
    if (!window && s.refill != refill::continuous && s.reset_after && s.reset_after->count() > 0)
      window = resets_[d].window(*s.reset_after, s.reset_is_instant, now);
    if (!window && d == 0) window = count_window_;
    if (!window) window = options_.assumed_window;
    if (!window || window->count() <= 0) return std::nullopt;
    const auto per = [&](nanos w) {
      return w.count() > 0
                 ? static_cast<double>(*s.limit) / std::chrono::duration<double>(w).count()
                 : std::numeric_limits<double>::infinity();
    };
    return reported_limit{per(*window), per(shortest.value_or(*window))};
  }

  // A server error that a gateway in front of the limit answered (a flaky proxy's 502 or 503)
  // did not spend the limit: its slot is given back, to be used at once instead of lost (a
  // tenth of the goodput behind a gateway failing a tenth), if the answer came before the next
  // request went (rate_limits::give_back). Whether this server's errors are counted after all
  // is learned from the first answer to a request sent after a slot was given back: refused
  // twice, and as often as not, they are, and no slot is given back again.
  bool give_back_slot(time_point sent, time_point now) {
    if (given_back_.counted) return false;
    if (!limits_.give_back(dimension::requests, 1, sent, now)) return false;
    if (!std::exchange(given_back_.checking, true)) given_back_.at = now;
    return true;
  }

  void check_given_back(bool refused, time_point sent) {
    auto& g = given_back_;
    if (!g.checking || sent < g.at) return;
    g.checking = false;
    ++(refused ? g.refused : g.free);
    g.counted = g.refused >= 2 && g.refused >= g.free;
  }

  // A bare count (X-RateLimit-Limit with neither window nor reset, as HAProxy sends it) that
  // refuses with nothing left when this client alone sent that many over the last 0.5-1.5 s
  // counts per second: its window held them all, so it is about a second (a burst, sent in less
  // than half of one, proves nothing). A second is taken, and a longer window allows less than
  // the rate read, which refusals then find, as under any known limit. Before, a pause per
  // refusal (Retry-After 1) while the ceiling came down by what each window counted cost 10-17%
  // of a real HAProxy's limit.
  void read_count_window(const limit_snapshot& s, time_point sent) {
    if (count_window_ || !s.limit || s.window || s.reset_after || *s.limit <= 0 ||
        *s.limit >= static_cast<std::int64_t>(sends_.size()))
      return;
    const auto at = weir::detail::to_nanos(sent);
    constexpr weir::detail::nanos half_second = 500'000'000, one_and_a_half = 1'500'000'000;
    // The count's requests before the refused one (which made one more) were sent within the
    // last 1.5 s, and not all within the last 0.5 s.
    std::int64_t within_half = 0, within_one_and_a_half = 0;
    for (const auto t : sends_) {
      if (t == 0 || t >= at) continue;
      if (t > at - half_second) ++within_half;
      if (t >= at - one_and_a_half) ++within_one_and_a_half;
    }
    if (within_half < *s.limit && within_one_and_a_half >= *s.limit)
      count_window_ = std::chrono::seconds(1);
  }

  // A request limit reported as a bare count (X-RateLimit-Limit with no window, as HAProxy or a
  // fixed window with no reset sends it) says nothing of its rate, but a count that changes says
  // by how much the rate did: a limit halved mid-run is followed at once, where refusals would
  // take several decreases (and a limit restored, at recovery's pace instead of probing's). A
  // new count is believed once two answers in a row report it.
  void follow_reported_count(std::int64_t count, time_point now) {
    if (count <= 0) return;
    if (count != latest_count_) {
      latest_count_ = count;
      return;
    }
    const auto before = std::exchange(followed_count_, count);
    if (before == 0 || before == count || slow_start_ || !ceiling_) return;
    const double ratio = static_cast<double>(count) / static_cast<double>(before);
    // A known limit moves as if the server had named the new rate; a discovered ceiling, alone.
    if (known_) return learn_limit(dimension::requests, *known_ * ratio, 0, now);
    ceiling_ = *ceiling_ * ratio;
    probe_step_ = 0;
    if (rate_ > hold()) {
      rate_ = hold();
      apply(now);
    }
  }

  // The sample with the most units outstanding measures the window most precisely, and it
  // stands while it holds: its units come back by its own reset, so it expires then, and a later
  // sample with far fewer outstanding than it allows proves it wrong (one answer that says
  // "remaining 0, reset 24 h" among ordinary ones must not hold the pace down). A reset is only
  // as good as the unit it is written in: one of under two units says nothing (a generous bucket,
  // nearly full, says "1ms" for one unit out of a million a minute, which read as a window of
  // 1 000 s), and one of under twenty is used only until a finer one comes, which then stands
  // after it expires ("10ms" for one unit of 6 000 a minute reads the minute to within 10%).
  void infer_window(std::size_t d, const limit_snapshot& s, double outstanding, time_point now) {
    const auto precision = s.reset_precision.value_or(nanos(0));
    if (*s.reset_after < 2 * precision) return;
    const bool precise = *s.reset_after >= 20 * precision;
    auto& best = inferred_[d];
    if (!precise && best.precise && best.outstanding > 0) return;
    const double expected = best.outstanding_at(now);
    if (precise == best.precise && outstanding < expected && outstanding + 1 >= expected / 2)
      return;
    const auto window_ns = [&](nanos reset) {
      return nanos(static_cast<std::int64_t>(
          std::min(static_cast<double>(reset.count()) * static_cast<double>(*s.limit) / outstanding,
                   longest_window_ns)));
    };
    best = {outstanding,
            now,
            now + *s.reset_after,
            window_ns(*s.reset_after),
            precise,
            window_ns(*s.reset_after - precision)};
  }

  // A reset rounded up to whole seconds (Anthropic's) bounds the window from above: counted from
  // the send (a moment was named after it) with one unit less outstanding (remaining may be
  // rounded down), no read is shorter than the truth, so the shortest of all reads is the
  // closest. While a bucket drains one lands just under a whole second and reads within a few
  // percent; a pace under the limit never drains it again to read better. Before a read of ten
  // roundings or more, the bound is not used: a nearly full bucket that says "1 s" may be 50 ms
  // from full, and alone it reads a window 20 times too long.
  void bound_rounded_window(std::size_t d, const limit_snapshot& s, double outstanding,
                            time_point sent, time_point now) {
    if (outstanding < 2) return;
    const auto reset =
        *s.reset_after +
        (s.reset_is_instant ? std::chrono::duration_cast<nanos>(now - sent) : nanos(0));
    const double bound =
        static_cast<double>(reset.count()) * static_cast<double>(*s.limit) / (outstanding - 1);
    auto& r = rounded_[d];
    r.shortest_ns = r.shortest_ns > 0 ? std::min(r.shortest_ns, bound) : bound;
    r.trusted = r.trusted || *s.reset_after >= 10 * *s.reset_rounded_to;
  }

  void learn_limit(dimension dim, double per_second, std::int64_t per_window, time_point now,
                   std::optional<double> at_most = std::nullopt) {
    // A limit the user gave is a cap the server's word can lower but not raise: it may be this
    // client's share of a limit the server reports whole. A word as rounded as a reset of a few
    // milliseconds (26.1 ms written "27ms", 3% of a window) lowers it only past its rounding.
    if (const auto& given = given_[static_cast<std::size_t>(dim)])
      per_second = *given <= at_most.value_or(per_second) ? *given : per_second;
    if (dim != dimension::requests) {
      const auto paced = per_second * (1 - options_.headroom);
      const auto current = limits_.get_limit(dim);
      if (current && std::abs(current->rate.per_second - paced) <= 0.01 * paced) return;
      // Bounded before the cast: a double past 2⁶⁴ cast to an integer is undefined behaviour.
      const auto burst = static_cast<std::uint64_t>(
          std::clamp(static_cast<double>(per_window) * options_.burst_fraction, 1.0, 0x1p62));
      // The server's bucket, which the burst stands for, was at most empty: a burst cut by its
      // report (a tenth of its window) is not owed back (a tokens burst of ten seconds, spent,
      // then cut to one, held every call back nine seconds while the server's bucket refilled).
      limits_.set_limit(dim, {weir::per_second(paced), burst}, now, spent_burst::forgiven);
      return;
    }
    if (known_ && std::abs(*known_ - per_second) <= 0.01 * per_second) return;
    const std::optional<double> before = std::exchange(known_, per_second);
    probe_step_ = 0;
    if (slow_start_ || !before || !ceiling_) {
      slow_start_ = false;
      ceiling_ = per_second;  // the server's word is the ceiling
      rate_ = hold();
      apply(now);
      return;
    }
    // A limit that moved moves the ceiling in proportion, not to itself: the ceiling may be this
    // client's share of a limit others spend too, which the server's figure says nothing about.
    // A limit that rose is climbed to by recovery (a few percent of the gap per success); one
    // that fell holds at once.
    ceiling_ = std::min(per_second, *ceiling_ * per_second / *before);
    if (rate_ > hold()) {
      rate_ = hold();
      apply(now);
    }
  }

  // Refusals that do not follow the rate (a flaky gateway's 429s) are told apart from congestion
  // as TCP's loss-based control cannot: each decrease is judged by the answers to the requests
  // sent after it. Congestion refusals fall when the rate does (or the share of successes rises);
  // if they go on as before, they were noise: the decrease is undone, and refusals up to that
  // share are no congestion event from then on. A lockout (most answers refusals) is always
  // congestion. While discovering, the pace goes on falling at each refusal while a decrease is
  // judged (it may still be above the limit), so the answers are counted from the first decrease
  // and compared with the pace before it.
  void note_answer(bool refused, bool spent, time_point sent, time_point now) {
    if (verdict_.pending && sent > verdict_.since) {
      ++verdict_.answers;
      verdict_.refusals += refused ? 1 : 0;
      verdict_.spent += spent ? 1 : 0;
      const double share = verdict_.refusals / static_cast<double>(verdict_.answers);
      // Too few answers to tell a share that fell from one that did not: wait for more, up to
      // 64, unless most are refusals (a lockout is congestion at once). While discovering, a
      // share that did not fall is judged only on as many answers (a few answers at a low
      // rate, read as noise, put the pace back above a limit).
      const bool conclusive = verdict_.refusals_before * verdict_.answers >= 3 ||
                              (share >= verdict_.refusals_before && !verdict_.discovering) ||
                              verdict_.answers >= 64;
      if ((verdict_.answers >= verdict_.needed && conclusive) ||
          (verdict_.answers >= 4 && share >= 0.5))
        judge(share, now);
    }
    ++answers_;
    answer_bits_ = (answer_bits_ << 1) | (refused ? 1u : 0u);
    answers_seen_ = std::min<unsigned>(answers_seen_ + 1, 32);
    // What is no longer seen fades: a gateway that stopped failing.
    if (!refused && recent_refusals() < noise_) noise_ -= (noise_ - recent_refusals()) / 256;
    if (!known_) guard_against_collapse(refused, now);
  }

  // Discovering, each decrease is judged on few answers, and a flaky gateway's refusals read as
  // congestion now and then: decrease after decrease, the pace fell to a few percent of the limit
  // (a strict 20/s behind 10-20% random 429s: 0.1-0.6/s) and stayed there, refused as often as
  // ever. The check over them: the most successes per second any 16 answers got through since
  // slow start is remembered with the pace they were sent at. Once the last 16 were sent at under
  // a third of that pace and a tenth or more are still refused, the refusals do not follow the
  // rate (a limit that passed that many passes all of a third as many): noise. Back to that pace,
  // and refusals up to their share no longer count as congestion. Unless the limit did fall that
  // far: the pace restored is then refused as a lockout (in its first 16 answers), and what was
  // remembered and learned is undone. Sixteen, not 32: a slow limit (4/s) takes eight seconds to
  // answer 32, and the pace fell to a few tenths of a request a second before any check, too slow
  // to answer 32 again within a minute (simulation: a sixth fewer runs behind a flaky gateway
  // fall below half the limit for 10 s; ten answers instead of 16 read worse).
  void guard_against_collapse(bool refused, time_point now) {
    if (restore_check_) {
      ++restore_check_->answers;
      restore_check_->refusals += refused ? 1 : 0;
      if (restore_check_->answers < 16) return;
      if (restore_check_->refusals >= congestion_share * restore_check_->answers) {
        best_ = {};
        noise_ = restore_check_->noise_before;
      }
      restore_check_.reset();
    }
    constexpr unsigned counted = 16;
    if (slow_start_ || answers_seen_ < counted || !ceiling_) return;
    if (!held_since_) held_since_ = weir::detail::to_nanos(now);
    const auto oldest = sends_[(next_send_ + sends_.size() - counted) % sends_.size()];
    const auto span = weir::detail::to_nanos(now) - oldest;
    // Answers to slow start's overshoot are no measure: a server's burst let them through.
    if (oldest < *held_since_ || span <= 0) return;
    const double share = refusals_among(counted);
    // The pace they were sent at.
    const double answered = counted * 1e9 / static_cast<double>(span);
    if (answered * (1 - share) >= best_.delivered) {
      best_ = {answered, answered * (1 - share), *ceiling_};
      return;
    }
    if (answered >= best_.rate / 3 || rate_ >= best_.rate / 3 || share < 0.1 ||
        share >= congestion_share)
      return;
    restore_check_ = answers_since{.noise_before = noise_};
    noise_ = std::max(noise_, share);
    verdict_.pending = false;
    ceiling_ = best_.ceiling;
    rate_ = best_.rate;
    apply(now);
  }

  // The share of refusals at the pace now: among the last 32 answers, or what the last decrease
  // judged congestion left, while fewer answers than that came since.
  double refusals_at_pace() const {
    if (answers_ - share_at_pace_.answer < 32)
      return std::max(recent_refusals(), share_at_pace_.share);
    return recent_refusals();
  }

  // The share of refusals among the last 32 answers (successes and refusals).
  double recent_refusals() const { return refusals_among(32); }

  // The share of refusals among the last `n` answers (at most 32), or as many as were seen.
  double refusals_among(unsigned n) const {
    n = std::min(n, answers_seen_);
    if (n == 0) return 0;
    const auto mask = n >= 32 ? 0xffffffffu : (1u << n) - 1;
    return std::popcount(answer_bits_ & mask) / static_cast<double>(n);
  }

  // Whether a refusal (of a request sent after the last decrease) is a congestion event: not
  // within the noise learned, and under a known limit not while a decrease is judged. While
  // discovering, slow start at a low rate meets a flaky gateway's refusals long before the limit:
  // one or two among the last eight answers do not end it (past a strict limit, every other
  // request is refused), unless the server said it had nothing left.
  bool is_congestion(bool spent) const {
    if (known_) return !verdict_.pending && (spent || !within_noise());
    if (spent) return true;
    const int refused_of_eight = std::popcount(answer_bits_ & 0xffu);
    return !within_noise() && !(slow_start_ && refused_of_eight < 3);
  }

  // A lockout's share is never noise, whatever noise was learned.
  bool within_noise() const {
    const double recent = recent_refusals();
    return noise_ > 0 && recent <= noise_ + std::max(0.05, noise_) && recent < congestion_share;
  }

  // A share of refusals that no flaky gateway shows, and congestion often does: a strict limit
  // (nginx's, no burst) refuses every other request of any pace between it and twice it, so
  // a decrease that stays above it leaves the share at a half.
  static constexpr double congestion_share = 0.4;

  // Half-way between the share of refusals each cause predicts at the pace now: noise leaves it
  // where it was; a limit passes as many as before while the pace stays above it, so at a pace k
  // times lower its share of successes is k times higher. While discovering, refusals are noise
  // only at this share or above, and never when they fell at all: a decrease that stays above a
  // limit leaves them only a little fewer (38% of a pace 1.5 times the limit, 20% after a
  // decrease of a fifth), which the rule of a known limit (successes up 8%) read as noise,
  // holding the pace above the limit. Nor are fewer than three refusals: too few to tell. Nor
  // the refusals that ended slow start: a limit with a burst (nginx's `burst=10 nodelay`) lets
  // slow start run to twice it, and refills while the pace falls, so the refusals after the
  // decrease are as many as before it; undone, slow start overshot again, decrease after decrease.
  double closer_to_congestion() const {
    const double before = verdict_.refusals_before;
    const double slowed_by = verdict_.rate / rate_;
    const double if_congestion = std::max(0.0, 1 - (1 - before) * slowed_by);
    return (before + if_congestion) / 2;
  }

  void judge(double share_after, time_point now) {
    verdict_.pending = false;
    const double success_before = 1 - verdict_.refusals_before;
    const double success_after = 1 - share_after;
    const bool followed_the_rate =
        share_after >= congestion_share || verdict_.refusals_before >= congestion_share ||
        success_after > success_before * 1.08 + 0.01 ||
        (verdict_.discovering &&
         (verdict_.slow_start ||
          share_after < std::max(verdict_.refusals_before, closer_to_congestion()) ||
          verdict_.refusals < 3)) ||
        2 * verdict_.spent >= verdict_.refusals;
    if (followed_the_rate) {
      noise_ = std::min(noise_, share_after);  // what is left after a decrease bounds the noise
      share_at_pace_ = {share_after, answers_};
      return;
    }
    noise_ = std::max(noise_, share_after);
    // Undone, but never above a limit the server reported since (it fell meanwhile).
    ceiling_ = verdict_.ceiling && known_ ? std::min(*verdict_.ceiling, *known_) : verdict_.ceiling;
    slow_start_ = verdict_.slow_start;
    rate_ =
        std::max(rate_, ceiling_ && !slow_start_ ? std::min(verdict_.rate, hold()) : verdict_.rate);
    apply(now);
  }

  // A refusal of a request sent after the last decrease: one congestion event.
  void congestion_event(time_point sent, bool spent, time_point now) {
    const auto quiet_since = since_decrease(now);
    last_decrease_ = now;
    quiet_ = 0;
    const double step = std::exchange(probe_step_, 0.0);
    if (burst_ > 1) {
      burst_ = 1;  // a burst the server does not allow: shrink it before touching the rate
      apply(now);
      return;
    }
    double at_send = std::min(rate_, rate_at(sent));  // the rate it was refused at
    // A window that refused and paused (HAProxy's sliding second: Retry-After 1, nothing left)
    // judged what it saw, not the rate in force: after the pause the pace comes back at full
    // rate, and the window fills in less than a second. Its ceiling is what it counted, under a
    // known limit too: one that fell (halved) is found in one step, not in five of a decrease.
    if (!slow_start_ && spent)
      if (const auto seen = seen_rate_before(sent)) at_send = std::min(at_send, *seen);
    // An isolated refusal at the hold point of a known limit is the network's jitter bringing
    // two requests closer than the server allows, not a lower limit: a step of one headroom
    // answers it, where a full decrease would cost a tenth of the goodput each time. A second
    // refusal soon after is congestion as usual, unless refusals stay rare (2 of the last 32
    // answers): a fast strict limit refuses a few of any pace close to it.
    const auto quiet_for =
        std::max(nanos(std::chrono::seconds(2)), nanos(static_cast<std::int64_t>(16 * srtt_)));
    const bool rare = answers_seen_ >= 32 && recent_refusals() <= 2.0 / 32;
    if (known_ && !spent && !slow_start_ && ceiling_ && at_send <= hold() * 1.001 && quiet_since &&
        (*quiet_since > quiet_for || rare)) {
      // Jitter that recurs is the network's: the lower ceiling stands longer each time.
      ceiling_ = std::max(*ceiling_ * (1 - options_.headroom / 4), *known_ * 0.9);
      patience_ = std::min(16u, patience_ * 2);
      rate_ = std::max(options_.min_rate.per_second, at_send * (1 - options_.headroom));
      apply(now);
      return;
    }
    // A first probe refused, even by a server that says it has nothing left (each such refusal
    // costs a pause): the limit is where it was. Back to the hold point, and the next probe waits
    // twice as long (up to four times, twice below a ceiling that held before, where the limit
    // may come back), so that a steady limit is seldom overshot.
    if (step > 0 && step <= options_.probe_step && ceiling_) {
      ceiling_ = *ceiling_ / (1 + step);
      patience_ = std::min(below_held() ? 2u : 4u, patience_ * 2);
      rate_ = std::min(rate_, hold() * (1 - options_.headroom));
      apply(now);
      return;
    }
    if (!verdict_.pending)
      verdict_ = {.pending = true,
                  .rate = rate_,
                  .ceiling = ceiling_,
                  .slow_start = slow_start_,
                  .since = now,
                  .refusals_before = refusals_at_pace(),
                  .needed = known_ ? static_cast<unsigned>(std::clamp(rate_ * 2, 8.0, 32.0)) : 32u,
                  .discovering = !known_};
    // Slow start found where refusals begin. After it, a refusal at the hold point says the
    // ceiling was about right, not that it is a headroom lower: setting it to the refused rate
    // each time ratcheted it down by the headroom per refusal, for good. Unless the server said
    // the limit was spent: at the hold point, under the limit, someone else spends it too (a
    // limit shared with other clients), and this client's share is lower.
    double ceiling = at_send;
    if (!slow_start_ && ceiling_ && !spent)
      ceiling = std::min(*ceiling_, at_send / (1 - options_.headroom));
    ceiling_ = known_ ? std::min(*known_, ceiling) : ceiling;
    slow_start_ = false;
    patience_ = 1;
    rate_ = std::max(options_.min_rate.per_second, at_send * options_.decrease);
    apply(now);
  }

  // Stops slow start where it is; the rate holds, just under the ceiling this sets.
  void hold_here(time_point now) {
    if (!slow_start_) return;
    slow_start_ = false;
    ceiling_ = known_ ? std::min(*known_, rate_) : rate_;
    rate_ = hold();
    apply(now);
  }

  // The time since the last decrease; none before the first (time_point::min() must not be
  // subtracted from: it overflows).
  std::optional<nanos> since_decrease(time_point now) const {
    if (last_decrease_ == time_point::min()) return std::nullopt;
    return std::chrono::duration_cast<nanos>(now - last_decrease_);
  }

  // Only a rate that is used is tested by the server: an idle client learns nothing about the
  // rates above what it sends.
  bool sending(double share) const { return sent_rate_ == 0 || sent_rate_ >= share * rate_; }

  void grow(time_point now) {
    if (slow_start_) {
      if (!sending(0.4)) return;
      const double round = std::max(srtt_, static_cast<double>(options_.slow_start_round.count()));
      const double per_round =
          std::max(static_cast<double>(options_.slow_start_successes), rate_ * round * 1e-9);
      double next = rate_ * std::exp2(1.0 / per_round);
      if (known_ && next >= *known_ * (1 - options_.headroom)) {
        slow_start_ = false;
        ceiling_ = known_;
        next = hold();
      }
      rate_ = next;
      apply(now);
      return;
    }
    probe(now);
    const double target = hold();
    if (rate_ < target) {
      // Under a known limit, when the last eight answers were successes, at least half the gap
      // closes each second: a slow limit gets few successes, and at a twentieth of the gap
      // each, one at 2/s would take 20 s to come back. Refusals still coming (a limit that
      // fell) keep the slow pace, or the rate would be back where it was refused at once.
      const bool refusals_stopped = (answer_bits_ & 0xffu) == 0;
      const double recovery = (known_ || below_held()) && refusals_stopped
                                  ? std::max(options_.recovery, 1 - std::exp2(-1 / rate_))
                                  : options_.recovery;
      rate_ += (target - rate_) * recovery;
      if (target - rate_ < target * 1e-3) rate_ = target;
      apply(now);
    }
  }

  // Under a ceiling that held before: a limit that fell, and may come back.
  bool below_held() const { return held_ceiling_ > *ceiling_ * 1.2; }

  // Raises the ceiling once the hold point has held for `probe_after` successes in use, and
  // again each round the raised one holds.
  void probe(time_point now) {
    if (known_ && *ceiling_ >= *known_) return;
    if (rate_ < hold() * 0.98 || !sending(0.8)) return;
    const auto round =
        std::max(options_.slow_start_round, nanos(static_cast<std::int64_t>(2 * srtt_)));
    if (probe_step_ == 0) {
      // Under a limit the user gave, a probe climbs no higher than it, so it may come sooner:
      // after a second's successes (four at least) rather than sixteen, which a slow limit
      // (2/s) takes eight seconds to give, too long to follow a limit that was restored. So
      // does one below a ceiling that held before (a limit that fell may come back).
      const double successes = given_[0] || below_held()
                                   ? std::min<double>(options_.probe_after, std::max(4.0, rate_))
                                   : options_.probe_after;
      if (++quiet_ < successes * patience_ ||
          since_decrease(now).value_or(nanos::max()) < 2 * round * patience_)
        return;
      probe_step_ = options_.probe_step;
      held_ceiling_ = std::max(held_ceiling_, *ceiling_);
    } else {
      if (now - last_probe_ < round) return;
      probe_step_ = std::min(0.5, 3 * probe_step_);
    }
    last_probe_ = now;
    ceiling_ = *ceiling_ * (1 + probe_step_);
    if (known_) ceiling_ = std::min(*ceiling_, *known_);
    rate_ = hold();  // a probe is a step, tested for a round; recovery would take several
    apply(now);
  }

  // Round-trip time and the rate requests are actually sent at, both smoothed.
  void note_timing(time_point sent, time_point now) {
    sends_[next_send_] = weir::detail::to_nanos(sent);
    next_send_ = (next_send_ + 1) % sends_.size();
    const double rtt = static_cast<double>(std::chrono::duration_cast<nanos>(now - sent).count());
    if (rtt >= 0) srtt_ = srtt_ == 0 ? rtt : srtt_ + 0.125 * (rtt - srtt_);
    const auto at = weir::detail::to_nanos(now);
    if (last_response_ != 0) {
      const double gap = static_cast<double>(std::max<weir::detail::nanos>(0, at - last_response_));
      gap_ = gap_ == 0 ? gap : gap_ + 0.1 * (gap - gap_);
      if (gap_ > 0) sent_rate_ = 1e9 / gap_;
    }
    last_response_ = at;
  }

  // The rate the server saw in the second before `sent`, counted from the answers (those sent
  // before a request are mostly answered before it): what a window that refused it counted.
  // None when more were sent in that second than are remembered.
  std::optional<double> seen_rate_before(time_point sent) const {
    const auto at = weir::detail::to_nanos(sent);
    constexpr weir::detail::nanos window = 1'000'000'000;
    std::size_t in_window = 0;
    bool older_seen = false;
    for (const auto t : sends_) {
      if (t == 0 || t > at) continue;
      if (t > at - window)
        ++in_window;
      else
        older_seen = true;
    }
    // Too few to count by (a slow limit): one more or less would move it by more than an eighth.
    if (!older_seen || in_window < 8) return std::nullopt;
    return static_cast<double>(in_window);
  }

  // The rate that was in force at `t` (the oldest remembered one if `t` is older).
  double rate_at(time_point t) const {
    const auto at = weir::detail::to_nanos(t);
    double rate = rate_;
    for (std::size_t k = 0; k < history_.size(); ++k) {
      const auto& h = history_[(next_history_ + history_.size() - 1 - k) % history_.size()];
      if (h.rate == 0) break;
      rate = h.rate;
      if (h.since <= at) break;
    }
    return rate;
  }

  void apply(time_point now) {
    rate_ = std::max(rate_, options_.min_rate.per_second);
    limits_.set_limit(dimension::requests, {weir::per_second(rate_), burst_}, now);
    history_[next_history_] = {weir::detail::to_nanos(now), rate_};
    next_history_ = (next_history_ + 1) % history_.size();
  }

  // A decrease waiting to be judged by the answers to the requests sent after it.
  struct pending_verdict {
    bool pending = false;
    double rate = 0;
    std::optional<double> ceiling{};
    bool slow_start = false;
    time_point since{};          // the decrease
    double refusals_before = 0;  // the share of refusals among recent answers at the decrease
    unsigned needed = 0, answers = 0, refusals = 0;
    unsigned spent = 0;  // refusals that said the limit had nothing left
    bool discovering = false;
  };
  // A window inferred from one sample: `outstanding` units at `taken`, all back by `returned`.
  struct window_estimate {
    double outstanding = 0;
    time_point taken{}, returned{};
    nanos window{0};
    bool precise = false;  // a reset of twenty units of its writing or more
    nanos shortest{0};     // the window had the reset been a unit of its writing shorter

    double outstanding_at(time_point now) const {
      if (outstanding <= 0 || now >= returned) return 0;
      const auto left = std::chrono::duration<double>(returned - now).count();
      const auto whole = std::chrono::duration<double>(returned - taken).count();
      return whole > 0 ? outstanding * std::min(1.0, left / whole) : 0;
    }
  };
  // The window of a limit that opens anew (a fixed window, or a bucket's whole refill), from
  // the resets its answers report.
  struct window_from_resets {
    // Resets sent as delays: the first answer after a window opens reports its whole length (to
    // within one rounding up), so the window is the longest reset seen over the last two spans
    // of two windows each; one that shortens is followed within four of the old ones.
    nanos longest_now{0}, longest_before{0};
    time_point since{};
    // Resets sent as moments: every answer in a window names the same one, and the next window
    // a moment at least one window later. The step between them is the window, or longer: idle
    // time between windows, a window that begins only at the first request after the last one
    // ended (Flask-Limiter's, most in-memory stores'), and moments rounded up to whole seconds
    // make a 1 s window step by 1 s or 2 s. So the window is the shortest of the last steps,
    // never the latest: a 2 s step read as the window halved the rate.
    std::optional<time_point> named{};
    std::array<nanos, 4> steps{};
    std::size_t next_step = 0;

    std::optional<nanos> window(nanos reset, bool instant, time_point now) {
      if (instant) {
        const auto moment = now + reset;
        constexpr nanos same_moment = std::chrono::milliseconds(500);
        if (named && moment - *named > same_moment)
          steps[next_step++ % steps.size()] = moment - *named;
        if (!named || moment - *named > same_moment || *named - moment > same_moment)
          named = moment;  // a new window, or the first, or a server clock set back
        std::optional<nanos> shortest;
        for (const auto step : steps)
          if (step.count() > 0 && (!shortest || step < *shortest)) shortest = step;
        return shortest;
      }
      if (now - since > 2 * std::max(longest_now, longest_before)) {
        longest_before = std::exchange(longest_now, nanos(0));
        since = now;
      }
      longest_now = std::max(longest_now, reset);
      return std::max(longest_now, longest_before);
    }
  };
  // Inferred windows beyond a year are absurd, and would overflow nanoseconds.
  static constexpr double longest_window_ns = 365.0 * 24 * 3600 * 1e9;
  struct rate_change {
    weir::detail::nanos since = 0;
    double rate = 0;
  };

  rate_limits<Clock> limits_;
  adaptation_options options_;
  mutable std::mutex mutex_;
  std::atomic<bool> engaged_{false};  // the limiter follows rate_ and burst_ from then on
  double rate_ = 0;                   // requests per second
  std::uint64_t burst_ = 1;
  std::optional<double> ceiling_, known_;         // per second
  std::array<std::optional<double>, 4> given_{};  // per second, as configured in the limiter
  bool slow_start_ = false;
  // The share of refusals the last decrease judged congestion left at the pace it set: the share
  // before the next decrease, where the last 32 answers mix paces (a limit that halved shows
  // 3% of them refused at the first decrease, 38% after it).
  struct share_at_answer {
    double share = 0;
    std::uint64_t answer = 0;
  } share_at_pace_{};
  std::uint64_t answers_ = 0;  // every success and refusal seen
  unsigned quiet_ = 0;         // successes at the hold point before probing
  unsigned patience_ = 1;  // probe_after multiplied: isolated refusals at a known limit raise it
  double probe_step_ = 0;  // the last raise while probing; 0: not probing
  time_point last_probe_{};
  time_point last_decrease_ = time_point::min();
  double srtt_ = 0, gap_ = 0, sent_rate_ = 0;  // ns, ns, per second
  std::uint32_t answer_bits_ = 0;  // the last 32 answers, newest lowest: 1 for a refusal
  unsigned answers_seen_ = 0;      // up to 32
  double noise_ = 0;               // the share of refusals that does not follow the rate
  pending_verdict verdict_{};
  struct best_pace {
    double rate = 0, delivered = 0, ceiling = 0;  // sent at, successes per second, its ceiling
  } best_{};                                      // while discovering (guard_against_collapse)
  struct answers_since {
    double noise_before = 0;
    unsigned answers = 0, refusals = 0;
  };
  std::optional<answers_since> restore_check_{};     // the first answers after best_ was restored
  std::optional<weir::detail::nanos> held_since_{};  // the end of slow start, as the guard saw it
  weir::detail::nanos last_response_ = 0;
  std::array<window_estimate, 4> inferred_{};
  // The shortest window a rounded reset read (ns), used once one read ten roundings or more.
  struct rounded_bound {
    double shortest_ns = 0;
    bool trusted = false;
  };
  std::array<rounded_bound, 4> rounded_{};
  std::array<window_from_resets, 4> resets_{};
  std::optional<nanos> count_window_{};           // read_count_window
  std::array<weir::detail::nanos, 128> sends_{};  // when the last answers' requests were sent
  std::size_t next_send_ = 0;
  std::array<rate_change, 32> history_{};
  std::size_t next_history_ = 0;
  // This client's share of a reported limit others spend too (see note_share).
  std::optional<std::int64_t> last_remaining_{};
  std::int64_t last_limit_ = 0;
  time_point last_remaining_at_{};
  double share_mine_ = 0, share_all_ = 0;
  double share_cap_ = std::numeric_limits<double>::infinity();  // per second
  // The last request count reported without a period, and the one the pace follows.
  std::int64_t latest_count_ = 0, followed_count_ = 0;
  double held_ceiling_ = 0;  // the highest ceiling that held until probed above (per second)
  struct {
    bool counted = false;   // this server's errors spend the limit: their slots are kept
    bool checking = false;  // a slot was given back at `at`; no answer sent since is in yet
    time_point at{};
    unsigned free = 0, refused = 0;  // what the first answers sent after one found
  } given_back_;
};

}  // namespace detail

template <class Clock, class Classifier>
class adaptation_stage;

// Copies share one adaptation.
template <class Clock = std::chrono::steady_clock>
class server_adaptation {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;

  // `limits` is shared, not copied: adaptation changes the limiter the calls go through. A
  // request limit configured there is the known limit; without one, the request rate is
  // discovered from `initial_rate` up. Throws weir::exception(invalid_argument) naming a bad
  // option.
  explicit server_adaptation(rate_limits<Clock> limits, adaptation_options options = {})
      : core_(std::make_shared<detail::adaptation_core<Clock>>(std::move(limits), options)) {}

  // Feeds one classified response to a request sent at `sent`. Returns true when the answer
  // was a server error whose slot in the limiter was given back (one the limit did not count):
  // the next call may go at once (the router retries this one at once, into that slot).
  bool observe(const classification& c, time_point sent, time_point now) {
    return core_->observe(c, sent, now);
  }
  // As above, for a request sent about one round trip ago.
  void observe(const classification& c, time_point now = Clock::now()) { core_->observe(c, now); }
  // A request limit learned elsewhere (another member of a fleet heard it from the server):
  // taken as if this server had reported it.
  void learn_request_limit(weir::rate limit, time_point now = Clock::now()) {
    core_->learn_request_limit(limit, now);
  }

  // The request rate now in force in the limiter: as configured until the adaptation is first
  // used (its stage admits a call, or it observes something), then the paced rate.
  std::optional<weir::rate> request_rate() const { return core_->request_rate(); }
  // The pacing the adaptation has chosen (in force once it is used).
  pacing_state state() const { return core_->state(); }
  // Puts the chosen pacing in force now, without waiting for a first call or answer.
  void engage(time_point now = Clock::now()) { core_->engage(now); }

  // The adaptation as a pipeline stage: every answer the call gets, judged by `classifier` (which
  // must read the server's hints, as http::response_classifier does), is observed with the time
  // it was sent. Place it inside the retry, so that it sees every attempt, and anywhere relative
  // to the limits it steers.
  template <class Classifier = default_classifier>
  adaptation_stage<Clock, Classifier> stage(Classifier classifier = {}) const {
    return adaptation_stage<Clock, Classifier>(*this, std::move(classifier));
  }

 private:
  std::shared_ptr<detail::adaptation_core<Clock>> core_;
};

// A server_adaptation in a pipeline (see stage.hpp). Cancelled calls and local refusals are no
// answer: the adaptation learns nothing from them.
template <class Clock, class Classifier>
class adaptation_stage {
 public:
  using time_point = typename Clock::time_point;

  adaptation_stage(server_adaptation<Clock> adaptation, Classifier classifier)
      : adaptation_(std::move(adaptation)), classify_(std::move(classifier)) {}

  struct slot {
    time_point sent{};
  };
  // Every answer is read, successes included: their headers are how the pacing learns.
  static constexpr bool values_succeed = false;

  bool try_enter(slot& s, stage_context<Clock>&) {
    s.sent = Clock::now();
    adaptation_.engage(s.sent);
    return true;
  }

  template <class Outcome>
  stage_action exit(slot& s, stage_context<Clock>&, const Outcome& result) {
    if (result.reached_provider()) adaptation_.observe(classify_(result), s.sent, Clock::now());
    return {};
  }

 private:
  server_adaptation<Clock> adaptation_;
  Classifier classify_;
};

}  // namespace weir::http
