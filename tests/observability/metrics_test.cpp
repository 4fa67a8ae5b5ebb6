// Specifications of weir/observability/metrics.hpp: counts and the Prometheus text.
#include "../support/composition.hpp"

// ---- metrics and alerts ---------------------------------------------------------------------

#include <weir/observability/alerts.hpp>
#include <weir/observability/metrics.hpp>

#include <map>
#include <sstream>

namespace {
// Parses the exposition format back: "name{labels}" -> value, checking each line's shape.
std::map<std::string, double> parse_prometheus(const std::string& text) {
  std::map<std::string, double> samples;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) continue;
    const auto space = line.rfind(' ');
    REQUIRE(space != std::string::npos);
    REQUIRE(line.find('{') < space);
    REQUIRE(line[space - 1] == '}');
    samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return samples;
}
}  // namespace

TEST_CASE("metrics count a pipeline's events and read back from Prometheus text", "[metrics]") {
  asio::io_context io;
  weir::retry<clock_type> retry({.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  weir::request_queue queue(io.get_executor(), {.max_concurrent = 1, .max_queued = 0});
  weir::metrics chat("chat \"primary\"");
  auto guarded = weir::pipeline(weir::pipeline_options{.watch = chat.observer()}, retry, queue);
  flaky op{.failures = 1};
  CHECK(run_to_end(io, guarded(op())) == 2);
  auto held = queue.try_admit();
  std::exception_ptr refused;
  run_to_end(io, weir::pipeline(queue)(op()), &refused);  // no observer: not counted
  (void)guarded(op());                                    // never started: nothing counted
  flaky full;
  run_to_end(io, guarded(full()), &refused, 0s);  // the queue is full: a rejection, not retried

  const auto m = chat.read();
  CHECK(m.attempts == 2);
  CHECK(m.successes == 1);
  CHECK(m.failures == 1);
  CHECK(m.retries == 1);
  CHECK(m.rejections[static_cast<std::size_t>(weir::rejection::queue_full)] == 1);

  weir::metrics other("other");
  std::string page;
  weir::write_prometheus(page, {&chat, &other});
  const auto samples = parse_prometheus(page);
  const std::string chat_label = R"({pipeline="chat \"primary\""})";
  CHECK(samples.at("weir_attempts_total" + chat_label) == 2);
  CHECK(samples.at("weir_retries_total" + chat_label) == 1);
  CHECK(samples.at("weir_attempts_total{pipeline=\"other\"}") == 0);
  CHECK(samples.at(R"(weir_rejections_total{pipeline="chat \"primary\"",reason="queue_full"})") ==
        1);
  // Per policy, by the names in their options (the defaults here).
  CHECK(samples.at(R"(weir_policy_rejections_total{pipeline="chat \"primary\"",)"
                   R"(policy="request_queue",reason="queue_full"})") == 1);
  CHECK(page.find(R"(weir_breaker_state{pipeline="chat)") == std::string::npos);  // none in it
  CHECK(page.find("# TYPE weir_attempts_total counter\n") != std::string::npos);
  // Latency is a histogram: cumulative buckets, a sum and a count (two attempts finished).
  CHECK(page.find("# TYPE weir_attempt_latency_seconds histogram\n") != std::string::npos);
  CHECK(samples.at("weir_attempt_latency_seconds_count" + chat_label) == 2);
  CHECK(samples.at(
            R"(weir_attempt_latency_seconds_bucket{pipeline="chat \"primary\"",le="+Inf"})") == 2);
  CHECK(m.latency_count == 2);

  // A breaker appears as a state set under its name.
  weir::circuit_breaker<clock_type> breaker({.consecutive_failures = 1, .name = "openai"});
  weir::metrics llm("llm");
  auto broken = weir::pipeline(weir::pipeline_options{.watch = llm.observer()}, breaker);
  flaky once{.failures = 1};
  run_to_end(io, broken(once()), &refused);
  std::string breaker_page;
  weir::write_prometheus(breaker_page, {&llm});
  const auto breaker_samples = parse_prometheus(breaker_page);
  CHECK(breaker_samples.at(R"(weir_breaker_state{pipeline="llm",breaker="openai",state="open"})") ==
        1);
  CHECK(breaker_samples.at(
            R"(weir_breaker_state{pipeline="llm",breaker="openai",state="closed"})") == 0);
  REQUIRE(llm.read().policies.size() == 1);
  CHECK(llm.read().policies[0].breaker == weir::breaker_state::open);
}

TEST_CASE("the latency histogram puts each attempt in its bucket, cumulatively in the text",
          "[metrics]") {
  weir::metrics m("llm");
  auto watch = m.observer();
  for (ns latency : {ns(3ms), ns(40ms), ns(40ms), ns(700ms), ns(45s), ns(10min)})
    watch(weir::attempt_succeeded{"chat", 1, latency});
  const auto s = m.read();
  CHECK(s.latency_count == 6);
  CHECK(s.latency_buckets[0] == 1);                            // ≤ 5 ms
  CHECK(s.latency_buckets[3] == 2);                            // ≤ 50 ms
  CHECK(s.latency_buckets[7] == 1);                            // ≤ 1 s
  CHECK(s.latency_buckets[12] == 1);                           // ≤ 60 s
  CHECK(s.latency_buckets[weir::latency_bounds.size()] == 1);  // above 120 s
  std::string page;
  weir::write_prometheus(page, {&m});
  const auto samples = parse_prometheus(page);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="0.005"})") == 1);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="0.05"})") == 3);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="120"})") == 5);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_bucket{pipeline="llm",le="+Inf"})") == 6);
  CHECK(samples.at(R"(weir_attempt_latency_seconds_sum{pipeline="llm"})") ==
        Approx(0.003 + 0.08 + 0.7 + 45 + 600));
}
