// Specifications of the OpenTelemetry GenAI client metrics weir/observability/metrics.hpp writes
// from the router's model_call_ended events (after metrics_test.cpp and stream_test.cpp, whose
// helpers it uses: see tests/CMakeLists.txt).
#include "../support/common.hpp"
#include "../support/composition.hpp"

#include <weir/http/usage.hpp>
#include <weir/observability/metrics.hpp>
#include <weir/routing/catalog_json.hpp>
#include <weir/routing/router.hpp>
#include <weir/testing/fake_provider.hpp>

#include <thread>

namespace {
// The `le` bounds of one histogram series, in order, without +Inf.
std::vector<double> bucket_bounds(const std::map<std::string, double>& samples,
                                  const std::string& bucket_prefix) {
  std::vector<double> bounds;
  for (const auto& [key, value] : samples) {
    if (key.rfind(bucket_prefix, 0) != 0) continue;
    const auto le = key.substr(bucket_prefix.size());  // `<bound>"}`
    const auto bound = le.substr(0, le.find('"'));
    if (bound != "+Inf") bounds.push_back(std::stod(bound));
  }
  std::sort(bounds.begin(), bounds.end());
  return bounds;
}

template <std::size_t N>
std::vector<double> as_vector(const std::array<double, N>& a) {
  return {a.begin(), a.end()};
}

// The sum of every sample of `family` (e.g. "gen_ai_client_token_usage_sum").
double total(const std::map<std::string, double>& samples, const std::string& family) {
  double sum = 0;
  for (const auto& [key, value] : samples)
    if (key.rfind(family + "{", 0) == 0) sum += value;
  return sum;
}

// Routes a request and reads the stream it returns to its end at once.
asio::awaitable<void> route_then_read(stream_router& router, reader& r) {
  auto answer = co_await router.route("hi", {.input_tokens = 100, .output_tokens = 50});
  co_await r.read(answer.response);
}

using answer_router = weir::routing::router<std::string, weir::testing::fake_response, clock_type,
                                            weir::testing::fake_classifier>;
}  // namespace

TEST_CASE(
    "the router's calls are OpenTelemetry's GenAI client metrics: names, attributes, buckets and "
    "the tokens it settled",
    "[metrics][gen_ai]") {
  asio::io_context io;
  weir::routing::catalog models;
  models.add(weir::routing::model_spec{
      .provider = "openai", .id = "gpt-4o-mini", .input_price = 0.15, .output_price = 0.6});
  models.add(weir::routing::model_spec{
      .provider = "gemini", .id = "gemini-2.0-flash", .input_price = 1, .output_price = 4});
  weir::metrics counted("router");
  answer_router::options_type o;
  o.adaptation.reset();
  o.watch = counted.observer();
  o.usage_of = [](const weir::testing::fake_response& r) { return std::optional(r.usage); };
  o.response_model_of = [](const weir::testing::fake_response& r) {
    return r.status == 200 ? r.model + "-2024-07-18" : std::string();
  };
  answer_router router(io.get_executor(), models, o);
  weir::testing::fake_provider<clock_type> openai, gemini;
  openai.latency = 300ms;
  gemini.latency = 3s;
  openai.script = [n = 0](const weir::routing::model_spec&, clock_type::time_point) mutable {
    if (n++ == 0) return weir::testing::fake_response::too_many(10s);
    return weir::testing::fake_response::ok({.input_tokens = 1000,
                                             .output_tokens = 200,
                                             .cache_read_tokens = 600,
                                             .cache_write_tokens = 100});
  };
  gemini.script = [](const weir::routing::model_spec&, clock_type::time_point) {
    return weir::testing::fake_response::ok({.input_tokens = 2000, .output_tokens = 50});
  };
  router.connect("openai", openai.call<std::string>());
  router.connect("gemini", gemini.call<std::string>());

  // The first route meets openai's 429 and falls back to gemini; the second is openai's.
  std::uint64_t settled = 0;
  for (int i = 0; i < 2; ++i) {
    weir_test::finished<weir::routing::routed<weir::testing::fake_response>> call;
    call.start(io, router.route("hi", {.input_tokens = 500, .output_tokens = 100}));
    advance<clock_type>(io, 4s);
    REQUIRE(call.value);
    settled += call.value->route.settled_tokens;
  }
  CHECK(settled == 2000 + 50 + 1000 + 200);

  std::string page;
  weir::write_prometheus(page, {&counted});
  const auto samples = parse_prometheus(page);
  for (const auto* family :
       {"gen_ai_client_operation_duration_seconds", "gen_ai_client_token_usage",
        "gen_ai_client_operation_time_to_first_chunk_seconds"})
    CHECK(page.find(fmt::format("# TYPE {} histogram\n", family)) != std::string::npos);

  const std::string openai_call =
      R"(pipeline="router",gen_ai_operation_name="chat",gen_ai_provider_name="openai",)"
      R"(gen_ai_request_model="gpt-4o-mini")";
  const std::string openai_answer =
      openai_call + R"(,gen_ai_response_model="gpt-4o-mini-2024-07-18")";
  const std::string gemini_answer =
      R"(pipeline="router",gen_ai_operation_name="chat",gen_ai_provider_name="gcp.gemini",)"
      R"(gen_ai_request_model="gemini-2.0-flash",)"
      R"(gen_ai_response_model="gemini-2.0-flash-2024-07-18")";
  const std::string duration = "gen_ai_client_operation_duration_seconds";
  const std::string refused = openai_call + R"(,error_type="rate_limited")";

  // Durations: the refused call carries error.type, each answer its response model.
  CHECK(samples.at(duration + "_count{" + refused + "}") == 1);
  CHECK(samples.at(duration + "_sum{" + refused + "}") == Approx(0.3));
  CHECK(samples.at(duration + "_bucket{" + refused + R"(,le="0.16"})") == 0);
  CHECK(samples.at(duration + "_bucket{" + refused + R"(,le="0.32"})") == 1);
  CHECK(samples.at(duration + "_count{" + openai_answer + "}") == 1);
  CHECK(samples.at(duration + "_sum{" + gemini_answer + "}") == Approx(3));
  CHECK(samples.at(duration + "_bucket{" + gemini_answer + R"(,le="2.56"})") == 0);
  CHECK(samples.at(duration + "_bucket{" + gemini_answer + R"(,le="5.12"})") == 1);
  CHECK(samples.at(duration + "_bucket{" + gemini_answer + R"(,le="+Inf"})") == 1);
  CHECK(bucket_bounds(samples, duration + "_bucket{" + refused + ",le=\"") ==
        as_vector(weir::gen_ai_duration_bounds));
  CHECK(weir::gen_ai_duration_bounds.front() == 0.01);
  CHECK(weir::gen_ai_duration_bounds.back() == 81.92);

  // Token usage by type; the refused call used none, and no series says error_type.
  const std::string usage = "gen_ai_client_token_usage";
  const auto typed = [](const std::string& labels, const char* type) {
    return fmt::format("{},gen_ai_token_type=\"{}\"", labels, type);
  };
  CHECK(samples.at(usage + "_sum{" + typed(openai_answer, "input") + "}") == 1000);
  CHECK(samples.at(usage + "_sum{" + typed(openai_answer, "output") + "}") == 200);
  CHECK(samples.at(usage + "_bucket{" + typed(openai_answer, "input") + R"(,le="256"})") == 0);
  CHECK(samples.at(usage + "_bucket{" + typed(openai_answer, "input") + R"(,le="1024"})") == 1);
  CHECK(samples.at(usage + "_bucket{" + typed(gemini_answer, "output") + R"(,le="16"})") == 0);
  CHECK(samples.at(usage + "_bucket{" + typed(gemini_answer, "output") + R"(,le="64"})") == 1);
  CHECK(bucket_bounds(samples, usage + "_bucket{" + typed(gemini_answer, "input") + ",le=\"") ==
        as_vector(weir::gen_ai_token_bounds));
  CHECK(weir::gen_ai_token_bounds.back() == 67108864);
  CHECK(total(samples, usage + "_sum") == settled);
  CHECK(total(samples, usage + "_count") == 4);  // two answers, input and output each
  CHECK(page.find("gen_ai_client_token_usage_count{" + refused) == std::string::npos);
  CHECK(samples.at("weir_gen_ai_cached_input_tokens_total{" + openai_answer +
                   R"(,gen_ai_token_cache="read"})") == 600);
  CHECK(samples.at("weir_gen_ai_cached_input_tokens_total{" + openai_answer +
                   R"(,gen_ai_token_cache="creation"})") == 100);
  // Whole answers have no first chunk.
  CHECK(page.find("gen_ai_client_operation_time_to_first_chunk_seconds_count") ==
        std::string::npos);
  CHECK(counted.read().gen_ai.size() == 3);
}

TEST_CASE(
    "a routed stream records its time to first chunk and, at its end, its duration and the "
    "tokens it reported or counted",
    "[metrics][gen_ai][stream]") {
  asio::io_context io;
  weir::routing::catalog models;
  models.add(weir::routing::provider_spec{.name = "b", .gen_ai_name = "anthropic"});
  const auto priced = cheap_and_dear();
  for (const auto& m : priced.models()) models.add(m);
  weir::metrics counted("streams");
  std::vector<weir::stream_ended> ended;
  stream_router::options_type o;
  o.adaptation.reset();
  o.watch = weir::fan_out(counted.observer(), [&](const weir::event& e) {
    if (auto* s = std::get_if<weir::stream_ended>(&e)) ended.push_back(*s);
  });
  stream_router router(io.get_executor(), models, o);
  scripted a, b;
  a.scripts = {{{step::reset, 200ms}}};  // fails before its first chunk, every time
  auto reported = tokens(3, 400ms);
  reported.push_back({step::usage, 100ms, {.input_tokens = 100, .output_tokens = 3}});
  reported.push_back({step::end, 100ms});
  auto broken = tokens(2, 200ms);
  broken.push_back({step::reset, 100ms});
  b.scripts = {reported, broken};
  router.connect("a", [&](const weir::routing::model_spec&, const std::string&) { return a()(); });
  router.connect("b", [&](const weir::routing::model_spec&, const std::string&) { return b()(); });

  const auto route_and_read = [&] {
    reader r;
    asio::co_spawn(io, route_then_read(router, r), asio::detached);
    advance<clock_type>(io, 3s);
    REQUIRE(r.done);
  };

  const std::string a_call =
      R"(pipeline="streams",gen_ai_operation_name="chat",gen_ai_provider_name="a",)"
      R"(gen_ai_request_model="a-small",error_type="retryable")";
  const std::string b_answer =
      R"(pipeline="streams",gen_ai_operation_name="chat",gen_ai_provider_name="anthropic",)"
      R"(gen_ai_request_model="b-large")";
  const std::string first_chunk = "gen_ai_client_operation_time_to_first_chunk_seconds";
  const std::string duration = "gen_ai_client_operation_duration_seconds";
  const std::string usage = "gen_ai_client_token_usage";

  route_and_read();  // a fails in 200 ms; b's first chunk after 400 ms, its end after 800 ms
  std::string page;
  weir::write_prometheus(page, {&counted});
  auto samples = parse_prometheus(page);
  CHECK(samples.at(duration + "_count{" + a_call + "}") == 1);
  CHECK(samples.at(duration + "_sum{" + a_call + "}") == Approx(0.2));
  CHECK(page.find(first_chunk + "_count{" + a_call) == std::string::npos);
  CHECK(samples.at(first_chunk + "_sum{" + b_answer + "}") == Approx(0.4));
  CHECK(samples.at(first_chunk + "_bucket{" + b_answer + R"(,le="0.32"})") == 0);
  CHECK(samples.at(first_chunk + "_bucket{" + b_answer + R"(,le="0.64"})") == 1);
  CHECK(bucket_bounds(samples, first_chunk + "_bucket{" + b_answer + ",le=\"") ==
        as_vector(weir::gen_ai_duration_bounds));
  CHECK(samples.at(duration + "_sum{" + b_answer + "}") == Approx(0.8));
  REQUIRE(ended.size() == 1);
  CHECK(total(samples, usage + "_sum") == ended[0].tokens);  // 100 in + 3 out, as reported

  route_and_read();  // b breaks after two chunks: its duration says so, its tokens are counted
  page.clear();
  weir::write_prometheus(page, {&counted});
  samples = parse_prometheus(page);
  const std::string b_broken = b_answer + R"(,error_type="stream_broken")";
  CHECK(samples.at(duration + "_count{" + b_broken + "}") == 1);
  CHECK(samples.at(duration + "_sum{" + b_broken + "}") == Approx(0.4));
  CHECK(samples.at(duration + "_count{" + a_call + "}") == 2);
  CHECK(samples.at(first_chunk + "_count{" + b_answer + "}") == 2);  // the broken one's too
  CHECK(samples.at(first_chunk + "_sum{" + b_answer + "}") == Approx(0.6));
  const auto typed = [&](const char* type) {
    return fmt::format("{},gen_ai_token_type=\"{}\"", b_answer, type);
  };
  CHECK(samples.at(usage + "_count{" + typed("output") + "}") == 2);
  CHECK(samples.at(usage + "_sum{" + typed("output") + "}") == 3 + 2);
  CHECK(samples.at(usage + "_count{" + typed("input") + "}") == 1);  // never the estimate
  CHECK(page.find(first_chunk + "_count{" + b_broken) == std::string::npos);
}

TEST_CASE("the GenAI series hold at most max_gen_ai_series label sets and count what they drop",
          "[metrics][gen_ai]") {
  weir::metrics counted("bounded");
  const auto watch = counted.observer();
  std::vector<std::string> ids;
  for (std::size_t i = 0; i < weir::metrics::max_gen_ai_series + 5; ++i)
    ids.push_back(fmt::format("model-{}", i));
  for (const auto& id : ids)
    watch(weir::model_call_ended{.operation = "t",
                                 .provider = "p",
                                 .model = id,
                                 .gen_ai_provider = "p",
                                 .gen_ai_operation = "chat",
                                 .duration = 1s});
  watch(weir::model_call_ended{.operation = "t",
                               .provider = "p",
                               .model = ids[0],
                               .gen_ai_provider = "p",
                               .gen_ai_operation = "chat"});
  const auto s = counted.read();
  CHECK(s.gen_ai.size() == weir::metrics::max_gen_ai_series);
  CHECK(s.gen_ai_dropped == 5);
  CHECK(s.gen_ai.front().request_model == "model-0");  // in order of first event
  CHECK(s.gen_ai.front().duration.count == 2);
  std::string page;
  weir::write_prometheus(page, {&counted});
  CHECK(parse_prometheus(page).at(R"(weir_gen_ai_dropped_total{pipeline="bounded"})") == 5);
}

TEST_CASE("GenAI series recorded from four threads at once lose no call",
          "[metrics][concurrency]") {
  weir::metrics counted("threads");
  constexpr int per_thread = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([watch = counted.observer()] {
      for (int i = 0; i < per_thread; ++i) {
        const std::string model = fmt::format("m{}", i % 8);  // new label sets race too
        watch(weir::model_call_ended{.operation = "t",
                                     .provider = "p",
                                     .model = model,
                                     .gen_ai_provider = "p",
                                     .gen_ai_operation = "chat",
                                     .duration = 20ms,
                                     .input_tokens = 10,
                                     .output_tokens = 1});
      }
    });
  for (auto& t : threads) t.join();
  const auto s = counted.read();
  CHECK(s.gen_ai.size() == 8);
  std::uint64_t calls = 0;
  double input = 0;
  for (const auto& g : s.gen_ai) {
    calls += g.duration.count;
    input += g.input_tokens.sum;
    CHECK(g.duration.buckets[1] == g.duration.count);  // 20 ms: the 0.02 bucket
  }
  CHECK(calls == 4 * per_thread);
  CHECK(input == 10.0 * 4 * per_thread);
}

TEST_CASE(
    "gen_ai.provider.name is the conventions' well-known value, or the catalog's own; "
    "gen_ai.response.model is what the answer names",
    "[gen_ai]") {
  using weir::routing::well_known_gen_ai_provider;
  CHECK(well_known_gen_ai_provider("openai") == "openai");
  CHECK(well_known_gen_ai_provider("anthropic") == "anthropic");
  CHECK(well_known_gen_ai_provider("gemini") == "gcp.gemini");
  CHECK(well_known_gen_ai_provider("mistral") == "mistral_ai");
  CHECK(well_known_gen_ai_provider("vllm") == "vllm");  // none applies: the name itself
  const auto c = weir::routing::load_catalog(R"({
    "providers": [{"name": "eu", "gen_ai_name": "azure.ai.openai"}],
    "models": [{"provider": "eu", "id": "gpt-4o", "capability": 8},
               {"provider": "groq", "id": "llama-8b", "capability": 5}]})");
  CHECK(c.providers()[0].gen_ai_name_or_well_known() == "azure.ai.openai");
  CHECK(c.providers()[1].gen_ai_name_or_well_known() == "groq");
  CHECK(weir::http::reported_model(
            R"({"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06"})") ==
        "gpt-4o-2024-08-06");
  CHECK(weir::http::reported_model(R"({"choices":[]})").empty());
  CHECK(weir::http::reported_model(fmt::format(R"({{"model":"{}"}})", std::string(500, 'x')))
            .empty());
}
