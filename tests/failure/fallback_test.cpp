// Specifications of weir/failure/fallback.hpp, on virtual time.
#include "../support/common.hpp"
#include "../support/composition.hpp"

using weir_test::finished;

namespace {
asio::awaitable<int> ready(int v) { co_return v; }
asio::awaitable<int> failing(weir::error_code ec) {
  throw boost::system::system_error(ec);
  co_return 0;
}

// A response type whose failures are values, as an HTTP client's are.
struct reply {
  unsigned status = 200;
  std::string text;
};
struct reply_classifier {
  template <class T>
  weir::classification operator()(const weir::outcome<T>& o) const {
    if constexpr (std::is_same_v<T, reply>) {
      if (o.has_value()) {
        weir::classification c;
        if (o.value().status >= 500) c.kind = weir::verdict::retryable;
        return c;
      }
    }
    return weir::default_classifier{}(o);
  }
};
asio::awaitable<reply> answer(unsigned status, std::string text) {
  reply r;
  r.status = status;
  r.text = std::move(text);
  co_return r;
}
}  // namespace

TEST_CASE("a fallback replaces a failure with its value and names the failure in its event",
          "[fallback]") {
  asio::io_context io;
  std::vector<std::string> seen;
  weir::fallback canned(
      [](const weir::outcome<int>& failed) {
        CHECK(failed.has_exception());  // the handler sees what failed
        return -1;
      },
      {.name = "canned", .operation = "chat", .watch = [&](const weir::event& e) {
         seen.push_back(fmt::format("{}", e));
       }});
  CHECK(run_to_end(io, canned([] { return failing(asio::error::connection_reset); })) == -1);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0] == "chat: retryable failure (Connection reset by peer), fallback by canned");
  // A success passes untouched and is no event.
  CHECK(run_to_end(io, canned([] { return ready(7); })) == 7);
  CHECK(seen.size() == 1);
}

TEST_CASE("a fallback replaces only the failures it handles, and never a cancellation",
          "[fallback]") {
  asio::io_context io;
  int used = 0;
  weir::fallback only_retryable([&](const weir::outcome<int>&) { return ++used, -1; },
                                {.handles = {weir::verdict::retryable}});
  std::exception_ptr error;
  // A fatal failure (a weir misconfiguration) passes through as it was.
  CHECK_FALSE(run_to_end(io, only_retryable([] { return failing(weir::error::invalid_argument); }),
                         &error));
  CHECK(error);
  CHECK(used == 0);

  // A call cancelled while it waits gets no substitute: the caller asked to stop.
  weir::fallback any([&](const weir::outcome<int>&) { return ++used, -1; });
  asio::cancellation_signal cancel;
  finished<int> f;
  f.start(io, any([] { return weir_test::slow_answer<clock_type>(1h); }), cancel.slot());
  run_ready(io);
  cancel.emit(asio::cancellation_type::terminal);
  run_ready(io);
  REQUIRE(f.done);
  CHECK(f.code() == asio::error::operation_aborted);
  CHECK(used == 0);
}

TEST_CASE("outside a retry, a fallback runs an alternative once the retries give up on a 503",
          "[fallback][pipeline]") {
  asio::io_context io;
  weir::metrics seen("chat");
  weir::retry<clock_type, reply_classifier> retry(
      {.max_attempts = 3, .backoff = weir::backoff::constant(1s)});
  int smaller_model_calls = 0;
  // The alternative is another operation: the same request to a smaller model.
  weir::fallback smaller(
      [&](const weir::outcome<reply>& failed) {
        CHECK(failed.value().status == 503);  // the last attempt's value
        ++smaller_model_calls;
        return answer(200, "from the small model");
      },
      weir::basic_fallback_options<reply_classifier>{.name = "smaller model",
                                                     .watch = seen.observer()});
  auto guarded = weir::pipeline(smaller, retry);
  int large_model_calls = 0;
  std::optional<reply> got;
  asio::co_spawn(io, guarded([&] {
                   ++large_model_calls;
                   return answer(503, "overloaded");
                 }),
                 [&](std::exception_ptr e, reply r) {
                   CHECK_FALSE(e);
                   got = std::move(r);
                 });
  advance<clock_type>(io, 1min);
  REQUIRE(got);
  CHECK(got->text == "from the small model");
  CHECK(large_model_calls == 3);  // the retries ran first: the fallback is outside them
  CHECK(smaller_model_calls == 1);
  std::string page;
  weir::write_prometheus(page, {&seen});
  CHECK_THAT(page,
             Catch::Matchers::Contains(
                 "weir_policy_fallbacks_total{pipeline=\"chat\",policy=\"smaller model\"} 1"));
}

TEST_CASE("in a pipeline, a fallback's event goes to the pipeline's observer, named for the call",
          "[fallback][pipeline]") {
  asio::io_context io;
  weir::metrics seen("chat");
  std::vector<std::string> own, piped;
  weir::fallback canned(
      [](const weir::outcome<int>&) { return -1; },
      {.name = "canned", .operation = "fallback", .watch = [&](const weir::event& e) {
         own.push_back(fmt::format("{}", e));
       }});
  auto guarded = weir::pipeline(
      weir::pipeline_options{.watch =
                                 weir::fan_out(seen.observer(),
                                               [&](const weir::event& e) {
                                                 if (std::holds_alternative<weir::fallback_used>(e))
                                                   piped.push_back(fmt::format("{}", e));
                                               })},
      canned);
  weir::call_context ctx{.operation = "chat"};  // a fallback has no clock: the pipeline's is steady
  CHECK(run_to_end(io, guarded(ctx, [] { return failing(asio::error::connection_reset); })) == -1);
  CHECK(piped == std::vector<std::string>{
                     "chat: retryable failure (Connection reset by peer), fallback by canned"});
  CHECK(own.empty());  // the pipeline's observer hears it instead
  std::string page;
  weir::write_prometheus(page, {&seen});
  CHECK_THAT(page, Catch::Matchers::Contains(
                       "weir_policy_fallbacks_total{pipeline=\"chat\",policy=\"canned\"} 1"));
}

TEST_CASE("a fallback whose own alternative fails fails with that failure", "[fallback]") {
  asio::io_context io;
  weir::fallback broken([](const weir::outcome<int>&) -> asio::awaitable<int> {
    throw weir::exception(weir::error::unavailable, "the cache is down too");
    co_return 0;
  });
  finished<int> f;
  f.start(io, broken([] { return failing(asio::error::connection_refused); }));
  run_ready(io);
  REQUIRE(f.done);
  CHECK(f.code() == weir::error::unavailable);
}
