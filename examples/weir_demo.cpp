// weir-demo: an agent workload against three local providers that enforce real limits (OpenAI and
// Anthropic dialects, real rate-limit headers, faults and an outage), routed by weir — with a live
// dashboard, a summary, and an SVG timeline. `--compare` first runs the naive way (fire; on a 429
// sleep 1, 2, 4 ... s) on fresh providers, and puts the two side by side.
//
//     weir-demo [--requests N] [--concurrency N] [--seed N] [--compare] [--self-hosted]
//               [--no-faults] [--slow-tail] [--stray-429s] [--hedge] [--no-stream] [--fallback]
//               [--svg PATH] [--plain]
//               [--metrics-port N [--await-first-scrape N] [--linger-seconds N]]
//     weir-demo --model NAME [--base-url https://api.example.com/v1] [--api-key-env VAR]
//               [--dialect openai|anthropic] [--rpm N] [--tpm N]
#include "demo/metrics_server.hpp"
#include "demo/workload.hpp"

#include <fmt/format.h>

#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;

constexpr const char* usage_text =
    R"(weir-demo: routes an agent workload through weir against rate-limited providers.

Usage: weir-demo [options]

  --requests N      requests in the workload (default 300; 10 against --base-url)
  --concurrency N   requests in flight at once (default 32)
  --seed N          workload and fault seed (default 7)
  --compare         run the naive way first, then weir, and compare them
  --self-hosted     add a fourth, free provider: a self-hosted model server with 4 workers that
                    queues instead of refusing; weir learns how many calls it can take at once
  --no-faults       the local providers answer without their faults (errors, resets, stalls,
                    slow first tokens, the outage): only their limits refuse
  --slow-tail       the local providers stall one answer in twenty for 3 s
  --stray-429s      the local providers refuse one request in ten with a 429 their limits did
                    not call for (Retry-After 0.5 to 2 s), as when others share the quota
  --hedge           weir hedges a request still unanswered at the p90 of the latencies it has
                    seen (at most 8 at once, a tenth of the requests): compare the p99
  --no-stream       weir asks for whole answers; by default it streams them (server-sent
                    events) and shows the time to first token
  --fallback        a request weir gives up on gets a canned reply (weir::fallback), counted
  --svg PATH        where to write the timeline (default weir-demo-timeline.svg)
  --plain           log lines instead of the live dashboard (the default when not a terminal)
  --metrics-port N  serve weir's metrics for Prometheus at http://127.0.0.1:N/metrics while it
                    runs (0: a free port; the URL is printed)
  --await-first-scrape N  with --metrics-port, start the run after the first scrape (waiting
                    at most N s), so that Prometheus sees every counter from zero
  --linger-seconds N  with --metrics-port, go on serving the metrics N s after the run, so a
                    scrape sees its end (default 0)
  --model NAME      run against a real endpoint instead of the local mocks, asking for NAME
  --dialect D       openai (default) or anthropic
  --base-url URL    the endpoint's API root, as the SDKs take it (https://host/v1); default
                    $OPENAI_BASE_URL or https://api.openai.com/v1 (anthropic: $ANTHROPIC_BASE_URL
                    or https://api.anthropic.com/v1)
  --api-key-env VAR the environment variable holding the API key, never printed; default
                    OPENAI_API_KEY (anthropic: ANTHROPIC_API_KEY), none if it is unset
  --rpm N, --tpm N  its limits, if you know them; otherwise weir reads them from the response
                    headers or discovers them (slow start, then just under the first 429)
  --help            this text
)";

struct settings {
  std::size_t requests = 300;
  std::size_t concurrency = 32;
  std::uint64_t seed = 7;
  bool compare = false;
  bool self_hosted = false;
  bool no_faults = false;
  bool slow_tail = false;
  bool stray_429s = false;
  bool hedge = false;
  bool stream = true;
  bool fallback = false;
  bool plain = false;
  std::string svg = "weir-demo-timeline.svg";
  std::string base_url, api_key_env, model;
  demo::dialect speaks = demo::dialect::openai;
  double rpm = 0, tpm = 0;  // 0: not given
  bool requests_given = false;
  std::optional<unsigned short> metrics_port{};
  std::chrono::seconds await_first_scrape{0};
  std::chrono::seconds linger{0};
};

[[noreturn]] void bad_usage(const std::string& why) {
  fmt::print(stderr, "weir-demo: {}\nRun weir-demo --help for the options.\n", why);
  std::exit(2);
}

template <class Number>
Number number_flag(std::string_view flag, std::string_view text, Number low, Number high) {
  Number value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < low || value > high)
    bad_usage(fmt::format("{} wants a number from {} to {}, not '{}'", flag, low, high, text));
  return value;
}

settings parse(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    const auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) bad_usage(fmt::format("{} needs a value", flag));
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      fmt::print("{}", usage_text);
      std::exit(0);
    } else if (flag == "--requests") {
      s.requests = number_flag<std::size_t>(flag, value(), 1, 100'000);
      s.requests_given = true;
    } else if (flag == "--concurrency") {
      s.concurrency = number_flag<std::size_t>(flag, value(), 1, 1'000);
    } else if (flag == "--seed") {
      s.seed = number_flag<std::uint64_t>(flag, value(), 0, ~0ull);
    } else if (flag == "--compare") {
      s.compare = true;
    } else if (flag == "--self-hosted") {
      s.self_hosted = true;
    } else if (flag == "--no-faults") {
      s.no_faults = true;
    } else if (flag == "--slow-tail") {
      s.slow_tail = true;
    } else if (flag == "--stray-429s") {
      s.stray_429s = true;
    } else if (flag == "--hedge") {
      s.hedge = true;
    } else if (flag == "--no-stream") {
      s.stream = false;
    } else if (flag == "--fallback") {
      s.fallback = true;
    } else if (flag == "--plain") {
      s.plain = true;
    } else if (flag == "--metrics-port") {
      const auto v = value();
      s.metrics_port = demo::parse_port(v);
      if (!s.metrics_port) bad_usage(fmt::format("--metrics-port wants 0 to 65535, not '{}'", v));
    } else if (flag == "--await-first-scrape") {
      s.await_first_scrape = std::chrono::seconds(number_flag<int>(flag, value(), 0, 3'600));
    } else if (flag == "--linger-seconds") {
      s.linger = std::chrono::seconds(number_flag<int>(flag, value(), 0, 3'600));
    } else if (flag == "--svg") {
      s.svg = value();
    } else if (flag == "--base-url") {
      s.base_url = value();
    } else if (flag == "--api-key-env") {
      s.api_key_env = value();
    } else if (flag == "--model") {
      s.model = value();
    } else if (flag == "--dialect") {
      const auto d = value();
      if (d != "openai" && d != "anthropic")
        bad_usage(fmt::format("--dialect is openai or anthropic, not '{}'", d));
      s.speaks = d == "anthropic" ? demo::dialect::anthropic : demo::dialect::openai;
    } else if (flag == "--rpm") {
      s.rpm = number_flag<double>(flag, value(), 1, 1e7);
    } else if (flag == "--tpm") {
      s.tpm = number_flag<double>(flag, value(), 1, 1e10);
    } else {
      bad_usage(fmt::format("unknown option '{}'", flag));
    }
  }
  if (!s.model.empty()) {
    // The SDKs' conventions: the base URL and the key come from the environment by default.
    const bool anthropic = s.speaks == demo::dialect::anthropic;
    if (s.base_url.empty()) {
      const char* from_env = std::getenv(anthropic ? "ANTHROPIC_BASE_URL" : "OPENAI_BASE_URL");
      s.base_url = from_env && *from_env ? from_env
                   : anthropic           ? "https://api.anthropic.com/v1"
                                         : "https://api.openai.com/v1";
    }
    if (s.api_key_env.empty()) {
      const char* name = anthropic ? "ANTHROPIC_API_KEY" : "OPENAI_API_KEY";
      if (const char* key = std::getenv(name); key && *key) s.api_key_env = name;
    }
    if (s.compare) bad_usage("--compare runs against the local mocks only");
    if (s.self_hosted) bad_usage("--self-hosted runs against the local mocks only");
    if (s.no_faults) bad_usage("--no-faults runs against the local mocks only");
    if (s.slow_tail) bad_usage("--slow-tail runs against the local mocks only");
    if (s.stray_429s) bad_usage("--stray-429s runs against the local mocks only");
    try {
      weir::http::endpoint::parse(s.base_url);
    } catch (const std::exception& e) {
      bad_usage(fmt::format("--base-url: {}", e.what()));
    }
    if (!s.requests_given) s.requests = 10;
  } else if (!s.api_key_env.empty() || !s.base_url.empty() || s.rpm > 0 || s.tpm > 0) {
    bad_usage("--base-url, --api-key-env, --rpm and --tpm go with --model");
  }
  if ((s.linger.count() > 0 || s.await_first_scrape.count() > 0) && !s.metrics_port)
    bad_usage("--await-first-scrape and --linger-seconds go with --metrics-port");
  return s;
}

// ---- the live view ---------------------------------------------------------------------------

std::string bar(double fraction, int width) {
  const int full = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * width);
  return std::string(static_cast<std::size_t>(full), '#') +
         std::string(static_cast<std::size_t>(width - full), '.');
}

const char* breaker_name(weir::breaker_state s) {
  switch (s) {
    case weir::breaker_state::closed: return "closed";
    case weir::breaker_state::open: return "OPEN";
    case weir::breaker_state::half_open: return "half-open";
    case weir::breaker_state::isolated: return "isolated";
  }
  return "?";
}

// Where the live view reads what the run has learned, and what the local servers hold.
struct live_sources {
  demo::status_source status;                                     // weir's router, if any
  demo::concurrency_source concurrency;                           // weir's learned limits
  std::function<std::size_t(const std::string&)> server_waiting;  // a self-hosted server's queue
  std::map<std::string, std::size_t> workers;                     // of each self-hosted server
  std::map<std::string, double> capacity;  // requests/s with all of a server's workers busy
};

// Lines describing a run in progress: the progress bar, then one line per provider.
std::vector<std::string> view(const std::string& mode, const demo::progress& live,
                              std::size_t total, double seconds, const demo::run_report& so_far,
                              const live_sources& sources) {
  const auto& status = sources.status;
  std::map<std::string, demo::concurrency_status> learned;
  if (sources.concurrency)
    for (auto& c : sources.concurrency()) learned[c.provider] = c;
  std::vector<std::string> lines;
  const auto done = live.done.load() + live.failed.load();
  const double fraction = static_cast<double>(done) / static_cast<double>(total);
  const double eta =
      done ? seconds / static_cast<double>(done) * static_cast<double>(total - done) : 0;
  const std::string first_token =
      so_far.first_tokens.empty()
          ? std::string()
          : fmt::format("  first token p50 {:.2f} s p95 {:.2f} s",
                        so_far.first_token_percentile(0.5), so_far.first_token_percentile(0.95));
  // Input tokens read from the prompt cache, and what that saved against the full input price.
  const std::string cache =
      so_far.input_tokens == 0
          ? std::string()
          : fmt::format("  cache hits {:.0f}% of input, saved ${:.3f}",
                        100 * so_far.cache_hit_rate(), so_far.saved_by_cache_reads);
  lines.push_back(
      fmt::format("{:<5} [{}] {:>4}/{} {:5.1f} s  ETA {:4.1f} s  failed {}  429s {}  "
                  "retries {}{}{}",
                  mode, bar(fraction, 30), done, total, seconds, eta, live.failed.load(),
                  live.rate_limited.load(), live.retries.load(), first_token, cache));
  std::map<std::string, std::pair<weir::breaker_state, double>> breakers;
  std::map<std::string, double> limits;  // requests/s in force: given, reported or discovered
  std::set<std::string> discovering;
  if (status)
    for (const auto& m : status()) {
      auto& b = breakers[std::string(m.provider)];
      if (m.breaker != weir::breaker_state::closed) b.first = m.breaker;
      b.second = std::max(b.second, std::chrono::duration<double>(m.cooling).count());
      limits[std::string(m.provider)] += m.requests_limit.value_or(0) / 60;
      if (m.discovering) discovering.insert(std::string(m.provider));
    }
  const int now = static_cast<int>(seconds);
  for (const auto& [name, t] : so_far.providers) {
    // The rate over the last three whole seconds.
    double sent = 0;
    for (int s = now - 3; s < now; ++s)
      if (auto it = t.sent_per_second.find(s); it != t.sent_per_second.end()) sent += it->second;
    const double rate = sent / 3;
    if (auto workers = sources.workers.find(name); workers != sources.workers.end()) {
      // A self-hosted server: its capacity, and the limit weir learned from its latency.
      const double capacity = sources.capacity.at(name);
      const double use = capacity > 0 ? rate / capacity : 0;
      std::string limit = "fixed";
      if (auto l = learned.find(name); l != learned.end())
        limit = fmt::format("in flight {:>2} of a learned {:>2}, {} waiting here",
                            l->second.in_flight, l->second.limit, l->second.queued);
      lines.push_back(
          fmt::format("  {:<10} {:5.1f}/s of ~{:4.1f}/s [{}] {:3.0f}%  sent {:>4}  {} workers: {}; "
                      "{} waiting there",
                      name, rate, capacity, bar(use, 20), use * 100, t.sent, workers->second, limit,
                      sources.server_waiting ? sources.server_waiting(name) : 0));
      continue;
    }
    const double limit = limits.contains(name) ? limits[name] : t.limit_per_second;
    const double use = limit > 0 ? rate / limit : 0;
    std::string state = discovering.contains(name) ? "slow start, " : "";
    if (auto it = breakers.find(name); it != breakers.end()) {
      state += breaker_name(it->second.first);
      if (it->second.second > 0) state += fmt::format(", cooling {:.1f} s", it->second.second);
    }
    lines.push_back(fmt::format(
        "  {:<10} {:5.1f}/s of {:5.1f}/s [{}] {:3.0f}%  sent {:>4}  "
        "429s {:>3}  failed {:>3}  breaker {}",
        name, rate, limit, bar(use, 20), use * 100, t.sent, t.rate_limited, t.failed, state));
  }
  return lines;
}

// Runs one workload, redrawing the view in place on a terminal or logging once a second.
template <class Run>
demo::run_report drive(const std::string& mode, Run& run, asio::io_context& io,
                       demo::progress& live, const std::vector<demo::job>& jobs, bool live_view,
                       const live_sources& sources) {
  std::promise<void> finished;
  auto done = finished.get_future();
  run.start(jobs, [&] { finished.set_value(); });
  std::thread client([&] { io.run(); });
  const auto start = demo::steady::now();
  std::size_t drawn = 0;
  for (;;) {
    const bool over = done.wait_for(live_view ? 250ms : 1s) == std::future_status::ready;
    const double seconds = std::chrono::duration<double>(demo::steady::now() - start).count();
    const auto lines = view(mode, live, jobs.size(), seconds, run.peek(), sources);
    if (live_view) {
      if (drawn) fmt::print("\x1b[{}A", drawn);
      for (const auto& l : lines) fmt::print("\x1b[2K{}\n", l);
      drawn = lines.size();
    } else {
      fmt::print("{}\n", lines.front());
    }
    std::fflush(stdout);
    if (over) break;
  }
  client.join();
  return run.report(jobs.size());
}

// ---- the summary and the timeline ------------------------------------------------------------

void summary(const std::vector<demo::run_report>& runs) {
  fmt::print("\n{:<28}", "");
  for (const auto& r : runs) fmt::print("{:>14}", r.mode);
  fmt::print("\n");
  const auto row = [&](const char* name, auto value) {
    fmt::print("{:<28}", name);
    for (const auto& r : runs) fmt::print(" {:>14}", value(r));
    fmt::print("\n");
  };
  row("completed", [](const auto& r) { return fmt::format("{}/{}", r.completed, r.requests); });
  row("failed", [](const auto& r) { return fmt::format("{}", r.failed); });
  if (std::any_of(runs.begin(), runs.end(), [](const auto& r) { return r.canned > 0; }))
    row("canned replies (fallback)", [](const auto& r) { return fmt::format("{}", r.canned); });
  row("time", [](const auto& r) { return fmt::format("{:.1f} s", r.seconds); });
  row("429s seen", [](const auto& r) { return fmt::format("{}", r.rate_limited); });
  row("retries and fallbacks", [](const auto& r) { return fmt::format("{}", r.retries); });
  row("goodput", [](const auto& r) { return fmt::format("{:.1f}/s", r.goodput()); });
  row("latency p50 / p99", [](const auto& r) {
    return fmt::format("{:.2f}/{:.2f} s", r.latency_percentile(0.5), r.latency_percentile(0.99));
  });
  if (std::any_of(runs.begin(), runs.end(),
                  [](const auto& r) { return !r.first_tokens.empty(); })) {
    // From the sending of the attempt that answered, as gen_ai time_to_first_chunk counts it;
    // then from the job's start, waits for room at the limits (and lost hedges) included.
    row("first token p50/p95/p99 (s)", [](const auto& r) {
      if (r.first_tokens.empty()) return std::string("not streamed");
      return fmt::format("{:.2f}/{:.2f}/{:.2f}", r.first_token_percentile(0.5),
                         r.first_token_percentile(0.95), r.first_token_percentile(0.99));
    });
    row("  from the job's start", [](const auto& r) {
      if (r.first_tokens_waited.empty()) return std::string("not streamed");
      return fmt::format("{:.2f}/{:.2f}/{:.2f}", r.first_token_waited_percentile(0.5),
                         r.first_token_waited_percentile(0.95),
                         r.first_token_waited_percentile(0.99));
    });
    row("streams broken, restarted",
        [](const auto& r) { return fmt::format("{}", r.streams_restarted); });
  }
  if (std::any_of(runs.begin(), runs.end(), [](const auto& r) { return r.hedges > 0; }))
    row("hedges", [](const auto& r) { return fmt::format("{}", r.hedges); });
  // Against the limits in force (given, reported or discovered), in the dimension that binds,
  // with the burst the local mocks hold at the start.
  row("  of what the limits allow", [](const auto& r) {
    if (!(r.limit_per_second > 0)) return std::string("unknown");
    return fmt::format("{:.0f}%", 100 * r.share_of_limits());
  });
  row("cost", [](const auto& r) { return fmt::format("${:.4f}", r.cost()); });
  // Conversations resend their prefix; with cache affinity weir keeps each on its warm model.
  row("cache hits (of input tokens)",
      [](const auto& r) { return fmt::format("{:.0f}%", 100 * r.cache_hit_rate()); });
  // Against the full input price. The mocks cache every prompt, as if each asked for it, so
  // Anthropic's writes at 1.25x the input price are paid on requests never sent again too.
  row("  saved by cache reads", [](const auto& r) {
    const double full = r.cost_at_full_input_price;
    return fmt::format("${:.4f} {:.0f}%", r.saved_by_cache_reads,
                       full > 0 ? 100 * r.saved_by_cache_reads / full : 0.0);
  });
  row("  paid for cache writes",
      [](const auto& r) { return fmt::format("${:.4f}", r.cache_write_premium()); });
  for (const auto& [name, t] : runs.front().providers) {
    fmt::print("{:<28}", fmt::format("  {}: done / 429 / cost", name));
    for (const auto& r : runs) {
      const auto& p = r.providers.at(name);
      fmt::print("{:>14}", fmt::format("{}/{}/${:.3f}", p.succeeded, p.rate_limited, p.cost));
    }
    fmt::print("\n");
  }
  for (const auto& r : runs)
    for (const auto& [why, n] : r.failures) fmt::print("{} failure: {} × {}\n", r.mode, why, n);
}

// One panel per provider and run: requests sent per second against the limit (dashed), 429s as
// red ticks, breaker-open spans shaded.
std::string timeline_svg(const std::vector<demo::run_report>& runs) {
  double seconds = 1;
  for (const auto& r : runs) seconds = std::max(seconds, r.seconds);
  const double width = 900, panel = 110, left = 150, right = 20, top = 30;
  std::size_t panels = 0;
  for (const auto& r : runs) panels += r.providers.size();
  const double height = top + panel * static_cast<double>(panels) + 30;
  const double x_scale = (width - left - right) / std::ceil(seconds);
  std::string svg = fmt::format(
      R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">)"
      "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      R"(<text x="{}" y="18" font-size="14">requests/s per provider against its limit (dashed); red: 429; grey: breaker open</text>)"
      "\n",
      width, height, left);
  double y0 = top;
  for (const auto& r : runs)
    for (const auto& [name, t] : r.providers) {
      double peak = t.limit_per_second * 1.3;
      for (const auto& [s, n] : t.sent_per_second) peak = std::max(peak, static_cast<double>(n));
      const double plot = panel - 25;
      const auto y = [&](double v) { return y0 + plot - v / peak * plot; };
      svg += fmt::format(R"(<text x="8" y="{}">{} ({})</text>)"
                         "\n",
                         y0 + plot / 2, name, r.mode);
      for (const auto& [from, to] : t.breaker_open)
        svg += fmt::format(
            R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="#ddd"/>)"
            "\n",
            left + from * x_scale, y0, std::max(1.0, (to - from) * x_scale), plot);
      svg += fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#888"/>)"
                         "\n",
                         left, y0 + plot, width - right, y0 + plot);
      svg += fmt::format(
          R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#2a7" stroke-dasharray="5,4"/>)"
          "\n",
          left, y(t.limit_per_second), width - right, y(t.limit_per_second));
      std::string points;
      for (int s = 0; s < static_cast<int>(std::ceil(seconds)); ++s) {
        const auto it = t.sent_per_second.find(s);
        const double v = it == t.sent_per_second.end() ? 0 : static_cast<double>(it->second);
        points += fmt::format("{:.1f},{:.1f} ", left + (s + 0.5) * x_scale, y(v));
      }
      svg += fmt::format(R"(<polyline points="{}" fill="none" stroke="#36c" stroke-width="1.5"/>)"
                         "\n",
                         points);
      for (const auto& [s, n] : t.limited_per_second)
        svg += fmt::format(
            R"(<line x1="{0:.1f}" y1="{1:.1f}" x2="{0:.1f}" y2="{2:.1f}" stroke="#d22" stroke-width="2"><title>{3} × 429</title></line>)"
            "\n",
            left + (s + 0.5) * x_scale, y0 + plot, y0 + plot - std::min(plot, 4.0 + 2.0 * n), n);
      y0 += panel;
    }
  for (int s = 0; s <= static_cast<int>(seconds); s += 5)
    svg += fmt::format(R"(<text x="{:.1f}" y="{:.1f}">{} s</text>)"
                       "\n",
                       left + s * x_scale, height - 10, s);
  svg += "</svg>\n";
  return svg;
}

template <class Run>
demo::run_report run_once(const std::string& mode, std::vector<demo::provider_setup> fleet,
                          const settings& s, const std::vector<demo::job>& jobs, bool live_view,
                          const weir::observer& watch) {
  std::optional<demo::mock_fleet> mocks;
  if (s.base_url.empty()) mocks.emplace(fleet, s.seed);
  asio::io_context io(1);
  demo::progress live;
  Run run(io, fleet,
          {.concurrency = s.concurrency,
           .hedge = s.hedge,
           .stream = s.stream,
           .fallback = s.fallback,
           .watch = watch},
          live);
  live_sources sources;
  if constexpr (requires { run.status(); }) sources.status = run.status();
  if constexpr (requires { run.concurrency(); }) sources.concurrency = run.concurrency();
  for (const auto& p : fleet)
    if (p.workers > 0) {
      sources.workers[p.name] = p.workers;
      sources.capacity[p.name] = demo::capacity_per_second(p, demo::mean_output_tokens(jobs));
    }
  if (mocks)
    sources.server_waiting = [&](const std::string& name) -> std::size_t {
      const auto* server = mocks->find(name);
      return server ? server->stats().waiting : 0;
    };
  auto report = drive(mode, run, io, live, jobs, live_view, sources);
  if (mocks) {
    // The servers' own count, to compare with the client's.
    std::uint64_t served_429 = 0;
    for (const auto& p : fleet)
      if (const auto* server = mocks->find(p.name)) served_429 += server->stats().status(429);
    fmt::print("{}: the providers answered 429 {} times; the client saw {}\n", mode, served_429,
               report.rate_limited);
    for (const auto& p : fleet)
      if (const auto* server = mocks->find(p.name))
        fmt::print("{}: {} counted {} input and {} output tokens\n", mode, p.name,
                   server->stats().input_tokens, server->stats().output_tokens);
    if (!report.first_tokens.empty())
      fmt::print("{}: time to first chunk p95 {:.4f} s over {} streams\n", mode,
                 report.first_token_percentile(0.95), report.first_tokens.size());
    for (const auto& p : fleet)
      if (const auto* server = mocks->find(p.name); server && p.workers > 0)
        fmt::print("{}: {} served {}, at most {} waited for its {} workers\n", mode, p.name,
                   server->stats().status(200), server->stats().longest_queue, p.workers);
    if (sources.concurrency)
      for (const auto& c : sources.concurrency())
        fmt::print("{}: the limit weir learned for {}: {} at once\n", mode, c.provider, c.limit);
  }
  return report;
}

}  // namespace

int main(int argc, char** argv) {
  const auto s = parse(argc, argv);
  const bool live_view = !s.plain && ::isatty(STDOUT_FILENO);

  std::vector<demo::provider_setup> fleet;
  auto jobs = demo::make_workload(s.requests, s.seed);
  if (s.base_url.empty()) {
    fleet = demo::default_fleet();
    if (s.self_hosted) fleet.push_back(demo::self_hosted_provider());
    if (s.no_faults)
      for (auto& p : fleet) p.faults = {};
    if (s.slow_tail)
      for (auto& p : fleet) {
        p.faults.stalls = 0.05;
        p.faults.stall = 3'000ms;
      }
    if (s.stray_429s)
      for (auto& p : fleet) {
        p.faults.random_429 = 0.1;
        p.faults.random_429_min = 500ms;
        p.faults.random_429_max = 2'000ms;
      }
    fmt::print("weir-demo: {} requests at concurrency {} against {} local providers:\n", s.requests,
               s.concurrency, s.self_hosted ? "four" : "three");
    for (const auto& p : fleet)
      for (const auto& m : p.models)
        if (p.workers > 0)
          fmt::print(
              "  {:<10} {:<14} capability {:.0f}  self-hosted, free: {} workers, no rate "
              "limit, latency grows with its queue\n",
              p.name, m.id, m.capability, p.workers);
        else
          fmt::print(
              "  {:<10} {:<14} capability {:.0f}  ${:>5.2f}/${:>5.2f} per M tokens  "
              "{:>4.0f} req/min {:>7.0f} tokens/min\n",
              p.name, m.id, m.capability, m.input_price, m.output_price, m.requests_per_minute,
              m.tokens_per_minute);
  } else {
    std::string key;
    if (!s.api_key_env.empty()) {
      const char* value = std::getenv(s.api_key_env.c_str());
      if (!value || !*value) bad_usage(fmt::format("${} is not set", s.api_key_env));
      key = value;
    }
    demo::provider_setup remote;  // assigned field by field: gcc 12 misreads the aggregate form
    remote.name = "remote";
    remote.speaks = s.speaks;
    remote.burst_seconds = 0;  // what it lets through at once is unknown: no credit for it
    remote.models.push_back({s.model, 5, 0, 0, s.rpm, s.tpm, 0});
    remote.base_url = s.base_url;
    remote.api_key = key;
    fleet.push_back(std::move(remote));
    for (auto& j : jobs) {  // small and cheap: this costs real money
      j.prompt.resize(std::min<std::size_t>(j.prompt.size(), 200));
      j.max_tokens = 16;
      j.min_capability = 0;
    }
    fmt::print("weir-demo: {} requests to {} ({}), key {}\n", s.requests, s.base_url, s.model,
               key.empty() ? "none" : "from $" + s.api_key_env);
  }

  std::vector<demo::run_report> runs;
  // weir's run, counted for Prometheus while it runs (the naive run has no events).
  weir::metrics counted("weir-demo");
  std::optional<demo::metrics_server> metrics;
  try {
    if (s.metrics_port)
      metrics.emplace(*s.metrics_port, std::vector{weir::http::prometheus_source({counted})});
    if (metrics && s.await_first_scrape.count() > 0) {
      std::fflush(stdout);
      fmt::print("metrics: {}\n", metrics->await_first_scrape(s.await_first_scrape)
                                      ? "scraped; the run starts"
                                      : "no scrape came; the run starts anyway");
    }
    if (s.compare)
      runs.push_back(run_once<demo::naive_run>("naive", fleet, s, jobs, live_view, {}));
    runs.push_back(run_once<demo::weir_run>("weir", fleet, s, jobs, live_view, counted.observer()));
  } catch (const std::exception& e) {
    fmt::print(stderr, "weir-demo: {}\n", e.what());
    return 1;
  }
  summary(runs);
  std::ofstream out(s.svg);
  out << timeline_svg(runs);
  if (!out) {
    fmt::print(stderr, "weir-demo: cannot write {}\n", s.svg);
    return 1;
  }
  fmt::print("\ntimeline: {}\n", s.svg);
  if (metrics && s.linger.count() > 0) {
    fmt::print("metrics: served {} s more\n", s.linger.count());
    std::fflush(stdout);
    std::this_thread::sleep_for(s.linger);
  }
  const auto& weir_run = runs.back();
  return weir_run.completed + weir_run.canned + weir_run.failed == weir_run.requests ? 0 : 1;
}
