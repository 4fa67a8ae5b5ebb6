// The demo's workload, in-process, against the mock providers on loopback: real sockets and real
// (short) time, as weir-demo runs it.
#include "demo/workload.hpp"

#include <weir/failure/retry.hpp>
#include <weir/observability/metrics.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <future>
#include <sstream>
#include <thread>

namespace {

// A small fleet whose limits the workload overruns: bursts of a few requests, a few per second.
std::vector<demo::provider_setup> tight_fleet() {
  std::vector<demo::provider_setup> fleet;
  fleet.push_back({.name = "openai",
                   .speaks = demo::dialect::openai,
                   .models = {{"gpt-mini", 5, 0.15, 0.60, 240, 1'000'000, 0},
                              {"gpt-large", 9, 2.50, 10.00, 120, 1'000'000, 0}},
                   .base_latency = std::chrono::microseconds(2'000),
                   .per_output_token = std::chrono::microseconds(0),
                   .burst_seconds = 6});
  fleet.push_back({.name = "anthropic",
                   .speaks = demo::dialect::anthropic,
                   .models = {{"claude-haiku", 7, 0.80, 4.00, 180, 1'000'000, 0}},
                   .base_latency = std::chrono::microseconds(2'000),
                   .per_output_token = std::chrono::microseconds(0),
                   .burst_seconds = 6});
  return fleet;
}

template <class Run>
demo::run_report run(std::vector<demo::provider_setup> fleet, const std::vector<demo::job>& jobs,
                     demo::mock_fleet*& servers_out, std::unique_ptr<demo::mock_fleet>& holder,
                     weir::observer watch = {}) {
  holder = std::make_unique<demo::mock_fleet>(fleet, 11);
  servers_out = holder.get();
  demo::asio::io_context io(1);
  demo::progress live;
  Run r(io, fleet,
        {.concurrency = 16, .naive_backoff = std::chrono::milliseconds(100), .watch = watch}, live);
  std::promise<void> finished;
  r.start(jobs, [&] { finished.set_value(); });
  io.run();
  REQUIRE(finished.get_future().wait_for(std::chrono::seconds(0)) == std::future_status::ready);
  return r.report(jobs.size());
}

std::uint64_t served(const demo::mock_fleet& servers, unsigned status) {
  std::uint64_t n = 0;
  for (const char* name : {"openai", "anthropic"}) n += servers.find(name)->stats().status(status);
  return n;
}

// The sum of the samples of `family` whose labels contain every one of `labels`.
double sum_of(const std::string& page, const std::string& family,
              std::initializer_list<std::string_view> labels) {
  double sum = 0;
  std::istringstream in(page);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(family + "{", 0) != 0) continue;
    const auto space = line.rfind(' ');
    const auto sample = std::string_view(line).substr(0, space);
    if (std::all_of(labels.begin(), labels.end(),
                    [&](std::string_view l) { return sample.find(l) != std::string_view::npos; }))
      sum += std::stod(line.substr(space + 1));
  }
  return sum;
}

}  // namespace

TEST_CASE(
    "the demo's GenAI metrics: token usage by provider and type is what the mock servers "
    "counted, every 429 a call with error_type rate_limited, every stream a first chunk",
    "[gen_ai]") {
  auto jobs = demo::make_workload(40, 5);
  for (auto& j : jobs) j.prompt.resize(std::min<std::size_t>(j.prompt.size(), 2'000));
  demo::mock_fleet* servers = nullptr;
  std::unique_ptr<demo::mock_fleet> holder;
  weir::metrics counted("weir-demo");
  const auto weir = run<demo::weir_run>(tight_fleet(), jobs, servers, holder, counted.observer());
  REQUIRE(weir.completed == jobs.size());
  std::string page;
  weir::write_prometheus(page, {&counted});

  for (const char* name : {"openai", "anthropic"}) {
    const auto provider = fmt::format("gen_ai_provider_name=\"{}\"", name);
    const auto& counted_by_server = servers->find(name)->stats();
    INFO(name);
    CHECK(sum_of(page, "gen_ai_client_token_usage_sum",
                 {provider, R"(gen_ai_token_type="input")"}) == counted_by_server.input_tokens);
    CHECK(sum_of(page, "gen_ai_client_token_usage_sum",
                 {provider, R"(gen_ai_token_type="output")"}) == counted_by_server.output_tokens);
    CHECK(sum_of(page, "weir_gen_ai_cached_input_tokens_total",
                 {provider, R"(gen_ai_token_cache="read")"}) ==
          counted_by_server.cache_read_tokens);
    CHECK(sum_of(page, "gen_ai_client_operation_duration_seconds_count",
                 {provider, R"(error_type="rate_limited")"}) == counted_by_server.status(429));
    CHECK(sum_of(page, "gen_ai_client_operation_time_to_first_chunk_seconds_count", {provider}) ==
          counted_by_server.streams);
    CHECK(sum_of(page, "gen_ai_client_operation_duration_seconds_count", {provider}) ==
          counted_by_server.requests);  // every call the server saw, once
  }
}

TEST_CASE("the demo workload: every request accounted for, weir far below naive on 429s") {
  auto jobs = demo::make_workload(80, 3);
  for (auto& j : jobs) j.prompt.resize(std::min<std::size_t>(j.prompt.size(), 2'000));

  demo::mock_fleet* servers = nullptr;
  std::unique_ptr<demo::mock_fleet> holder;

  const auto naive = run<demo::naive_run>(tight_fleet(), jobs, servers, holder);
  CHECK(naive.completed + naive.failed == jobs.size());
  CHECK(served(*servers, 429) == naive.rate_limited);  // the client saw every 429 the servers sent
  CHECK(served(*servers, 200) == naive.completed);
  holder.reset();

  const auto weir = run<demo::weir_run>(tight_fleet(), jobs, servers, holder);
  CHECK(weir.completed + weir.failed == jobs.size());
  CHECK(weir.failed == 0);
  CHECK(served(*servers, 429) == weir.rate_limited);
  CHECK(served(*servers, 200) == weir.completed);
  std::uint64_t sent = 0;
  for (const auto& [name, t] : weir.providers) sent += t.sent;
  CHECK(servers->find("openai")->stats().requests + servers->find("anthropic")->stats().requests ==
        sent);

  INFO("naive saw " << naive.rate_limited << " 429s, weir " << weir.rate_limited);
  CHECK(naive.rate_limited >= 20);
  CHECK(weir.rate_limited * 10 <= naive.rate_limited);
}

TEST_CASE(
    "the demo workload: its conversations read their prefixes from the prompt caches, and the "
    "report counts the hits and the money saved",
    "[cache]") {
  const auto jobs = demo::make_workload(80, 3);
  std::size_t turns = 0;
  for (const auto& j : jobs) turns += j.after.has_value();
  REQUIRE(turns >= 10);  // later turns of conversations, each resending the one before

  demo::mock_fleet* servers = nullptr;
  std::unique_ptr<demo::mock_fleet> holder;
  const auto weir = run<demo::weir_run>(tight_fleet(), jobs, servers, holder);
  REQUIRE(weir.completed == jobs.size());
  std::uint64_t read = 0;
  for (const char* name : {"openai", "anthropic"})
    read += servers->find(name)->stats().cache_read_tokens;
  INFO("cache hits " << weir.cache_hit_rate() << " of " << weir.input_tokens
                     << " input tokens; cost $" << weir.cost() << ", at the full input price $"
                     << weir.cost_at_full_input_price << ", saved by reads $"
                     << weir.saved_by_cache_reads);
  CHECK(weir.cached_input_tokens == read);  // every read the servers reported, counted once
  CHECK(weir.cache_hit_rate() > 0.1);
  // Cache reads at 0.1x (Anthropic) and 0.5x (OpenAI) the input price; Anthropic's writes at
  // 1.25x are paid besides.
  CHECK(weir.saved_by_cache_reads > 0.05 * weir.cost_at_full_input_price);
  CHECK(weir.cache_write_premium() > 0);
}

TEST_CASE("chaos: faults everywhere and an outage: every request ends once, typed, honestly") {
  using namespace std::chrono_literals;
  // 20% 500s, 10% 429s with a random Retry-After, resets, stalls longer than the client's
  // deadline, and "anthropic" down from 1 s to 5 s (long enough for its breaker to see four
  // failures in a row while the random 429s keep the pacing low, even under the sanitizers).
  const weir::testing::fault_profile chaos{.resets = 0.03,
                                           .stalls = 0.03,
                                           .server_errors = 0.2,
                                           .random_429 = 0.1,
                                           .random_429_min = 100ms,
                                           .random_429_max = 800ms,
                                           .stall = 3'000ms};
  auto fleet = tight_fleet();
  for (auto& p : fleet) {
    p.faults = chaos;
    for (auto& m : p.models) m.requests_per_minute *= 2;
  }
  fleet[1].faults.outages = {{1'000ms, 5'000ms}};
  auto jobs = demo::make_workload(240, 5);
  for (auto& j : jobs) j.prompt.resize(std::min<std::size_t>(j.prompt.size(), 2'000));

  demo::mock_fleet servers(fleet, 21);
  demo::asio::io_context io(1);
  demo::progress live;
  const std::size_t reserve = 20;
  demo::weir_run run(
      io, fleet,
      {.concurrency = 16,
       .breaker = {.consecutive_failures = 4, .break_duration = 500ms},
       .fallback_budget = weir::retry_budget_options{.ratio = 1.0, .reserve = reserve},
       .attempt_timeout = 400ms},
      live);
  run.start(jobs, [] {});
  io.run();
  const auto report = run.report(jobs.size());

  // Every request ended exactly once, in a success or a typed error.
  CHECK(report.completed + report.failed == jobs.size());
  REQUIRE(report.endings.size() == jobs.size());
  for (const auto& [id, times] : report.endings) CHECK(times == 1);
  for (const auto& [why, n] : report.failures) {
    INFO(why << " × " << n);
    CHECK(why != "unexpected failure");
  }
  // No request the servers saw succeed is reported failed.
  for (const char* name : {"openai", "anthropic"})
    for (const auto& id : servers.find(name)->stats().succeeded_requests)
      CHECK(report.succeeded.count(std::stoul(id)) == 1);
  // Fallbacks stayed within the budget: one per route made, plus the reserve.
  CHECK(report.retries <= jobs.size() + reserve);
  // The dead provider's breaker opened during the outage and closed once it was back.
  const auto& spans = report.providers.at("anthropic").breaker_open;
  const bool opened_in_outage = std::any_of(
      spans.begin(), spans.end(), [](const auto& s) { return s.first >= 0.9 && s.first <= 5.2; });
  const auto& closed = report.providers.at("anthropic").breaker_closed;
  const bool closed_after =
      std::any_of(closed.begin(), closed.end(), [](double t) { return t >= 5.0; });
  INFO("anthropic's breaker was open " << spans.size() << " times; the run took " << report.seconds
                                       << " s");
  CHECK(opened_in_outage);
  CHECK(closed_after);
  CHECK(report.completed >= jobs.size() * 8 / 10);
}

TEST_CASE("the demo's fallback: a request the router gives up on gets the canned reply, once") {
  using namespace std::chrono_literals;
  auto fleet = tight_fleet();
  for (auto& p : fleet) p.faults.outages = {{0ms, 600'000ms}};  // every provider down
  auto jobs = demo::make_workload(20, 9);
  for (auto& j : jobs) j.prompt.resize(std::min<std::size_t>(j.prompt.size(), 2'000));
  demo::mock_fleet servers(fleet, 31);
  demo::asio::io_context io(1);
  demo::progress live;
  demo::weir_run run(
      io, fleet,
      {.concurrency = 4, .breaker = {.consecutive_failures = 1'000'000}, .fallback = true}, live);
  run.start(jobs, [] {});
  io.run();
  const auto report = run.report(jobs.size());
  CHECK(report.canned == jobs.size());  // every one, after the router tried every model
  CHECK(report.completed == 0);
  CHECK(report.failed == 0);
  for (const auto& [id, times] : report.endings) CHECK(times == 1);
  CHECK(servers.find("openai")->stats().status(503) > 0);
}
