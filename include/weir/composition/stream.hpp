// A streamed call (server-sent events, a chunked body) through a pipeline or the router:
//
//     auto open = [&]() -> asio::awaitable<weir::stream<weir::http::sse::event>> {
//       auto body = co_await client.start(request);  // your client: headers read, body pending
//       co_return co_await weir::open_stream<weir::http::sse::event>(
//           [body]() { return body->next_event(); },  // awaitable<optional<event>>; nullopt: end
//           {.first_token = 10s, .idle = 5s, .total = 120s, .tally = weir::http::sse::openai_tally,
//            .in_band_error = weir::http::sse::in_band_error,
//            .opening = weir::http::sse::opens_answer});
//     };
//     auto reply = co_await guarded(ctx, open);  // returns at the first chunk
//     while (auto chunk = co_await reply.next()) print(chunk->data);
//
// open_stream returns when the first chunk has come (the first that carries the answer: chunks
// that only open it are held back with it), so everything around it — retry, breaker,
// timeout, fallback, hedging, the router's fallback to another model — acts until the first
// token and no further: a stream that fails before it (or takes longer than `first_token`) is an
// ordinary failure, retryable, and no chunk of it was seen by the caller. After it the caller owns
// the stream: a failure then (a reset, a stall past `idle`, `total` passed) throws
// weir::exception(stream_broken) from next(), with the cause, and is never retried silently.
// An error the server sends inside a stream that began 200 (stream_options::in_band_error) is
// such a failure, judged as its type says: a rate limit or an overload before the first chunk is
// retried and paced, a spent quota is `exhausted`; after it, it breaks the stream.
//
// The stages a stream passed through stay entered until it ends: the queue's slot and the
// breaker's ticket are held, and the limiters, budgets and usage monitor settle when it ends, to
// the tokens it produced: the final usage chunk's (OpenAI's `stream_options.include_usage`,
// Anthropic's `message_delta`), else the output counted chunk by chunk, else the estimate;
// report().tally.source() says which, as does the stream_ended event. A stream the caller stops
// reading (close(), a cancelled next(), or destroyed) ends `abandoned` and settles what it
// produced up to then; one that broke settles as a failure of its cause's verdict.
//
// One coroutine reads a stream at a time, like any Asio I/O object.
#pragma once

#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/stage.hpp>
#include <weir/detail/deadline.hpp>

#include <fmt/format.h>
#include <boost/asio/awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace weir {

// The timeouts of a stream and how its chunks count tokens.
template <class Chunk>
struct stream_options {
  // From open_stream to the first chunk: passing it fails the call with error::timeout
  // (retryable: nothing reached the caller).
  std::optional<std::chrono::nanoseconds> first_token{};
  // Between two chunks after the first: passing it breaks the stream.
  std::optional<std::chrono::nanoseconds> idle{};
  // From open_stream to the last chunk: passing it before the first chunk is a timeout, after it
  // breaks the stream.
  std::optional<std::chrono::nanoseconds> total{};
  // Reads each chunk into the tally: output tokens counted, the final usage when reported.
  // weir/http/sse.hpp has OpenAI's and Anthropic's. Empty: tokens settle to the estimate.
  std::function<void(const Chunk&, stream_tally&)> tally{};
  // Reads each chunk for an error the server sent inside the stream (weir/http/sse.hpp's
  // in_band_error): the failure it returns is not handed over as a chunk. Before the first chunk
  // it is the call's failure, judged as it says (retried, paced, counted by the breaker); after
  // it, it breaks the stream and is the break's cause. Empty: every chunk is content.
  std::function<std::exception_ptr(const Chunk&)> in_band_error{};
  // Whether a chunk only opens the answer (Anthropic's message_start, OpenAI's role-only first
  // delta: sse::opens_answer) rather than carrying it: open_stream holds such chunks back and
  // returns at the first that carries the answer, so that an error sent after them is still the
  // call's failure, and the time to first token is the first content's. Empty: none does.
  std::function<bool(const Chunk&)> opening{};
  // What the response's headers said (rate-limit headers): the classifiers hand it to the pacing
  // when the stream is judged at its first chunk, as they would a whole response's.
  rate_limit_hint server_hint{};
};

// How a stream went, so far.
struct stream_report {
  std::optional<stream_end> end{};  // nullopt while it is open
  stream_tally tally{};
  std::chrono::nanoseconds time_to_first_token{0};
};

template <class Chunk, class Clock = std::chrono::steady_clock>
class basic_stream {
 public:
  using clock_type = Clock;
  using chunk_type = Chunk;
  using time_point = typename Clock::time_point;
  // Reads the next chunk; nullopt at the end. A failure (or cancellation) ends the stream.
  using pull_type = std::function<boost::asio::awaitable<std::optional<Chunk>>()>;

  // An empty stream that has ended.
  basic_stream() = default;
  basic_stream(basic_stream&&) noexcept = default;
  basic_stream& operator=(basic_stream&& other) noexcept {
    if (this != &other) {
      close();
      state_ = std::move(other.state_);
    }
    return *this;
  }
  ~basic_stream() { close(); }

  // The next chunk, or nullopt once the stream has completed (or was closed). Throws
  // weir::exception(stream_broken) — again on every later call — when the stream failed after
  // its first chunk; a cancellation of this call abandons the stream and is rethrown as it is.
  boost::asio::awaitable<std::optional<Chunk>> next() {
    if (!state_) co_return std::nullopt;
    auto& st = *state_;
    if (!st.held.empty()) {
      std::optional<Chunk> out(std::move(st.held.front()));
      st.held.pop_front();
      co_return out;
    }
    if (st.report.end) {
      if (st.failure) std::rethrow_exception(st.failure);
      co_return std::nullopt;
    }
    const auto now = Clock::now();
    std::optional<time_point> deadline;
    const auto tighten = [&](time_point at) {
      if (!deadline || at < *deadline) deadline = at;
    };
    if (st.options.idle) tighten(now + as_duration(*st.options.idle));
    if (st.options.total) tighten(st.opened + as_duration(*st.options.total));

    bool passed = false;
    auto got = co_await pull(st, deadline, passed);
    if (passed) {
      const char* why = st.options.total && *deadline == st.opened + as_duration(*st.options.total)
                            ? "the stream's total deadline passed"
                            : "no chunk came within the idle timeout";
      std::rethrow_exception(
          end(st, stream_end::broken,
              broken(st, std::make_exception_ptr(weir::exception(error::timeout, why)))));
    }
    if (got.has_value()) {
      if (!got.value()) {
        end(st, stream_end::completed, {});
        co_return std::nullopt;
      }
      std::optional<Chunk> out(std::move(got).get());
      if (auto failure = in_band_error(st, *out))
        std::rethrow_exception(end(st, stream_end::broken, broken(st, failure)));
      count(st, *out);
      co_return out;
    }
    auto failure = got.failure();
    if (got.cancelled()) {
      end(st, stream_end::abandoned, {});
      std::rethrow_exception(failure);
    }
    std::rethrow_exception(end(st, stream_end::broken, broken(st, failure)));
  }

  // Stops reading: the stream ends `abandoned` (if it had not ended) and settles what it
  // produced. The pull is dropped, and with it what it holds (a connection). Not while a next()
  // is running: cancel that one instead, which abandons the stream the same way.
  void close() noexcept {
    if (state_ && !state_->report.end) end(*state_, stream_end::abandoned, {});
  }

  bool ended() const noexcept { return !state_ || state_->report.end.has_value(); }
  // What the response's headers said (stream_options::server_hint).
  rate_limit_hint server_hint() const {
    return state_ ? state_->options.server_hint : rate_limit_hint{};
  }
  // How it went so far (an empty report for a default-made stream).
  stream_report report() const { return state_ ? state_->report : stream_report{}; }

  // Runs `settler` when the stream ends (at once if it has). Settlers run in the order they
  // were added: a pipeline's innermost stages first. For pipelines and the router.
  void on_end(std::unique_ptr<detail::stream_settler> settler) {
    if (!state_) {
      settler->settle(stream_end::completed, {}, {}, {});
      return;
    }
    if (state_->report.end) {
      settler->settle(*state_->report.end, state_->failure, state_->report.tally,
                      state_->report.time_to_first_token);
      return;
    }
    state_->settlers.push_back(std::move(settler));
  }

 private:
  template <class C, class K, class P>
  friend boost::asio::awaitable<basic_stream<C, K>> open_stream_from(typename K::time_point, P,
                                                                     stream_options<C>);

  struct state {
    pull_type pull;
    stream_options<Chunk> options;
    time_point opened{};
    std::deque<Chunk> held{};  // read by open_stream, not yet by the caller
    stream_report report{};
    std::exception_ptr failure{};  // what next() rethrows once the stream broke
    std::vector<std::unique_ptr<detail::stream_settler>> settlers{};
  };

  explicit basic_stream(std::unique_ptr<state> s) : state_(std::move(s)) {}

  static typename Clock::duration as_duration(std::chrono::nanoseconds d) {
    return std::chrono::duration_cast<typename Clock::duration>(d);
  }

  // One pull, bounded by `deadline` when there is one.
  static boost::asio::awaitable<outcome<std::optional<Chunk>>> pull(
      state& st, std::optional<time_point> deadline, bool& passed) {
    if (!deadline) co_return co_await capture(st.pull());
    auto op = [&st] { return st.pull(); };
    auto bounded = co_await detail::run_until<Clock, std::optional<Chunk>>(*deadline, op);
    passed = bounded.deadline_passed;
    co_return std::move(bounded.result);
  }

  static std::exception_ptr in_band_error(const state& st, const Chunk& chunk) {
    return st.options.in_band_error ? st.options.in_band_error(chunk) : nullptr;
  }

  static void count(state& st, const Chunk& chunk) {
    ++st.report.tally.chunks;
    if (st.options.tally) st.options.tally(chunk, st.report.tally);
  }

  static std::exception_ptr broken(const state& st, std::exception_ptr cause) {
    return std::make_exception_ptr(weir::exception(
        error::stream_broken,
        fmt::format("the stream broke after {} chunks; they were delivered, so it is not retried",
                    st.report.tally.chunks),
        {}, std::move(cause)));
  }

  // Ends the stream once and runs its settlers; returns `failure`.
  static std::exception_ptr end(state& st, stream_end how, std::exception_ptr failure) noexcept {
    if (st.report.end) return st.failure ? st.failure : failure;
    st.report.end = how;
    st.failure = failure;
    st.pull = nullptr;  // what it holds (a connection) goes now
    auto settlers = std::move(st.settlers);
    for (auto& s : settlers)
      s->settle(how, st.failure, st.report.tally, st.report.time_to_first_token);
    return failure;
  }

  std::unique_ptr<state> state_;
};

template <class Chunk>
using stream = basic_stream<Chunk>;

// Opens a stream over `pull` (a callable returning asio::awaitable<std::optional<Chunk>>, nullopt
// at the end; copied, so hold a connection by shared_ptr) and returns it once its first chunk
// has come. Throws what the pull threw before it, the failure an in-band error stands for
// (stream_options::in_band_error), or weir::exception(timeout) when `first_token` (or `total`)
// passed first. A stream with no chunk at all is returned ended. The stream's times
// (`first_token`, `total`, report().time_to_first_token) count from `sent`, when the request
// went out: a client that opens the stream once the response's headers came passes the time it
// sent the request, so that the wait for the headers counts too.
template <class Chunk, class Clock, class Pull>
boost::asio::awaitable<basic_stream<Chunk, Clock>> open_stream_from(typename Clock::time_point sent,
                                                                    Pull pull,
                                                                    stream_options<Chunk> options) {
  using stream_type = basic_stream<Chunk, Clock>;
  auto st = std::make_unique<typename stream_type::state>();
  st->pull = std::move(pull);
  st->options = std::move(options);
  st->opened = sent;
  std::optional<typename Clock::time_point> deadline;
  const auto tighten = [&](std::optional<std::chrono::nanoseconds> d) {
    if (!d) return;
    const auto at = st->opened + stream_type::as_duration(*d);
    if (!deadline || at < *deadline) deadline = at;
  };
  tighten(st->options.first_token);
  tighten(st->options.total);

  // To the first chunk that carries the answer: a failure before it is the call's.
  for (;;) {
    bool passed = false;
    auto got = co_await stream_type::pull(*st, deadline, passed);
    if (passed)
      throw weir::exception(error::timeout, "the stream's first chunk did not come in time");
    auto chunk = std::move(got).get();
    if (!chunk) {
      st->report.end = stream_end::completed;
      st->pull = nullptr;
      break;
    }
    if (auto failure = stream_type::in_band_error(*st, *chunk)) std::rethrow_exception(failure);
    stream_type::count(*st, *chunk);
    const bool opening = st->options.opening && st->options.opening(*chunk);
    st->held.push_back(std::move(*chunk));
    if (!opening) break;
  }
  st->report.time_to_first_token =
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - st->opened);
  stream_type opened(std::move(st));
  co_return opened;
}

// The same, its times counted from now.
template <class Chunk, class Clock, class Pull>
boost::asio::awaitable<basic_stream<Chunk, Clock>> open_stream_on(Pull pull,
                                                                  stream_options<Chunk> options) {
  return open_stream_from<Chunk, Clock>(Clock::now(), std::move(pull), std::move(options));
}

template <class Chunk, class Clock = std::chrono::steady_clock, class Pull>
boost::asio::awaitable<basic_stream<Chunk, Clock>> open_stream(Pull pull,
                                                               stream_options<Chunk> options = {}) {
  return open_stream_on<Chunk, Clock>(std::move(pull), std::move(options));
}

}  // namespace weir
