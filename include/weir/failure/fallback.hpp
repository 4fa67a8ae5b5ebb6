// Turns chosen failures into a value or an alternative operation — a cached answer, a smaller
// model, a canned reply — as Polly's and Resilience4j's fallback do, for code that does not use
// the router (which falls back across models itself).
//
//     weir::fallback canned(
//         [](const weir::outcome<reply>& failed) -> asio::awaitable<reply> {
//           co_return reply{"The assistant is busy; try again in a minute."};
//         },
//         {.name = "canned reply", .watch = log});
//     auto guarded = weir::pipeline(canned, retry, breaker);   // outermost: after the retries
//     auto answer = co_await guarded(ctx, [&] { return client.complete(request); });
//
// The handler takes the failed outcome and returns a T or an asio::awaitable<T>; what it throws
// is the call's failure. Which failures it replaces: those its classifier judges one of
// `handles` (all of them by default), never a cancellation. With a classifier of responses
// (http::response_classifier), a value can be a failure too: a 503 gets the canned reply — name
// the options' type for it: `weir::basic_fallback_options<weir::http::response_classifier>{...}`.
// Each use is a `fallback_used` event naming the original failure, sent to the observer of the
// pipeline the fallback runs in, or, used alone or where nobody listens, to its own `watch`.
#pragma once

#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>

#include <boost/asio/awaitable.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace weir {

// Classifier: what judges the call's outcome (outcome.hpp), for `handles`.
template <class Classifier = default_classifier>
struct basic_fallback_options {
  std::string name = "fallback";
  std::string operation{};  // named in its events, when the call names none
  // The failures it replaces, as the classifier judges them; a cancellation never is (a caller
  // that asked to stop gets no substitute).
  std::vector<verdict> handles{verdict::retryable, verdict::rate_limited, verdict::fatal,
                               verdict::exhausted};
  // fallback_used events, when the fallback is used alone or its pipeline has no observer.
  observer watch{};
  Classifier classifier{};
};
using fallback_options = basic_fallback_options<>;

namespace detail {
template <class R>
struct is_awaitable : std::false_type {};
template <class T, class E>
struct is_awaitable<boost::asio::awaitable<T, E>> : std::true_type {};
}  // namespace detail

// Copies share the handler and options. As a policy alone, `fallback(op)`; in a pipeline, it
// wraps the policies after it.
template <class Handler, class Classifier = default_classifier>
class fallback {
 public:
  using options_type = basic_fallback_options<Classifier>;

  explicit fallback(Handler handler, options_type options = {})
      : state_(std::make_shared<const state>(state{std::move(handler), std::move(options)})) {}

  // Runs `op`; a failure it handles is replaced by the handler's answer.
  template <class Op>
  auto operator()(Op op) const {
    using T = awaitable_value_t<std::invoke_result_t<Op&>>;
    return run<T>(state_, std::move(op), {}, nullptr);
  }

  // The same in a pipeline, which calls it with the call and its observer: the event goes to
  // that observer, when there is one, named for the call's operation.
  template <class Clock, class Op>
  auto operator()(const stage_context<Clock>& call, Op op) const {
    using T = awaitable_value_t<std::invoke_result_t<Op&>>;
    return run<T>(state_, std::move(op), call.call.operation, call.watch);
  }

  const std::string& name() const noexcept { return state_->options.name; }

 private:
  struct state {
    Handler handler;
    options_type options;

    bool handles(verdict kind) const {
      return std::find(options.handles.begin(), options.handles.end(), kind) !=
             options.handles.end();
    }
  };

  // `pipeline`: the observer of the pipeline it runs in, if any; `operation`: the call's.
  template <class T, class Op>
  static boost::asio::awaitable<T> run(std::shared_ptr<const state> s, Op op,
                                       std::string_view operation, const observer* pipeline) {
    auto result = co_await capture(op());
    const classification judged = s->options.classifier(result);
    if (judged.kind == verdict::success || result.cancelled() || !s->handles(judged.kind))
      co_return std::move(result).get();
    const observer* watch = pipeline ? pipeline : (s->options.watch ? &s->options.watch : nullptr);
    if (watch) {
      const auto failure = result.failure();
      const fallback_used used{
          operation.empty() ? std::string_view(s->options.operation) : operation, judged.kind,
          result.code(), failure, s->options.name};
      (*watch)(used);
    }
    using answer = std::invoke_result_t<const Handler&, const outcome<T>&>;
    if constexpr (detail::is_awaitable<answer>::value) {
      auto alternative = s->handler(std::as_const(result));
      co_return co_await std::move(alternative);
    } else {
      co_return s->handler(std::as_const(result));
    }
  }

  std::shared_ptr<const state> state_;
};

}  // namespace weir
