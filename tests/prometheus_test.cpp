// weir-demo scraped by a real Prometheus server (Debian's, which scripts/test installs into
// build/prometheus): the server on a loopback port with its data in a scratch directory,
// scraping the demo's /metrics every second; its HTTP API then answers the PromQL a dashboard
// would ask, which must agree with what the demo and its mock providers counted.
// WEIR_REQUIRE_PROMETHEUS_TEST=1, which scripts/test sets, makes a missing server a failure
// rather than a skipped test.
#ifdef WEIR_DEMO_BIN
#include "support/process.hpp"

#include <weir/observability/metrics.hpp>

#include <catch2/catch.hpp>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <thread>

namespace {

namespace prom_asio = boost::asio;
namespace prom_http = boost::beast::http;
namespace prom_json = boost::json;

// The Prometheus server to run: $WEIR_PROMETHEUS, the one scripts/test unpacks, or Debian's
// package installed the usual way; empty if there is none.
std::filesystem::path prometheus_program() {
  if (const char* given = std::getenv("WEIR_PROMETHEUS"); given && *given) return given;
  for (const std::filesystem::path p : {WEIR_PROMETHEUS_UNPACKED, "/usr/bin/prometheus"})
    if (::access(p.c_str(), X_OK) == 0) return p;
  return {};
}

// A port nothing listens on now (the kernel's choice for port 0, released at once).
unsigned short free_port() {
  prom_asio::io_context io;
  prom_asio::ip::tcp::acceptor acceptor(io, {prom_asio::ip::make_address("127.0.0.1"), 0});
  return acceptor.local_endpoint().port();
}

// GET http://127.0.0.1:port/target: the status and the body; status 0 if nothing answered.
std::pair<unsigned, std::string> get(unsigned short port, const std::string& target) {
  try {
    prom_asio::io_context io;
    prom_asio::ip::tcp::socket socket(io);
    socket.connect({prom_asio::ip::make_address("127.0.0.1"), port});
    prom_http::request<prom_http::empty_body> request{prom_http::verb::get, target, 11};
    request.set(prom_http::field::host, "127.0.0.1");
    prom_http::write(socket, request);
    boost::beast::flat_buffer buffer;
    prom_http::response<prom_http::string_body> response;
    prom_http::read(socket, buffer, response);
    return {response.result_int(), std::move(response.body())};
  } catch (const std::exception&) {
    return {0, {}};
  }
}

std::string percent_encoded(std::string_view text) {
  std::string out;
  for (const unsigned char c : text)
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~')
      out += static_cast<char>(c);
    else
      out += fmt::format("%{:02X}", c);
  return out;
}

// One sample of an instant vector: its labels and value.
struct sample {
  std::map<std::string, std::string> labels;
  double value = 0;
};

// The instant vector `promql` evaluates to at `at` (Unix seconds), through /api/v1/query.
std::vector<sample> query(unsigned short port, const std::string& promql, double at) {
  const auto [status, body] =
      get(port, fmt::format("/api/v1/query?query={}&time={:.3f}", percent_encoded(promql), at));
  INFO(promql << " -> " << body);
  REQUIRE(status == 200);
  const auto answer = prom_json::parse(body);
  REQUIRE(answer.at("status").as_string() == "success");
  REQUIRE(answer.at("data").at("resultType").as_string() == "vector");
  std::vector<sample> samples;
  for (const auto& r : answer.at("data").at("result").as_array()) {
    sample s;
    for (const auto& [name, value] : r.at("metric").as_object())
      s.labels[std::string(name)] = std::string(value.as_string());
    s.value = std::stod(std::string(r.at("value").as_array().at(1).as_string()));
    samples.push_back(std::move(s));
  }
  return samples;
}

// The one value of a query that yields one sample.
double value_of(unsigned short port, const std::string& promql, double at) {
  const auto samples = query(port, promql, at);
  INFO(promql);
  REQUIRE(samples.size() == 1);
  return samples.front().value;
}

// The histogram bucket a value falls in: the index of the first upper bound it does not pass.
std::size_t bucket_of(double seconds) {
  const auto& bounds = weir::gen_ai_duration_bounds;
  return static_cast<std::size_t>(std::lower_bound(bounds.begin(), bounds.end(), seconds) -
                                  bounds.begin());
}

double unix_seconds_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

TEST_CASE(
    "a real Prometheus scraping weir-demo: its p95 time to first chunk is the demo's within a "
    "bucket, token usage by model and type sums to what the mocks counted, the 429 rate and "
    "every breaker's state set are there",
    "[.][prometheus]") {
  namespace fs = std::filesystem;
  using namespace std::chrono_literals;
  const auto prometheus = prometheus_program();
  if (prometheus.empty()) {
    if (std::getenv("WEIR_REQUIRE_PROMETHEUS_TEST"))
      FAIL("no prometheus server in " << WEIR_PROMETHEUS_UNPACKED << " or /usr/bin");
    WARN("skipped: no prometheus server (scripts/test installs one into build/prometheus)");
    return;
  }
  const auto scratch = fs::temp_directory_path() / fmt::format("weir-prometheus-{}", ::getpid());
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  const auto demo_port = free_port();
  const auto prometheus_port = free_port();
  std::ofstream(scratch / "prometheus.yml") << fmt::format(R"(global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: weir-demo
    static_configs:
      - targets: ["127.0.0.1:{}"]
)",
                                                           demo_port);
  const pid_t server =
      test_process::spawn(
          {prometheus.string(), "--config.file=" + (scratch / "prometheus.yml").string(),
           "--storage.tsdb.path=" + (scratch / "data").string(),
           fmt::format("--web.listen-address=127.0.0.1:{}", prometheus_port)},
          (scratch / "prometheus.log").string())
          .first;
  struct stop_server {
    pid_t pid;
    ~stop_server() {
      ::kill(pid, SIGTERM);
      test_process::wait_exit(pid, std::chrono::seconds(10));
    }
  } stop{server};
  const auto ready_by = std::chrono::steady_clock::now() + 20s;
  while (get(prometheus_port, "/-/ready").first != 200) {
    REQUIRE(std::chrono::steady_clock::now() < ready_by);
    std::this_thread::sleep_for(100ms);
  }

  // Without the mocks' faults, whose answers a client gives up on the mock counts and the
  // client never hears of (a first token after the client's timeout, a stall, a reset), but with
  // a stray 429 for one request in ten. The run starts after the first scrape (Prometheus
  // starts scraping a few seconds after it is ready), so every counter is seen from zero; the
  // demo serves its metrics 3 s past the run's end, so that a scrape sees the end.
  auto [demo, out] = test_process::spawn(
      {WEIR_DEMO_BIN, "--requests", "60", "--plain", "--no-faults", "--stray-429s",
       "--metrics-port", std::to_string(demo_port), "--await-first-scrape", "20",
       "--linger-seconds", "3", "--svg", (scratch / "timeline.svg").string()});
  std::string said;
  const bool ended =
      test_process::read_until(out, said, "metrics: served", 90s) != std::string::npos;
  const double run_ended = unix_seconds_now();
  INFO("weir-demo said:\n" << said);
  REQUIRE(ended);
  REQUIRE(said.find("metrics: scraped; the run starts") != std::string::npos);

  // What the demo and its mocks counted.
  std::smatch m;
  REQUIRE(std::regex_search(said, m,
                            std::regex(R"(weir: time to first chunk p95 ([0-9.]+) s over (\d+))")));
  const double demo_p95 = std::stod(m[1]);
  const double streams = std::stod(m[2]);
  REQUIRE(std::regex_search(
      said, m,
      std::regex(R"(weir: the providers answered 429 (\d+) times; the client saw (\d+))")));
  const double answered_429 = std::stod(m[1]);
  const double client_saw_429 = std::stod(m[2]);
  std::map<std::string, std::pair<double, double>> counted;  // provider: input, output tokens
  const std::regex counted_line(R"(weir: (\w+) counted (\d+) input and (\d+) output tokens)");
  for (auto it = std::sregex_iterator(said.begin(), said.end(), counted_line);
       it != std::sregex_iterator(); ++it)
    counted[(*it)[1]] = {std::stod((*it)[2]), std::stod((*it)[3])};
  REQUIRE(counted.size() == 3);

  // The first scrape after the run: every query is evaluated at its time.
  double at = 0;
  const auto scraped_by = std::chrono::steady_clock::now() + 10s;
  for (;;) {
    const auto up = query(prometheus_port, R"(timestamp(up{job="weir-demo"}))", unix_seconds_now());
    if (!up.empty() && up.front().value >= run_ended) {
      at = up.front().value;
      break;
    }
    REQUIRE(std::chrono::steady_clock::now() < scraped_by);
    std::this_thread::sleep_for(200ms);
  }
  REQUIRE(value_of(prometheus_port, R"(up{job="weir-demo"})", at) == 1);
  CHECK(test_process::wait_exit(demo, 15s) == 0);
  ::close(out);

  // The p95 of time to first chunk over the whole run, from the buckets, against the demo's own.
  const double prometheus_p95 =
      value_of(prometheus_port,
               "histogram_quantile(0.95, sum by (le) "
               "(gen_ai_client_operation_time_to_first_chunk_seconds_bucket))",
               at);
  INFO("p95: Prometheus " << prometheus_p95 << " s, the demo " << demo_p95 << " s");
  const auto a = bucket_of(prometheus_p95), b = bucket_of(demo_p95);
  CHECK((a > b ? a - b : b - a) <= 1);
  CHECK(value_of(prometheus_port, "sum(gen_ai_client_operation_time_to_first_chunk_seconds_count)",
                 at) == streams);

  // Token usage by model and type, summed over each provider's models: what its mock counted.
  std::map<std::string, std::pair<double, double>> recorded;
  std::map<std::string, int> models;
  for (const auto& s :
       query(prometheus_port,
             "sum by (gen_ai_provider_name, gen_ai_request_model, gen_ai_token_type) "
             "(gen_ai_client_token_usage_sum)",
             at)) {
    auto& tokens = recorded[s.labels.at("gen_ai_provider_name")];
    (s.labels.at("gen_ai_token_type") == "input" ? tokens.first : tokens.second) += s.value;
    models[s.labels.at("gen_ai_provider_name")] += s.labels.at("gen_ai_token_type") == "input";
  }
  CHECK(recorded == counted);
  for (const auto& [provider, n] : models) CHECK(n >= 1);

  // The 429s: every one the providers sent, by provider, and a rate over the run.
  REQUIRE(answered_429 > 0);
  CHECK(client_saw_429 == answered_429);
  CHECK(
      value_of(prometheus_port,
               R"(sum(gen_ai_client_operation_duration_seconds_count{error_type="rate_limited"}))",
               at) == answered_429);
  CHECK(value_of(prometheus_port, "sum(weir_server_rate_limited_total)", at) == answered_429);
  CHECK(value_of(prometheus_port, "sum(rate(weir_server_rate_limited_total[1m])) * 60", at) > 0);
  CHECK_FALSE(query(prometheus_port,
                    "sum by (gen_ai_provider_name) (rate(gen_ai_client_operation_duration_seconds_"
                    R"(count{error_type="rate_limited"}[1m])) * 60)",
                    at)
                  .empty());

  // Each provider's breaker: one state of four at 1, in every scrape after the first (which came
  // before the run built its router), whether or not it ever changed state.
  const auto breakers = query(prometheus_port, "sum by (breaker) (weir_breaker_state)", at);
  REQUIRE(breakers.size() == 3);
  for (const auto& s : breakers) CHECK(s.value == 1);
  CHECK(query(prometheus_port, "weir_breaker_state", at).size() == 12);
  const double scrapes = value_of(prometheus_port, R"(sum_over_time(up{job="weir-demo"}[5m]))", at);
  CHECK(scrapes >= 4);
  const auto closed =
      query(prometheus_port, R"(count_over_time(weir_breaker_state{state="closed"}[5m]))", at);
  CHECK(closed.size() == 3);
  for (const auto& s : closed) {
    INFO(s.labels.at("breaker") << " in " << s.value << " of " << scrapes << " scrapes");
    CHECK(s.value == scrapes - 1);
  }
  fs::remove_all(scratch);
}
#endif
