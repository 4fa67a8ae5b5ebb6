// weir-tenants: one agent platform, several tenants, three local providers. Tenant "flood" sends
// as fast as 48 workers can; the others send steadily. They share one fair request queue (12
// requests in flight for the whole platform), each has its own rate limit (keyed_limiter) and a
// daily spend budget (spend_budget, charged by the router from each response's usage). The
// dashboard shows each tenant's spend and share; the summary checks that the flood starved no
// one and that no budget was passed. `--unfair` queues in arrival order instead, to compare.
//
//     weir-tenants [--tenants N] [--seconds S] [--unfair] [--plain] [--check] [--metrics-port N]
#include "demo/metrics_server.hpp"
#include "demo/workload.hpp"

#include <weir/throttling/keyed_limiter.hpp>
#include <weir/throttling/spend_budget.hpp>

#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

struct settings {
  std::size_t tenants = 4;
  double seconds = 12;
  bool fair = true;
  bool plain = false;
  bool check = false;
  std::optional<unsigned short> metrics_port{};  // serve /metrics on it (0: a free port)
};

[[noreturn]] void bad_usage(const std::string& why) {
  fmt::print(stderr,
             "weir-tenants: {}\nUsage: weir-tenants [--tenants 2..16] [--seconds 2..600] "
             "[--unfair] [--plain] [--check] [--metrics-port 0..65535]\n",
             why);
  std::exit(2);
}

settings parse(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    const auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) bad_usage(fmt::format("{} wants a value", a));
      return argv[++i];
    };
    if (a == "--tenants") {
      const auto v = value();
      const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), s.tenants);
      if (ec != std::errc() || end != v.data() + v.size() || s.tenants < 2 || s.tenants > 16)
        bad_usage("--tenants wants a number from 2 to 16");
    } else if (a == "--seconds") {
      s.seconds = std::atof(std::string(value()).c_str());
      if (!(s.seconds >= 2 && s.seconds <= 600)) bad_usage("--seconds wants 2 to 600");
    } else if (a == "--unfair") {
      s.fair = false;
    } else if (a == "--plain") {
      s.plain = true;
    } else if (a == "--check") {
      s.check = true;
    } else if (a == "--metrics-port") {
      s.metrics_port = demo::parse_port(value());
      if (!s.metrics_port) bad_usage("--metrics-port wants 0 to 65535");
    } else {
      bad_usage(fmt::format("unknown option {}", a));
    }
  }
  return s;
}

// One tenant of the platform: how hard it sends and what it may spend.
struct tenant {
  std::string name;
  std::size_t workers = 2;
  double budget = 0.25;  // USD per day
  double per_minute = 120;

  // What happened to its requests.
  std::atomic<std::uint64_t> sent{0}, done{0}, failed{0}, over_budget{0}, throttled{0};
  std::mutex mutex;
  std::vector<double> waits;  // seconds from asking until the queue and its limit let it go
  double stopped_at = -1;     // when its budget stopped it (seconds), if it did

  double wait_quantile(double q) {
    std::lock_guard lock(mutex);
    if (waits.empty()) return 0;
    auto copy = waits;
    const auto at = static_cast<std::size_t>(q * static_cast<double>(copy.size() - 1));
    std::nth_element(copy.begin(), copy.begin() + static_cast<std::ptrdiff_t>(at), copy.end());
    return copy[at];
  }
};

class platform {
 public:
  using router_type =
      weir::routing::router<demo::job, demo::response, steady, weir::http::response_classifier>;

  platform(asio::io_context& io, std::vector<demo::provider_setup> fleet,
           std::vector<std::unique_ptr<tenant>>& tenants, bool fair)
      : io_(io),
        tenants_(tenants),
        budgets_({.name = "tenants",
                  .limit = 0,
                  .limit_of = [this](std::string_view t) { return find(t).budget; },
                  .window = weir::budget_window::daily(),
                  .per = weir::budget_scope::tenant,
                  .watch = [this](const weir::event& e) { alert(e); }}),
        queue_(io.get_executor(),
               {.max_concurrent = 12, .max_queued = 10'000, .fair_between_tenants = fair}),
        per_tenant_(io.get_executor(), {.limit_of =
                                            [this](std::string_view t) {
                                              return weir::key_limit{
                                                  .rate = weir::per_minute(find(t).per_minute),
                                                  .burst = 10};
                                            },
                                        .name = "per-tenant"}),
        guarded_(weir::pipeline(
            weir::pipeline_options{.watch =
                                       [this](const weir::event& e) {
                                         record_(e);
                                         if (auto* t = std::get_if<weir::throttled>(&e);
                                             t && t->policy == "per-tenant")
                                           ++throttled_by_limit_;
                                       }},
            queue_, per_tenant_)) {
    router_type::options_type ro;
    ro.max_attempts = 6;
    ro.usage_of = [](const demo::response& r) { return demo::usage_of(r); };
    ro.budgets = {budgets_};
    ro.watch = record_;
    router_.emplace(io.get_executor(), demo::catalog_of(fleet, weir::circuit_breaker_options{}),
                    std::move(ro));
    for (const auto& p : fleet) {
      auto& c = clients_.emplace_back(std::make_unique<weir::http::chat_client>(
          io.get_executor(), p.speaks, weir::http::endpoint::parse(p.base_url)));
      router_->connect(p.name,
                       [c = c.get()](const weir::routing::model_spec& m, const demo::job& j) {
                         return c->complete(demo::request_of(m.id, j), 10s);
                       });
    }
  }

  void start(steady::time_point until) {
    start_ = steady::now();
    for (auto& t : tenants_)
      for (std::size_t w = 0; w < t->workers; ++w)
        asio::co_spawn(io_, worker(*t, until, w), asio::detached);
  }

  std::vector<weir::budget_status> spend() const { return budgets_.status(); }
  // What /metrics serves: the platform's counters and each tenant's spend.
  std::vector<weir::http::metrics_source> metrics_sources() const {
    return {weir::http::prometheus_source({metrics_}),
            [this](std::string& out) { weir::write_prometheus(out, spend()); }};
  }
  std::vector<std::string> alerts() {
    std::lock_guard lock(alerts_mutex_);
    return alerts_;
  }

 private:
  tenant& find(std::string_view name) {
    for (auto& t : tenants_)
      if (t->name == name) return *t;
    return *tenants_.front();
  }

  void alert(const weir::event& e) {
    record_(e);
    std::lock_guard lock(alerts_mutex_);
    alerts_.push_back(fmt::format("{:5.1f} s  {}", elapsed(), e));
  }

  double elapsed() const { return std::chrono::duration<double>(steady::now() - start_).count(); }

  // An agent of tenant `t`: asks, waits for the answer, asks again, until the run ends or its
  // budget says no.
  asio::awaitable<void> worker(tenant& t, steady::time_point until, std::size_t seed) {
    auto jobs = demo::make_workload(200, std::hash<std::string>{}(t.name) + seed);
    for (std::size_t i = 0; steady::now() < until; ++i) {
      const auto& j = jobs[i % jobs.size()];
      const auto asked = steady::now();
      ++t.sent;
      try {
        weir::call_context ctx{
            .priority = weir::priority::normal, .operation = "chat", .tenant = t.name};
        auto reply = co_await guarded_(ctx, [&] {
          {
            std::lock_guard lock(t.mutex);
            t.waits.push_back(std::chrono::duration<double>(steady::now() - asked).count());
          }
          return router_->route(j, {.input_tokens = j.input_tokens(),
                                    .output_tokens = j.max_tokens,
                                    .min_capability = j.min_capability,
                                    .deadline = steady::now() + 30s,
                                    .operation = "chat",
                                    .tenant = t.name});
        });
        const bool ok = reply.response.result_int() == 200;
        (ok ? t.done : t.failed)++;
      } catch (const weir::exception& e) {
        if (e.code() == weir::error::over_budget) {
          ++t.over_budget;
          std::lock_guard lock(t.mutex);
          if (t.stopped_at < 0) t.stopped_at = elapsed();
          co_return;  // an agent told it has spent its day's money stops
        }
        ++t.failed;
      } catch (const std::exception&) {
        ++t.failed;
      }
    }
  }

  asio::io_context& io_;
  std::vector<std::unique_ptr<tenant>>& tenants_;
  weir::spend_budget<> budgets_;
  weir::request_queue queue_;
  weir::keyed_limiter<> per_tenant_;
  std::atomic<std::uint64_t> throttled_by_limit_{0};
  weir::metrics metrics_{"weir-tenants"};  // every event of the queue, limits, budgets, router
  weir::observer record_ = metrics_.observer();
  decltype(weir::pipeline(weir::pipeline_options{}, queue_, per_tenant_)) guarded_;
  std::vector<std::unique_ptr<weir::http::chat_client>> clients_;
  std::optional<router_type> router_;
  steady::time_point start_ = steady::now();
  std::mutex alerts_mutex_;
  std::vector<std::string> alerts_;
};

std::vector<std::string> dashboard(std::vector<std::unique_ptr<tenant>>& tenants,
                                   const std::vector<weir::budget_status>& spend, double seconds) {
  std::uint64_t total = 0;
  for (auto& t : tenants) total += t->done;
  std::vector<std::string> lines;
  lines.push_back(fmt::format("weir-tenants  {:5.1f} s   {} answered", seconds, total));
  lines.push_back(fmt::format("  {:<10} {:>7} {:>7} {:>6} {:>21} {:>7} {:>9}", "tenant", "sent",
                              "done", "share", "spend / budget", "wait p95", "status"));
  for (auto& t : tenants) {
    double spent = 0;
    for (const auto& s : spend)
      if (s.key == t->name) spent = s.spent;
    const double share =
        total ? 100.0 * static_cast<double>(t->done) / static_cast<double>(total) : 0;
    lines.push_back(
        fmt::format("  {:<10} {:>7} {:>7} {:>5.1f}% {:>10.4f} / {:<8.4f} {:>7.2f}s {:>8}", t->name,
                    t->sent.load(), t->done.load(), share, spent, t->budget, t->wait_quantile(0.95),
                    t->stopped_at >= 0 ? "budget" : "sending"));
  }
  return lines;
}

}  // namespace

int main(int argc, char** argv) {
  const auto s = parse(argc, argv);
  auto fleet = demo::default_fleet();
  // The outage of the main demo is not this demo's point.
  for (auto& p : fleet) p.faults = {};
  demo::mock_fleet mocks(fleet, 11);

  std::vector<std::unique_ptr<tenant>> tenants;
  tenants.push_back(std::make_unique<tenant>());
  tenants.back()->name = "flood";
  tenants.back()->workers = 48;
  tenants.back()->budget = 0.03;
  tenants.back()->per_minute = 6000;
  for (std::size_t i = 1; i < s.tenants; ++i) {
    tenants.push_back(std::make_unique<tenant>());
    tenants.back()->name = fmt::format("tenant-{}", i);
    tenants.back()->workers = 2;
    tenants.back()->budget = 0.25;
    tenants.back()->per_minute = 120;
  }

  asio::io_context io(1);
  platform p(io, fleet, tenants, s.fair);
  const auto until = steady::now() + std::chrono::duration_cast<steady::duration>(
                                         std::chrono::duration<double>(s.seconds));
  std::optional<demo::metrics_server> metrics;
  if (s.metrics_port) metrics.emplace(*s.metrics_port, p.metrics_sources());
  p.start(until);
  std::thread client([&] { io.run(); });

  const bool live = !s.plain && ::isatty(STDOUT_FILENO);
  const auto start = steady::now();
  std::size_t drawn = 0;
  for (bool over = false; !over;) {
    std::this_thread::sleep_for(live ? 250ms : 1s);
    over = io.stopped();
    // Every call has a 30 s deadline: past it, nothing the run started is left.
    if (steady::now() > until + 40s) io.stop();
    const auto lines =
        dashboard(tenants, p.spend(), std::chrono::duration<double>(steady::now() - start).count());
    if (live) {
      if (drawn) fmt::print("\x1b[{}A", drawn);
      for (const auto& l : lines) fmt::print("\x1b[2K{}\n", l);
      drawn = lines.size();
    } else {
      for (const auto& l : lines) fmt::print("{}\n", l);
    }
    std::fflush(stdout);
  }
  client.join();

  // The summary: did the flood starve anyone, and did anyone pass a budget?
  const auto spend = p.spend();
  fmt::print("\nBudget alerts:\n");
  for (const auto& a : p.alerts()) fmt::print("  {}\n", a);
  fmt::print("\nSummary ({} queue):\n", s.fair ? "fair" : "arrival-order");
  bool starved = false, overspent = false;
  const double flood_p95 = tenants.front()->wait_quantile(0.95);
  for (auto& t : tenants) {
    double spent = 0;
    for (const auto& b : spend)
      if (b.key == t->name) spent = b.spent;
    const bool over = spent > t->budget + 1e-9;
    overspent |= over;
    const double p95 = t->wait_quantile(0.95);
    std::string note;
    if (t->name != "flood") {
      // A steady tenant is starved when its requests wait in the queue for seconds (a fair turn
      // is one slot of the flood's, a fraction of a second) or fail.
      const bool waits = p95 > 1.0;
      const bool lost = t->done + t->workers < t->sent.load() * 9 / 10;
      starved |= waits || lost;
      note = waits || lost ? "  STARVED" : "";
    } else if (t->stopped_at >= 0) {
      note = fmt::format("  stopped by its budget at {:.1f} s", t->stopped_at);
    }
    fmt::print("  {:<10} {:>5} answered, queue wait p95 {:.2f} s, spent ${:.4f} of ${:.2f}{}{}\n",
               t->name, t->done.load(), p95, spent, t->budget, over ? "  OVER BUDGET" : "", note);
  }
  fmt::print("  flood's queue wait p95 {:.2f} s; {}; {}\n", flood_p95,
             starved ? "a steady tenant was starved" : "no steady tenant was starved",
             overspent ? "a budget was passed" : "no budget was passed");
  return s.check && (starved || overspent) ? 1 : 0;
}
