// The demo's workload, in-process, against the mock providers on loopback: real sockets and real
// (short) time, as weir-demo runs it.
#include "demo/workload.hpp"

#include <weir/failure/retry.hpp>
#include <weir/observability/metrics.hpp>
#include <weir/testing/hostile_server.hpp>

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

TEST_CASE("a self-hosted mock queues for its workers, without limit headers, 503 when full") {
  demo::asio::io_context io(1);
  // One worker and room for one to wait: of four requests sent together, those that find both
  // taken are answered 503.
  weir::testing::mock_provider server(io.get_executor(),
                                      {.name = "local",
                                       .models = {{"llama", 0, 0, 0}},
                                       .base_latency = std::chrono::milliseconds(400),
                                       .per_output_token = std::chrono::microseconds(0),
                                       .workers = 1,
                                       .max_queue = 1});
  server.start();
  const auto where = weir::http::endpoint::parse(server.base_url());
  std::vector<std::unique_ptr<weir::http::chat_client>> clients;
  std::vector<std::pair<unsigned, demo::steady::duration>> answers;
  const auto start = demo::steady::now();
  for (int i = 0; i < 4; ++i) {
    clients.push_back(std::make_unique<weir::http::chat_client>(
        io.get_executor(), weir::http::dialect::openai, where));
    demo::asio::co_spawn(
        io,
        [&, c = clients.back().get()]() -> demo::asio::awaitable<void> {
          const weir::http::chat_request ask{.model = "llama", .prompt = "hi", .max_tokens = 4};
          auto res = co_await c->complete(ask, std::chrono::seconds(30));
          answers.emplace_back(res.result_int(), demo::steady::now() - start);
          if (res.result_int() == 200) {
            CHECK(res["x-ratelimit-limit-requests"].empty());
          }
          if (answers.size() == 4) server.stop();
        },
        demo::asio::detached);
  }
  io.run();
  REQUIRE(answers.size() == 4);
  const auto stats = server.stats();
  CHECK(stats.status(200) + stats.status(503) == 4);
  CHECK(stats.status(200) >= 2);  // the first served and the one that waited
  CHECK(stats.longest_queue == 1);
  CHECK(stats.serving == 0);
  CHECK(stats.waiting == 0);
  // The one that waited took two services: the server queued it rather than serving it at once.
  demo::steady::duration slowest{};
  for (const auto& [status, took] : answers)
    if (status == 200) slowest = std::max(slowest, took);
  CHECK(slowest >= std::chrono::milliseconds(800));
}

TEST_CASE("the mock provider speaks both dialects with their rate-limit headers") {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(
      io.get_executor(), {.name = "m",
                          .models = {{"small", 60, 10'000, 100}},
                          .burst_seconds = 2,  // two requests at once, then one per second
                          .base_latency = std::chrono::microseconds(0)});
  server.start();
  const auto where = weir::http::endpoint::parse(server.base_url());
  weir::http::chat_client openai(io.get_executor(), weir::http::dialect::openai, where);
  weir::http::chat_client anthropic(io.get_executor(), weir::http::dialect::anthropic, where);
  std::vector<demo::response> answers;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        const weir::http::chat_request small{
            .model = "small", .prompt = std::string(40, 'x'), .max_tokens = 10};
        for (auto* client : {&openai, &anthropic, &openai})
          answers.push_back(co_await client->complete(small, std::chrono::seconds(5)));
        const weir::http::chat_request large{
            .model = "small", .prompt = std::string(400, 'x'), .max_tokens = 10};
        answers.push_back(co_await openai.complete(large, std::chrono::seconds(5)));
        server.stop();
      },
      demo::asio::detached);
  io.run();
  REQUIRE(answers.size() == 4);
  CHECK(answers[0].result_int() == 200);
  CHECK(answers[0]["x-ratelimit-limit-requests"] == "60");
  CHECK(answers[0]["x-ratelimit-remaining-requests"] == "59");  // of the minute's 60
  CHECK(demo::usage_of(answers[0])->input_tokens == 10);
  CHECK(answers[1].result_int() == 200);
  CHECK(answers[1]["anthropic-ratelimit-requests-remaining"] == "58");
  CHECK(demo::usage_of(answers[1])->input_tokens == 10);
  CHECK(answers[2].result_int() == 429);
  CHECK(answers[2][boost::beast::http::field::retry_after] == "1");
  const auto judged = weir::http::response_classifier{}.judge(answers[2]);
  CHECK(judged.kind == weir::verdict::rate_limited);
  REQUIRE(judged.hint.retry_after);
  CHECK(*judged.hint.retry_after > std::chrono::milliseconds(900));
  CHECK(*judged.hint.retry_after <= std::chrono::seconds(1));
  CHECK(answers[3].result_int() == 400);  // 100 + 10 tokens do not fit a 100-token window
  CHECK(weir::http::context_length_exceeded(answers[3]));
  const auto stats = server.stats();
  CHECK(stats.requests == 4);
  CHECK(stats.status(200) == 2);
  CHECK(stats.status(429) == 1);
  CHECK(stats.status(400) == 1);
}

TEST_CASE("the mock provider caches prompt prefixes and reports the cache reads in both dialects",
          "[cache]") {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(io.get_executor(),
                                      {.name = "m",
                                       .models = {{"small", 600, 600'000, 0}},
                                       .base_latency = std::chrono::microseconds(0),
                                       .prompt_cache_ttl = std::chrono::minutes(5)});
  server.start();
  const auto where = weir::http::endpoint::parse(server.base_url());
  weir::http::chat_client openai(io.get_executor(), weir::http::dialect::openai, where);
  weir::http::chat_client anthropic(io.get_executor(), weir::http::dialect::anthropic, where);
  // A conversation: its second prompt resends the first (two whole 512-character blocks of it)
  // and adds to it; the third resends the second.
  std::string letters;
  for (int i = 0; i < 1100; ++i) letters += static_cast<char>('a' + i % 26);
  const std::string first = letters;
  const std::string second = first + std::string(1000, 'y');
  std::vector<demo::response> answers;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        for (auto [client, prompt] : {std::pair{&openai, &first}, std::pair{&openai, &second},
                                      std::pair{&anthropic, &second}}) {
          const weir::http::chat_request ask{.model = "small", .prompt = *prompt, .max_tokens = 4};
          answers.push_back(co_await client->complete(ask, std::chrono::seconds(5)));
        }
        server.stop();
      },
      demo::asio::detached);
  io.run();
  REQUIRE(answers.size() == 3);
  std::vector<weir::token_usage> used;
  for (const auto& a : answers) {
    REQUIRE(demo::usage_of(a));
    used.push_back(*demo::usage_of(a));
  }
  CHECK(used[0].input_tokens == 275);
  CHECK(used[0].cache_read_tokens == 0);
  CHECK(used[1].input_tokens == 525);
  CHECK(used[1].cache_read_tokens == 256);  // the first prompt's two whole blocks
  CHECK(used[2].input_tokens == 525);       // Anthropic's three counts, added up
  CHECK(used[2].cache_read_tokens == 512);  // the second prompt's four whole blocks
  CHECK(used[2].cache_write_tokens == 0);
  CHECK(answers[2].body().find(R"("cache_read_input_tokens":512)") != std::string::npos);
  const auto stats = server.stats();
  CHECK(stats.cache_read_tokens == 768);
  CHECK(stats.cache_write_tokens == 512);  // two blocks, then two more
}

namespace {
// How one streamed request through the chat client ended.
struct streamed {
  std::size_t events = 0;
  weir::stream_report report{};
  weir::classification judged{};  // the stream, as the default classifier judged it when it came
  std::exception_ptr failure{};   // before the first event (open) or after it (next)
  bool opened = false;
};

streamed stream_once(weir::testing::mock_provider_options options, weir::http::dialect speaks,
                     weir::stream_options<weir::http::sse::event> timeouts = {}) {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(io.get_executor(), std::move(options));
  server.start();
  weir::http::chat_client client(io.get_executor(), speaks,
                                 weir::http::endpoint::parse(server.base_url()));
  streamed out;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        const weir::http::chat_request ask{
            .model = "small", .prompt = std::string(40, 'x'), .max_tokens = 12};
        try {
          auto s = co_await client.stream(ask, timeouts, std::chrono::seconds(10));
          out.opened = true;
          auto opened =
              weir::outcome<weir::stream<weir::http::sse::event>>::from_value(std::move(s));
          out.judged = weir::default_classifier{}(opened);
          s = std::move(opened).get();
          for (;;) {
            auto e = co_await s.next();
            if (!e) break;
            ++out.events;
          }
          out.report = s.report();
        } catch (...) {
          out.failure = std::current_exception();
        }
        server.stop();
      },
      demo::asio::detached);
  io.run();
  return out;
}

weir::testing::mock_provider_options streaming_mock(weir::testing::fault_profile faults = {}) {
  weir::testing::mock_provider_options o{.name = "m",
                                         .models = {{"small", 600, 100'000, 0}},
                                         .base_latency = std::chrono::microseconds(1'000),
                                         .per_output_token = std::chrono::microseconds(100)};
  o.faults = std::move(faults);
  return o;
}

weir::error_code code_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return x.code();
  } catch (...) {
  }
  return {};
}
}  // namespace

TEST_CASE("the mock provider streams both dialects, and the client reads their usage") {
  using weir::http::dialect;
  for (const auto d : {dialect::openai, dialect::anthropic}) {
    const auto got = stream_once(streaming_mock(), d);
    INFO((d == dialect::openai ? "openai" : "anthropic"));
    REQUIRE(got.opened);
    CHECK_FALSE(got.failure);
    CHECK(got.report.end == weir::stream_end::completed);
    // The final usage chunk is the server's count; the chunks with text, one token each.
    REQUIRE(got.report.tally.reported_output_tokens);
    CHECK(*got.report.tally.reported_output_tokens == got.report.tally.counted_output_tokens);
    CHECK(got.report.tally.reported_input_tokens == 10u);
    CHECK(got.report.tally.source() == weir::usage_source::reported);
    CHECK(got.events == got.report.tally.chunks);
    // The 200's rate-limit headers reach the classifier, and through it the pacing.
    CHECK(got.judged.kind == weir::verdict::success);
    CHECK(got.judged.hint.requests.limit == 600);
    CHECK(got.judged.hint.requests.remaining == 599);
  }
}

TEST_CASE("the mock provider's stream faults: a slow first token, a stall and a reset half way") {
  using namespace std::chrono_literals;
  using weir::http::dialect;
  SECTION("a slow first token is a timeout before the stream opens: retryable") {
    const auto got = stream_once(streaming_mock({.slow_first_tokens = 1, .first_token_delay = 2s}),
                                 dialect::openai, {.first_token = 200ms});
    CHECK_FALSE(got.opened);
    CHECK(code_of(got.failure) == weir::error_code(weir::error::timeout));
    CHECK(weir::default_classifier::classify(got.failure).kind == weir::verdict::retryable);
  }
  SECTION("a stall half way breaks the stream at the idle timeout") {
    const auto got = stream_once(streaming_mock({.stall = 2'000ms, .stream_stalls = 1}),
                                 dialect::anthropic, {.idle = 200ms});
    REQUIRE(got.opened);
    CHECK(code_of(got.failure) == weir::error_code(weir::error::stream_broken));
    CHECK(got.events > 0);
  }
  SECTION("a reset half way breaks the stream; the tokens it sent are counted") {
    const auto got = stream_once(streaming_mock({.stream_resets = 1}), dialect::openai);
    REQUIRE(got.opened);
    CHECK(code_of(got.failure) == weir::error_code(weir::error::stream_broken));
    CHECK(got.events > 0);
  }
  SECTION("a 429 before the stream is a status_error judged by its Retry-After") {
    auto options =
        streaming_mock({.random_429 = 1, .random_429_min = 2'000ms, .random_429_max = 2'000ms});
    const auto got = stream_once(options, dialect::anthropic);
    CHECK_FALSE(got.opened);
    const auto judged = weir::default_classifier::classify(got.failure);
    CHECK(judged.kind == weir::verdict::rate_limited);
    REQUIRE(judged.hint.retry_after);
    CHECK(*judged.hint.retry_after == std::chrono::seconds(2));
  }
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

TEST_CASE("the chat client writes each dialect's request, escaped, and parses endpoints") {
  const weir::http::chat_request r{.model = "m", .prompt = "a \"quote\"\n\\ \x01", .max_tokens = 7};
  CHECK(weir::http::chat_body(weir::http::dialect::openai, r) ==
        R"({"model":"m","messages":[{"role":"user","content":"a \"quote\"\n\\ \u0001"}],)"
        R"("max_tokens":7})");
  CHECK(weir::http::chat_body(weir::http::dialect::anthropic, r) ==
        R"({"model":"m","max_tokens":7,"messages":[{"role":"user","content":)"
        R"("a \"quote\"\n\\ \u0001"}]})");
  CHECK(weir::http::auth_headers(weir::http::dialect::anthropic, "k").front().first == "x-api-key");
  CHECK(weir::http::auth_headers(weir::http::dialect::openai, "").empty());

  const auto e = weir::http::endpoint::parse("https://api.example.com/v1/");
  CHECK((e.tls && e.host == "api.example.com" && e.port == "443" && e.path == "/v1"));
  const auto local = weir::http::endpoint::parse("http://127.0.0.1:8080");
  CHECK((!local.tls && local.port == "8080" && local.path.empty()));
  CHECK_THROWS_AS(weir::http::endpoint::parse("ftp://x"), std::invalid_argument);
  CHECK_THROWS_AS(weir::http::endpoint::parse("http://:80/v1"), std::invalid_argument);
  CHECK_THROWS_AS(weir::http::endpoint::parse("http://host:/v1"), std::invalid_argument);
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

// ---- Issue 36: the Beast client against a hostile server on loopback ---------------------------

namespace {
namespace asio = boost::asio;
using hostile = weir::testing::hostile_server;

// Runs `body` (a coroutine using the client) to its end on a fresh io_context; what it threw is
// rethrown.
template <class Body>
void client_run(Body body) {
  asio::io_context io(1);
  std::exception_ptr failed;
  asio::co_spawn(io, body(io.get_executor()), [&](std::exception_ptr e) { failed = e; });
  io.run();
  if (failed) std::rethrow_exception(failed);
}

weir::error_code code_of_failure(const std::function<void()>& f) {
  try {
    f();
  } catch (const boost::system::system_error& e) {
    return e.code();
  }
  return {};
}

std::string ok(std::string_view body, std::string_view headers = "") {
  return fmt::format("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{}", body.size(), headers,
                     body);
}
}  // namespace

TEST_CASE("the Beast client skips 1xx responses and reads the final one", "[http][issue36]") {
  for (std::string_view interim :
       {"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n"}) {
    hostile server({std::string(interim) + ok("first"), ok("second")});
    client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
      weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
      const auto a = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
      const auto b = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
      CHECK(a.result_int() == 200);
      CHECK(a.body() == "first");
      CHECK(b.body() == "second");  // not the first caller's answer
    });
  }
}

TEST_CASE("a connection with bytes past the response is not reused", "[http][issue36]") {
  hostile server({ok("first") + ok("stale"), ok("fresh")});
  client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
    // (co_await outside CHECK: g++ 12 evaluates it twice there.)
    const auto a = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
    const auto b = co_await c.post("/", "{}", {}, std::chrono::seconds(5));
    CHECK(a.body() == "first");
    CHECK(b.body() == "fresh");
  });
  CHECK(server.connections() == 2);
}

TEST_CASE("a header value with CR LF is refused before anything is sent, naming the header only",
          "[http][issue36]") {
  hostile server({ok("x")});
  const std::string key = "sk-secret\r\nX-Injected: 1";
  try {
    weir::http::chat_client c(asio::system_executor(), weir::http::dialect::openai,
                              weir::http::endpoint::parse(server.url()), key);
    FAIL("a key with CR LF was taken");
  } catch (const weir::exception& e) {
    CHECK(e.code() == weir::error::invalid_argument);
    const std::string what = e.what();
    CHECK(what.find("authorization") != std::string::npos);
    CHECK(what.find("sk-secret") == std::string::npos);
    CHECK(what.find("Injected") == std::string::npos);
  }
  for (const std::string& value :
       {std::string("a\r\nb"), std::string("a\0b", 3), std::string("a\nb")}) {
    const auto code = code_of_failure([&] {
      client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
        weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
        weir::http::header_list headers{{"x-request-id", value}};
        co_await c.post("/", "{}", headers, std::chrono::seconds(5));
      });
    });
    CHECK(code == weir::error::invalid_argument);
  }
  CHECK(server.requests().empty());
}

TEST_CASE("the Host header keeps a non-default port", "[http][issue36]") {
  hostile server({ok("x")});
  client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::http::client c(ex, weir::http::endpoint::parse(server.url()));
    co_await c.post("/", "{}", {}, std::chrono::seconds(5));
  });
  REQUIRE(server.requests().size() == 1);
  CHECK(server.requests()[0].find(fmt::format("Host: 127.0.0.1:{}\r\n", server.port())) !=
        std::string::npos);
}

TEST_CASE("the Beast client's limits: headers over 8 KB are read, past the limits are fatal",
          "[http][issue36]") {
  const std::string big_headers = fmt::format("X-Padding: {}\r\n", std::string(20'000, 'p'));
  auto post_with = [&](weir::http::response_limits limits, std::string reply) {
    hostile server({std::move(reply)});
    std::optional<unsigned> status;
    const auto code = code_of_failure([&] {
      client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
        weir::http::client c(ex, weir::http::endpoint::parse(server.url()), nullptr, limits);
        status = (co_await c.post("/", "{}", {}, std::chrono::seconds(5))).result_int();
      });
    });
    return std::pair(status, code);
  };
  CHECK(post_with({}, ok("x", big_headers)).first == 200u);
  CHECK(post_with({.max_header_bytes = 4096}, ok("x", big_headers)).second ==
        weir::error::limit_exceeded);
  // 1xx responses count toward it: an endless run of them ends.
  std::string interims;
  for (int i = 0; i < 200; ++i) interims += "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
  CHECK(post_with({.max_header_bytes = 4096}, interims + ok("x")).second ==
        weir::error::limit_exceeded);
  CHECK(post_with({.max_body_bytes = 1024}, ok(std::string(2048, 'b'))).second ==
        weir::error::limit_exceeded);
  const auto limited = weir::outcome<int>::from_exception(std::make_exception_ptr(
      weir::exception(weir::error::limit_exceeded, "http::client: the response's body passed")));
  CHECK(weir::default_classifier{}(limited).kind == weir::verdict::fatal);
}

TEST_CASE("an endless event-stream line ends in limit_exceeded, its memory bounded",
          "[http][issue36]") {
  const std::string head =
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
  const std::string endless_line =
      fmt::format("100000\r\ndata: {}\r\n", std::string(0x100000 - 6, 'x'));
  hostile server({head + endless_line});
  const auto code = code_of_failure([&] {
    client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
      weir::http::chat_client c(ex, weir::http::dialect::openai,
                                weir::http::endpoint::parse(server.url()), "k", nullptr,
                                {.max_sse_line_bytes = 64 * 1024});
      const weir::http::chat_request ask{.model = "m", .prompt = "p"};
      auto events = co_await c.open_events(ask, std::chrono::seconds(5));
      while (co_await events->next()) {
      }
    });
  });
  CHECK(code == weir::error::limit_exceeded);
}

TEST_CASE(
    "a stream past max_transfer_time ends, and an error body that trickles ends by its "
    "timeout",
    "[http][issue36]") {
  SECTION("a stream that never ends") {
    std::string events =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 3000; ++i) events += "f\r\ndata: {\"n\":1}\n\n\r\n";
    hostile server({events}, {.trickle_bytes = 64, .pause = std::chrono::milliseconds(20)});
    const auto started = std::chrono::steady_clock::now();
    const auto code = code_of_failure([&] {
      client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
        weir::http::chat_client c(ex, weir::http::dialect::openai,
                                  weir::http::endpoint::parse(server.url()), "k", nullptr,
                                  {.max_transfer_time = std::chrono::milliseconds(300)});
        const weir::http::chat_request ask{.model = "m", .prompt = "p"};
        auto source = co_await c.open_events(ask, std::chrono::seconds(5));
        while (co_await source->next()) {
        }
      });
    });
    CHECK(code == weir::error::limit_exceeded);
    CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));  // 20 s in all
  }
  SECTION("a 429 whose body comes a byte at a time") {
    const std::string reply = fmt::format(
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 200\r\n\r\n{}",
        std::string(200, 'e'));
    hostile server({reply}, {.trickle_bytes = 1,
                             .at_once = reply.size() - 200,
                             .pause = std::chrono::milliseconds(20)});
    const auto started = std::chrono::steady_clock::now();
    std::optional<unsigned> status;
    std::optional<std::chrono::nanoseconds> retry_after;
    client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
      weir::http::chat_client c(ex, weir::http::dialect::openai,
                                weir::http::endpoint::parse(server.url()), "k");
      const weir::http::chat_request ask{.model = "m", .prompt = "p"};
      try {
        co_await c.open_events(ask, std::chrono::milliseconds(500));
      } catch (const weir::http::status_error& e) {
        status = e.status();
        retry_after = e.judged().hint.retry_after;
      }
    });
    CHECK(status == 429u);  // judged by what came, the Retry-After kept
    CHECK(retry_after == std::chrono::seconds(7));
    // The body is cut at the timeout, 0.5 s (it would take 4 s).
    CHECK(std::chrono::steady_clock::now() - started < std::chrono::milliseconds(2500));
  }
}

// ---- Issue 31: errors inside a 200 stream, and times counted from the request ------------------

using namespace std::chrono_literals;

namespace {
// A 200 event stream whose body is `events`.
std::string event_stream(std::string_view events) {
  return fmt::format(
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{}",
      events.size(), events);
}
const std::string openai_role =
    "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
const std::string openai_hi = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
const std::string openai_done = "data: [DONE]\n\n";

// What a streamed chat call through a retry came to: the events read, or the failure.
struct streamed_call {
  std::vector<weir::http::sse::event> events;
  std::exception_ptr failure;
  bool opened = false;
  weir::stream_report report{};
};

streamed_call stream_through_retry(const hostile& server, weir::http::dialect speaks,
                                   weir::stream_options<weir::http::sse::event> options = {}) {
  streamed_call out;
  client_run([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::http::chat_client c(ex, speaks, weir::http::endpoint::parse(server.url()), "k");
    weir::retry<> retry({.max_attempts = 3, .backoff = weir::backoff::constant(10ms)});
    auto guarded = weir::pipeline(retry);
    const weir::http::chat_request ask{.model = "m", .prompt = "p"};
    weir::call_context ctx{.tokens = 10};
    try {
      auto s = co_await guarded(ctx, [&] { return c.stream(ask, options, 5s); });
      out.opened = true;
      for (;;) {
        auto e = co_await s.next();
        if (!e) break;
        out.events.push_back(std::move(*e));
      }
      out.report = s.report();
    } catch (...) {
      out.failure = std::current_exception();
    }
  });
  return out;
}

weir::verdict verdict_of(const std::exception_ptr& e) {
  return weir::default_classifier{}(weir::outcome<int>::from_exception(e)).kind;
}
}  // namespace

TEST_CASE("the Beast stream: an error event before content is retried as its type says",
          "[http][issue31]") {
  SECTION("OpenAI's rate limit, after the role chunk") {
    hostile server(
        {event_stream(openai_role +
                      "data: {\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\","
                      "\"param\":null,\"code\":\"rate_limit_exceeded\"}}\n\n"),
         event_stream(openai_role + openai_hi + openai_done)});
    const auto got = stream_through_retry(server, weir::http::dialect::openai);
    CHECK_FALSE(got.failure);
    CHECK(server.requests().size() == 2);
    REQUIRE(got.events.size() == 2);
    CHECK(got.events[1].data.find("Hi") != std::string::npos);
    CHECK(got.report.end == weir::stream_end::completed);
  }
  SECTION("Anthropic's overloaded error, after message_start") {
    const std::string start =
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":"
        "{\"input_tokens\":5}}}\n\n";
    hostile server(
        {event_stream(start + "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":"
                              "\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"),
         event_stream(start + "event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
                              "\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n"
                              "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")});
    const auto got = stream_through_retry(server, weir::http::dialect::anthropic);
    CHECK_FALSE(got.failure);
    CHECK(server.requests().size() == 2);
    REQUIRE(got.events.size() == 2);
    CHECK(got.events[1].type == "content_block_delta");
  }
}

TEST_CASE("the Beast stream: an error event after content breaks the stream with its verdict",
          "[http][issue31]") {
  hostile server({event_stream(openai_role + openai_hi +
                               "data: {\"error\":{\"type\":\"tokens\",\"code\":"
                               "\"rate_limit_exceeded\"}}\n\n" +
                               openai_hi + openai_done)});
  const auto got = stream_through_retry(server, weir::http::dialect::openai);
  CHECK(got.opened);
  CHECK(got.events.size() == 2);  // the role and the text; not the error, nor what followed it
  REQUIRE(got.failure);
  CHECK(weir::detail::weir_code(got.failure) == weir::error_code(weir::error::stream_broken));
  CHECK(verdict_of(got.failure) == weir::verdict::rate_limited);
  CHECK(server.requests().size() == 1);  // delivered, so not retried
}

TEST_CASE(
    "the Beast stream counts its times from the request: a server that sends its headers with "
    "the first token after 400 ms",
    "[http][issue31]") {
  const auto late = [] {
    return std::make_unique<hostile>(
        std::vector<std::string>{event_stream(openai_role + openai_hi + openai_done)},
        weir::testing::hostile_server_options{.answer_after = 400ms});
  };
  SECTION("the time to first token includes the wait for the headers") {
    const auto server = late();
    const auto got = stream_through_retry(*server, weir::http::dialect::openai);
    REQUIRE(got.opened);
    CHECK(got.report.time_to_first_token >= 300ms);
    CHECK(got.report.time_to_first_token < 5s);
  }
  SECTION("a total of 300 ms passes before the first token: a retryable timeout") {
    const auto server = late();
    const auto started = std::chrono::steady_clock::now();
    const auto got = stream_through_retry(*server, weir::http::dialect::openai, {.total = 300ms});
    CHECK_FALSE(got.opened);
    REQUIRE(got.failure);
    // Every attempt timed out (the server answers only the first, after 400 ms).
    CHECK(verdict_of(got.failure) == weir::verdict::retryable);
    CHECK(std::chrono::steady_clock::now() - started < 5s);
  }
}

// ---- Issue 33: trace context -----------------------------------------------------------------

TEST_CASE("the Beast client sends each attempt's traceparent; the server reads a new span each",
          "[http][trace]") {
  demo::asio::io_context io(1);
  weir::testing::mock_provider server(io.get_executor(),
                                      {.name = "m",
                                       .models = {{"small", 0, 0, 0}},
                                       .base_latency = std::chrono::microseconds(0),
                                       .faults = {.server_errors = 1.0}});  // every answer a 500
  server.start();
  weir::http::chat_client client(io.get_executor(), weir::http::dialect::openai,
                                 weir::http::endpoint::parse(server.base_url()));
  using retry_type = weir::retry<std::chrono::steady_clock, weir::http::response_classifier>;
  auto guarded = weir::pipeline(retry_type(
      {.max_attempts = 3, .backoff = weir::backoff::constant(std::chrono::milliseconds(1))}));
  const auto caller = weir::trace_context::parse(
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "congo=t61rcWkgMzE");
  REQUIRE(caller);
  std::vector<weir::trace_context> given;
  int answered = 0;
  demo::asio::co_spawn(
      io,
      [&]() -> demo::asio::awaitable<void> {
        const weir::http::chat_request ask{.model = "small", .prompt = "hi", .max_tokens = 4};
        weir::call_context traced{.operation = "chat", .trace = *caller};
        auto send = [&](const weir::trace_context& attempt) {
          given.push_back(attempt);
          return client.complete(ask, std::chrono::seconds(5), weir::http::trace_headers(attempt));
        };
        answered += (co_await guarded(traced, send)).result_int() == 500;
        weir::call_context untraced{.operation = "chat"};
        answered += (co_await guarded(untraced, send)).result_int() == 500;
        server.stop();
      },
      demo::asio::detached);
  io.run();
  CHECK(answered == 2);  // each call's last 500, after three attempts
  const auto seen = server.stats().traceparents;
  REQUIRE(seen.size() == 6);
  REQUIRE(given.size() == 6);
  std::set<std::string> spans;
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("attempt " << i + 1 << ": " << seen[i]);
    CHECK(seen[i] == given[i].traceparent());  // what the operation was given is what went
    const auto read = weir::trace_context::parse(seen[i]);
    REQUIRE(read);
    CHECK(read->trace_id == caller->trace_id);
    CHECK(read->parent_id != caller->parent_id);
    CHECK(read->sampled());
    spans.insert(seen[i].substr(36, 16));
  }
  CHECK(spans.size() == 3);
  for (std::size_t i = 3; i < 6; ++i) CHECK(seen[i].empty());  // no context: no header
  const auto headers = weir::http::trace_headers(*caller);
  REQUIRE(headers.size() == 2);
  CHECK(headers[1] == std::pair<std::string, std::string>("tracestate", "congo=t61rcWkgMzE"));
  CHECK(weir::http::trace_headers({}).empty());
}
