// libcurl in weir (optional target weir::curl, Debian's libcurl4-openssl-dev): the HTTP client
// many teams already have.
//
//  - `response` and `perform(easy)`: a blocking transfer that collects the status, the headers
//    (of the last response, after redirects and 100 Continue) and the body; a failed transfer
//    throws boost::system::system_error with its CURLcode in `curl_category()`.
//  - A response judges itself (response::judged, the status rule of http/classify.hpp), so any
//    policy, even with no classifier named, retries a 429 and fails a 400: none is a success.
//  - `response_classifier`: judges an outcome<response> as any HTTP response is judged
//    (http/classify.hpp: status, Retry-After, rate-limit headers) and a transfer's CURLcode as
//    retryable (the connection failed or broke, a timeout) or fatal (a bad URL, a certificate
//    refused, an option curl does not know).
//  - `multi`: curl's multi-socket API driven by an Asio executor, so that many transfers share
//    one thread: `co_await transfers.perform(easy)`; cancelling the await removes the transfer,
//    and destroying the multi ends every transfer with operation_aborted.
//  - `open_event_stream`: a streamed transfer's server-sent events as a weir::stream, returned
//    at the first event; the transfer is removed when the stream ends, however it ends.
//  - Against a hostile or broken server (http/limits.hpp): a header line with CR, LF or NUL is
//    refused by add_header; the headers and a body kept whole are bounded, and a transfer ends
//    by max_transfer_time (CURLOPT_TIMEOUT_MS, which a later set() may change); passing a limit
//    is weir::exception(limit_exceeded), fatal.
//
// As curl asks, call curl_global_init(CURL_GLOBAL_DEFAULT) once, before any thread makes handles.
//
//     weir::curl::multi transfers(io.get_executor());
//     weir::curl::easy req(url);                       // an easy handle, cleaned up for you
//     auto reply = co_await guarded([&] { return transfers.perform(req); });
#pragma once

#include <weir/composition/stream.hpp>
#include <weir/core/error.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/trace.hpp>
#include <weir/http/classify.hpp>
#include <weir/http/limits.hpp>
#include <weir/http/sse.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weir::curl {

// CURLcode as an error_code. The messages are curl's own (curl_easy_strerror): they name the
// failure, never the URL, a header or the body.
class curl_error_category final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "curl"; }
  std::string message(int code) const override {
    return curl_easy_strerror(static_cast<CURLcode>(code));
  }
};
inline const boost::system::error_category& curl_category() noexcept {
  static const curl_error_category category;
  return category;
}
inline error_code make_error_code(CURLcode code) noexcept {
  return {static_cast<int>(code), curl_category()};
}

// Whether a transfer that failed with `code` is worth trying again: the connection could not be
// made or broke, or it timed out. A bad URL, a refused certificate, a misuse of curl are not.
inline bool retryable(CURLcode code) noexcept {
  switch (code) {
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_HTTP2:
    case CURLE_PARTIAL_FILE:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_HTTP2_STREAM:
    case CURLE_HTTP3:
    case CURLE_QUIC_CONNECT_ERROR:
    case CURLE_AGAIN: return true;
    default: return false;
  }
}

// What a transfer brought back.
struct response {
  long status = 0;
  std::vector<std::pair<std::string, std::string>> headers;  // of the last response, in order
  std::string body;

  // The first value of header `name`, any case; empty when there is none.
  std::string_view header(std::string_view name) const {
    for (const auto& [n, v] : headers)
      if (std::equal(n.begin(), n.end(), name.begin(), name.end(), [](char a, char b) {
            return std::tolower(static_cast<unsigned char>(a)) ==
                   std::tolower(static_cast<unsigned char>(b));
          }))
        return v;
    return {};
  }

  // How any weir classifier judges it (http/classify.hpp's status rule): so default_classifier,
  // and every policy built without a classifier, retries a 429 or a 503 and fails a 400, instead
  // of calling them successes.
  classification judged(
      std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) const {
    return http::judge_status(static_cast<unsigned>(status), headers, body, {}, now);
  }
};

namespace detail {
// CURLOPT_HEADERFUNCTION: one header line at a time. A status line starts a new response (after
// a redirect or a 100 Continue only the last one's headers are kept).
inline std::size_t collect_header(char* data, std::size_t size, std::size_t count, void* to) {
  auto& r = *static_cast<response*>(to);
  std::string_view line(data, size * count);
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
  if (line.starts_with("HTTP/")) {
    r.headers.clear();
  } else if (const auto colon = line.find(':'); colon != std::string_view::npos) {
    auto value = line.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t'))
      value.remove_prefix(1);
    r.headers.emplace_back(std::string(line.substr(0, colon)), std::string(value));
  }
  return size * count;
}
inline void check(CURLcode code, const char* what) {
  if (code != CURLE_OK) throw boost::system::system_error(make_error_code(code), what);
}
}  // namespace detail

// An easy handle that cleans itself up, with a response its callbacks fill.
class easy {
 public:
  easy() : handle_(curl_easy_init()) {
    if (!handle_) throw boost::system::system_error(make_error_code(CURLE_OUT_OF_MEMORY));
    limit(http::response_limits{});
  }
  explicit easy(const std::string& url) : easy() { set(CURLOPT_URL, url.c_str()); }
  ~easy() {
    if (handle_) curl_easy_cleanup(handle_);
    if (list_) curl_slist_free_all(list_);
  }
  easy(const easy&) = delete;
  easy& operator=(const easy&) = delete;

  template <class Value>
  easy& set(CURLoption option, Value value) {
    detail::check(curl_easy_setopt(handle_, option, value), "curl_easy_setopt");
    return *this;
  }
  // What a response may be (http/limits.hpp); the defaults until called. Sets CURLOPT_TIMEOUT_MS.
  easy& limit(const http::response_limits& limits) {
    limits_ = limits;
    return set(CURLOPT_TIMEOUT_MS,
               static_cast<long>(
                   std::chrono::duration_cast<std::chrono::milliseconds>(limits.max_transfer_time)
                       .count()));
  }

  // Adds a request header ("Name: value"; curl's "Name:" and "Name;" too); the list lives as
  // long as the handle. Throws weir::exception(invalid_argument) for a line that would inject
  // (CR, LF, NUL in the value, a name that is not a token), naming the header, never the value.
  easy& add_header(const std::string& line) {
    const auto end = line.find_first_of(":;");
    if (end == std::string::npos)
      throw weir::exception(error::invalid_argument,
                            "curl::easy: a header line needs a ':' after the name");
    http::check_header("curl::easy", std::string_view(line).substr(0, end),
                       std::string_view(line).substr(end + 1));
    auto* grown = curl_slist_append(list_, line.c_str());
    if (!grown) throw boost::system::system_error(make_error_code(CURLE_OUT_OF_MEMORY));
    list_ = grown;
    return set(CURLOPT_HTTPHEADER, list_);
  }
  // Sets the headers that carry an attempt's trace context (weir/core/trace.hpp) — traceparent, and
  // tracestate when it has a passable one — in place of those set before, so a handle sent again
  // by a retry sends the new attempt's span; without a context, removes them.
  //
  //     co_await guarded(ctx, [&](const weir::trace_context& attempt) {
  //       return transfers.perform(req.trace(attempt));
  //     });
  easy& trace(const trace_context& attempt) {
    drop_headers([](std::string_view name) {
      return http::detail::iequals(name, "traceparent") ||
             http::detail::iequals(name, "tracestate");
    });
    if (!attempt) return *this;
    add_header("traceparent: " + attempt.traceparent());
    if (!attempt.tracestate.empty() && weir::detail::passable_tracestate(attempt.tracestate))
      add_header("tracestate: " + std::string(attempt.tracestate));
    return *this;
  }

  // A POST of `body` (copied: the handle may outlive the caller's string).
  easy& post(std::string body) {
    body_ = std::move(body);
    set(CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body_.size()));
    return set(CURLOPT_POSTFIELDS, body_.c_str());
  }

  // Hands the body to `f` piece by piece as it arrives (a stream of server-sent events) instead
  // of keeping it in the response. With a multi, `f` runs on the multi's strand. An exception
  // `f` throws ends the transfer, and finish() throws it.
  easy& on_data(std::function<void(std::string_view)> f) {
    on_data_ = std::move(f);
    return *this;
  }

  CURL* native() const noexcept { return handle_; }
  const http::response_limits& limits() const noexcept { return limits_; }

  // Points the handle's callbacks at a fresh response, for one transfer.
  response& prepare() {
    reply_ = response{};
    header_bytes_ = 0;
    passed_ = nullptr;
    refused_ = nullptr;
    set(CURLOPT_HEADERFUNCTION, &easy::write_header);
    set(CURLOPT_HEADERDATA, static_cast<void*>(this));
    set(CURLOPT_WRITEFUNCTION, &easy::write_body);
    set(CURLOPT_WRITEDATA, static_cast<void*>(this));
    return reply_;
  }
  // After a transfer ended with `code`: the response, or the failure thrown (limit_exceeded
  // for a response past the limits).
  response finish(CURLcode code) {
    if (refused_) std::rethrow_exception(std::exchange(refused_, nullptr));
    if (passed_) {
      const bool headers = passed_ == &http::response_limits::max_header_bytes;
      http::detail::limit_passed(
          "curl::easy", headers ? "the response's headers" : "the response's body",
          fmt::format("{} ({})", headers ? "max_header_bytes" : "max_body_bytes",
                      limits_.*passed_));
    }
    // curl times the limit from when the transfer was added and reports its total from a later
    // moment, so a transfer it stopped at the limit may report a little less.
    if (code == CURLE_OPERATION_TIMEDOUT && ran_for() >= limits_.max_transfer_time * 9 / 10)
      http::detail::limit_passed(
          "curl::easy", "the transfer",
          fmt::format("max_transfer_time ({})",
                      weir::detail::duration_text(
                          std::chrono::duration<double>(limits_.max_transfer_time))));
    detail::check(code, "curl transfer");
    long status = 0;
    curl_easy_getinfo(handle_, CURLINFO_RESPONSE_CODE, &status);
    reply_.status = status;
    return std::move(reply_);
  }

 private:
  // Removes the request headers whose name `drop` matches.
  template <class Predicate>
  void drop_headers(Predicate drop) {
    curl_slist* kept = nullptr;
    for (auto* line = list_; line; line = line->next) {
      const std::string_view text(line->data);
      if (drop(text.substr(0, text.find_first_of(":;")))) continue;
      auto* grown = curl_slist_append(kept, line->data);
      if (!grown) {
        curl_slist_free_all(kept);
        throw boost::system::system_error(make_error_code(CURLE_OUT_OF_MEMORY));
      }
      kept = grown;
    }
    set(CURLOPT_HTTPHEADER, kept);
    curl_slist_free_all(std::exchange(list_, kept));
  }

  // How long the last transfer took, by curl's count.
  std::chrono::microseconds ran_for() const {
    curl_off_t us = 0;
    curl_easy_getinfo(handle_, CURLINFO_TOTAL_TIME_T, &us);
    return std::chrono::microseconds(us);
  }

  // Returning less than it was given makes curl end the transfer (CURLE_WRITE_ERROR).
  static std::size_t write_header(char* data, std::size_t size, std::size_t count, void* to) {
    auto& self = *static_cast<easy*>(to);
    self.header_bytes_ += size * count;  // every response's, interim 1xx and redirects included
    if (self.header_bytes_ > self.limits_.max_header_bytes) {
      self.passed_ = &http::response_limits::max_header_bytes;
      return 0;
    }
    return detail::collect_header(data, size, count, &self.reply_);
  }
  static std::size_t write_body(char* data, std::size_t size, std::size_t count, void* to) {
    auto& self = *static_cast<easy*>(to);
    if (self.on_data_) {
      try {
        self.on_data_(std::string_view(data, size * count));
      } catch (...) {
        self.refused_ = std::current_exception();
        return 0;
      }
    } else {
      if (self.reply_.body.size() + size * count > self.limits_.max_body_bytes) {
        self.passed_ = &http::response_limits::max_body_bytes;
        return 0;
      }
      self.reply_.body.append(data, size * count);
    }
    return size * count;
  }

  CURL* handle_ = nullptr;
  curl_slist* list_ = nullptr;
  std::string body_;
  response reply_;
  std::function<void(std::string_view)> on_data_;
  http::response_limits limits_;
  std::size_t header_bytes_ = 0;
  std::size_t http::response_limits::*passed_ = nullptr;  // the limit the transfer passed
  std::exception_ptr refused_;                            // what on_data threw
};

// A blocking transfer, as most curl code makes one: run it on a thread pool, not on an
// io_context's thread.
inline response perform(easy& handle) {
  handle.prepare();
  return handle.finish(curl_easy_perform(handle.native()));
}

// Judges a transfer: its response by status and headers, its failure by CURLcode; anything else
// as default_classifier does.
struct response_classifier {
  std::vector<unsigned> retryable_statuses{};  // extra 4xx statuses worth retrying

  classification judge(const response& r, std::chrono::system_clock::time_point now =
                                              std::chrono::system_clock::now()) const {
    return http::judge_status(static_cast<unsigned>(r.status), r.headers, r.body,
                              retryable_statuses, now);
  }

  template <class T>
  classification operator()(const outcome<T>& o) const {
    if constexpr (std::is_same_v<T, response>)
      if (o.has_value()) return judge(o.value());
    const auto code = o.code();
    if (code.category() == curl_category()) {
      classification c;
      c.kind = retryable(static_cast<CURLcode>(code.value())) ? verdict::retryable : verdict::fatal;
      return c;
    }
    return default_classifier{}(o);
  }
};

// curl's multi-socket API on an Asio executor: curl says which sockets to watch and when its
// timer is due; the executor's reactor watches them, so any number of transfers share the
// thread that runs it. Everything happens on one strand. Not copyable. Destroy it on its
// executor's thread (or once nothing runs the executor): every transfer still running completes
// then with operation_aborted.
class multi {
 public:
  explicit multi(boost::asio::any_io_executor ex)
      : strand_(boost::asio::make_strand(std::move(ex))),
        timer_(strand_),
        handle_(curl_multi_init()) {
    if (!handle_) throw boost::system::system_error(make_error_code(CURLE_OUT_OF_MEMORY));
    curl_multi_setopt(handle_, CURLMOPT_SOCKETFUNCTION, &multi::on_socket);
    curl_multi_setopt(handle_, CURLMOPT_SOCKETDATA, this);
    curl_multi_setopt(handle_, CURLMOPT_TIMERFUNCTION, &multi::on_timer);
    curl_multi_setopt(handle_, CURLMOPT_TIMERDATA, this);
  }
  // Every transfer still running ends with operation_aborted, its handler called once.
  ~multi() {
    life_.reset();  // a cancellation or a start still on its way finds the multi gone
    auto ending = std::move(transfers_);
    for (auto& [easy, t] : ending) curl_multi_remove_handle(handle_, easy);
    for (auto& [fd, w] : watched_) w->descriptor.release();  // curl closes its own sockets
    curl_multi_cleanup(handle_);
    running_ -= ending.size();
    for (auto& [easy, t] : ending) t.done(boost::asio::error::operation_aborted, CURLE_OK);
  }
  multi(const multi&) = delete;
  multi& operator=(const multi&) = delete;

  // Runs the transfer of `handle` (which must outlive it), with any completion token: completes
  // with (error_code, CURLcode), the error code set only by a cancellation (any type removes the
  // transfer: operation_aborted); then read the response with handle.finish(code).
  template <class CompletionToken>
  auto async_transfer(easy& handle, CompletionToken&& token) {
    return boost::asio::async_initiate<CompletionToken, void(error_code, CURLcode)>(
        // (`self`, not `this`: clang 14 calls a `this` used only in a generic lambda unused.)
        [self = this](auto handler, easy* h) { self->start(*h, std::move(handler)); }, token,
        &handle);
  }

  // The same as a coroutine: the response, or the CURLcode (or the cancellation) thrown.
  boost::asio::awaitable<response> perform(easy& handle) {
    auto [ec, code] =
        co_await async_transfer(handle, boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec) throw boost::system::system_error(ec);
    co_return handle.finish(code);
  }

  // Transfers started and not yet ended; from any thread.
  std::size_t in_flight() const noexcept { return running_.load(); }

 private:
  using strand_type = boost::asio::strand<boost::asio::any_io_executor>;
  using done_handler = std::function<void(error_code, CURLcode)>;

  struct transfer {
    std::uint64_t id = 0;  // so a late cancellation cannot end a later transfer of the handle
    done_handler done;
  };
  struct watch {
    explicit watch(const strand_type& s, curl_socket_t fd) : descriptor(s, fd) {}
    boost::asio::posix::stream_descriptor descriptor;
    int wanted = CURL_POLL_NONE;  // what curl asked to watch
    bool reading = false, writing = false;
  };

  template <class Handler>
  void start(easy& handle, Handler handler) {
    auto slot = boost::asio::get_associated_cancellation_slot(handler);
    auto work = std::make_shared<Handler>(std::move(handler));
    CURL* e = handle.native();
    const auto id = ++last_id_;
    // The slot is the caller's: assigned here, on the caller's side, before anything can end.
    // Posted, not dispatched: curl must not lose a handle inside one of its own callbacks.
    if (slot.is_connected())
      slot.assign(
          [life = std::weak_ptr(life_), strand = strand_, e, id](boost::asio::cancellation_type) {
            boost::asio::post(strand, [life, e, id] {
              if (auto self = life.lock())
                (*self)->end(e, boost::asio::error::operation_aborted, CURLE_OK, id);
            });
          });
    done_handler done = [work](error_code ec, CURLcode code) {
      auto h = std::move(*work);
      auto ex = boost::asio::get_associated_executor(h);
      boost::asio::post(ex, [h = std::move(h), ec, code]() mutable { h(ec, code); });
    };
    boost::asio::dispatch(
        strand_, [life = std::weak_ptr(life_), &handle, e, done = std::move(done), id]() mutable {
          const auto self = life.lock();
          if (!self) return done(boost::asio::error::operation_aborted, CURLE_OK);
          (*self)->add(handle, e, std::move(done), id);
        });
  }

  // On the strand: starts the transfer of `e`.
  void add(easy& handle, CURL* e, done_handler done, std::uint64_t id) {
    if (transfers_.contains(e))  // one handle, one transfer at a time
      return done(weir::make_error_code(weir::error::invalid_argument), CURLE_OK);
    handle.prepare();
    transfers_[e] = transfer{id, std::move(done)};
    ++running_;
    if (curl_multi_add_handle(handle_, e) != CURLM_OK) end(e, {}, CURLE_FAILED_INIT);
  }

  // On the strand: the transfer of `e` is over (or cancelled): its handler is called once.
  // `id`: only if it is still that transfer.
  void end(CURL* e, error_code ec, CURLcode code, std::uint64_t id = 0) {
    auto it = transfers_.find(e);
    if (it == transfers_.end() || (id != 0 && it->second.id != id)) return;  // already ended
    auto done = std::move(it->second.done);
    transfers_.erase(it);
    --running_;
    curl_multi_remove_handle(handle_, e);
    done(ec, code);
  }

  // On the strand: lets curl act on `fd` (or on its timeouts) and collects what finished.
  void drive(curl_socket_t fd, int events) {
    int running = 0;
    curl_multi_socket_action(handle_, fd, events, &running);
    int left = 0;
    while (CURLMsg* m = curl_multi_info_read(handle_, &left))
      if (m->msg == CURLMSG_DONE) end(m->easy_handle, {}, m->data.result);
  }

  // Called by curl, inside curl_multi_socket_action or add_handle, so on the strand.
  static int on_socket(CURL*, curl_socket_t fd, int what, void* self, void*) {
    auto& m = *static_cast<multi*>(self);
    if (what == CURL_POLL_REMOVE) {
      if (auto it = m.watched_.find(fd); it != m.watched_.end()) {
        it->second->descriptor.cancel();
        it->second->descriptor.release();  // curl closes the socket itself
        m.watched_.erase(it);
      }
      return 0;
    }
    auto& w = m.watched_[fd];
    if (!w) w = std::make_shared<watch>(m.strand_, fd);
    w->wanted = what;
    m.arm(fd, w);
    return 0;
  }

  void arm(curl_socket_t fd, const std::shared_ptr<watch>& w) {
    using boost::asio::posix::descriptor_base;
    const auto wait = [this, fd, weak = std::weak_ptr<watch>(w)](descriptor_base::wait_type type,
                                                                 bool watch::*busy, int event) {
      auto watching = weak.lock();
      watching.get()->*busy = true;
      watching->descriptor.async_wait(type, [this, fd, weak, busy, event](error_code ec) {
        auto ready = weak.lock();
        if (!ready) return;  // curl stopped watching this socket
        ready.get()->*busy = false;
        if (ec) return;
        drive(fd, event);
        // curl may still want this socket watched, unless it let it go meanwhile.
        if (auto it = watched_.find(fd); it != watched_.end() && it->second == ready)
          arm(fd, ready);
      });
    };
    if ((w->wanted & CURL_POLL_IN) && !w->reading)
      wait(descriptor_base::wait_read, &watch::reading, CURL_CSELECT_IN);
    if ((w->wanted & CURL_POLL_OUT) && !w->writing)
      wait(descriptor_base::wait_write, &watch::writing, CURL_CSELECT_OUT);
  }

  static int on_timer(CURLM*, long timeout_ms, void* self) {
    auto& m = *static_cast<multi*>(self);
    if (timeout_ms < 0) {
      m.timer_.cancel();
      return 0;
    }
    m.timer_.expires_after(std::chrono::milliseconds(timeout_ms));
    m.timer_.async_wait([&m](error_code ec) {
      if (!ec) m.drive(CURL_SOCKET_TIMEOUT, 0);
    });
    return 0;
  }

  strand_type strand_;
  boost::asio::steady_timer timer_;
  CURLM* handle_ = nullptr;
  std::atomic<std::uint64_t> last_id_{0};  // taken by start(), from any thread
  std::atomic<std::size_t> running_{0};
  std::map<CURL*, transfer> transfers_;
  std::map<curl_socket_t, std::shared_ptr<watch>> watched_;
  // Held by the multi alone: what runs later on the strand (a start, a cancellation) holds it
  // weakly, and does nothing once the multi is gone.
  std::shared_ptr<multi*> life_ = std::make_shared<multi*>(this);
};

namespace detail {
// One streamed transfer's events, handed from curl's write callback (on the multi's strand) to
// the coroutine reading the stream (on its own executor): under a mutex, a waiting read's
// handler posted to its executor, as any Asio operation completes.
class event_feed : public std::enable_shared_from_this<event_feed> {
 public:
  using event = http::sse::event;
  using read_handler = std::function<void(std::exception_ptr, std::optional<event>)>;

  explicit event_feed(std::unique_ptr<easy> request)
      : request(std::move(request)), parser_(this->request->limits()) {}

  const std::unique_ptr<easy> request;
  boost::asio::cancellation_signal stop;  // removes the transfer from the multi

  // curl's write callback: a 2xx body is parsed as it comes; any other is kept (to the body
  // limit) to be judged with its status when the transfer ends. A parser's limit_exceeded ends
  // the transfer (easy::on_data).
  void feed(std::string_view bytes) {
    if (status_ == 0) curl_easy_getinfo(request->native(), CURLINFO_RESPONSE_CODE, &status_);
    if (status_ < 200 || status_ > 299) {
      error_body_.append(bytes.substr(0, request->limits().max_body_bytes - error_body_.size()));
      return;
    }
    parser_.feed(bytes);
    std::unique_lock lock(mutex_);
    while (auto e = parser_.next()) ready_.push_back(std::move(*e));
    wake(lock);
  }

  // The transfer ended (cancelled when `ec` is set): what it failed with is the stream's.
  void finish(error_code ec, CURLcode code) {
    std::exception_ptr failure;
    try {
      if (ec) throw boost::system::system_error(ec);
      const auto r = request->finish(code);
      if (r.status < 200 || r.status > 299)
        throw http::status_error::from(static_cast<unsigned>(r.status), r.headers, error_body_);
    } catch (...) {
      failure = std::current_exception();
    }
    std::unique_lock lock(mutex_);
    running_ = false;
    failure_ = failure;
    wake(lock);
  }

  // Nobody reads the stream any more: the transfer, if it still runs, is removed.
  void cancel() {
    {
      std::lock_guard lock(mutex_);
      if (!running_) return;
    }
    stop.emit(boost::asio::cancellation_type::terminal);
  }

  // The next event: nullopt at the body's end or at `[DONE]`; the transfer's failure thrown.
  // Completion signature: void(std::exception_ptr, std::optional<http::sse::event>). Cancelling
  // it (any type) completes it with operation_aborted.
  template <class CompletionToken>
  auto async_next(CompletionToken&& token) {
    return boost::asio::async_initiate<CompletionToken,
                                       void(std::exception_ptr, std::optional<event>)>(
        [self = shared_from_this()](auto handler) {
          auto slot = boost::asio::get_associated_cancellation_slot(handler);
          auto work = std::make_shared<decltype(handler)>(std::move(handler));
          std::unique_lock lock(self->mutex_);
          self->waiting_ = [work](std::exception_ptr failure, std::optional<event> e) {
            auto h = std::move(*work);
            auto ex = boost::asio::get_associated_executor(h);
            boost::asio::post(ex, [h = std::move(h), failure, e = std::move(e)]() mutable {
              h(failure, std::move(e));
            });
          };
          if (slot.is_connected())
            slot.assign([weak = std::weak_ptr(self)](boost::asio::cancellation_type) {
              auto feed = weak.lock();
              if (!feed) return;
              std::unique_lock lock(feed->mutex_);
              if (auto waiting = std::exchange(feed->waiting_, nullptr)) {
                lock.unlock();
                waiting(std::make_exception_ptr(
                            boost::system::system_error(boost::asio::error::operation_aborted)),
                        std::nullopt);
              }
            });
          self->wake(lock);
        },
        token);
  }

 private:
  // Completes the waiting read, if there is one and something to hand it.
  void wake(std::unique_lock<std::mutex>& lock) {
    if (!waiting_) return;
    std::optional<event> next;
    if (!ready_.empty() && !done_) {
      next = std::move(ready_.front());
      ready_.pop_front();
      if (http::sse::is_done(*next)) {
        done_ = true;
        next.reset();
      }
    } else if (running_ && !done_) {
      return;
    }
    auto waiting = std::exchange(waiting_, nullptr);
    const auto failure = done_ ? nullptr : failure_;
    lock.unlock();
    waiting(failure, std::move(next));
  }

  http::sse::parser parser_;  // on the multi's strand
  long status_ = 0;
  std::string error_body_;
  std::mutex mutex_;  // guards what follows
  std::deque<event> ready_;
  read_handler waiting_;
  bool running_ = true;
  bool done_ = false;  // `[DONE]` came
  std::exception_ptr failure_;
};

// Held by a stream's pull, so dropped when the stream ends (read to its end, closed, broken or
// destroyed): a transfer still running then is removed, not left to run on with no reader.
struct event_reader {
  explicit event_reader(std::shared_ptr<event_feed> f) : feed(std::move(f)) {}
  event_reader(const event_reader&) = delete;
  event_reader& operator=(const event_reader&) = delete;
  ~event_reader() { feed->cancel(); }
  std::shared_ptr<event_feed> feed;
};
}  // namespace detail

// Starts the transfer of `request` on `transfers` and returns its body's server-sent events as a
// weir::stream once the first has come (stream.hpp: `options` time it and count its tokens). A
// failure before then is the call's, retried by the policies around it as any: an answer other
// than 2xx (judged by its status, headers and body, http::status_error), a CURLcode, a limit
// passed, `first_token` passed. `data: [DONE]` ends the stream. However the stream ends — read to
// its end, closed, broken, or destroyed — a transfer still running is removed from the multi.
// Unless `options` say otherwise, an error event inside the stream (OpenAI's `data: {"error"…}`,
// Anthropic's `event: error`) is judged by its type, and the opening events that carry no
// content yet (Anthropic's `message_start`, a role-only first chunk) are held back, as the Beast
// chat_client::stream does. (A template only so that a program that opens no stream does not
// compile one: `Event` is always deduced or defaulted to http::sse::event.)
template <std::same_as<http::sse::event> Event = http::sse::event>
boost::asio::awaitable<stream<Event>> open_event_stream(multi& transfers,
                                                        std::unique_ptr<easy> request,
                                                        stream_options<Event> options = {}) {
  if (!options.in_band_error) options.in_band_error = http::sse::in_band_error;
  if (!options.opening) options.opening = http::sse::opens_answer;
  auto feed = std::make_shared<detail::event_feed>(std::move(request));
  feed->request->on_data([raw = feed.get()](std::string_view bytes) { raw->feed(bytes); });
  // The executor first: g++ 12 destroys a temporary with a destructor twice when its full
  // expression has a co_await in it.
  const auto ex = co_await boost::asio::this_coro::executor;
  transfers.async_transfer(
      *feed->request,
      boost::asio::bind_cancellation_slot(
          feed->stop.slot(), boost::asio::bind_executor(ex, [feed](error_code ec, CURLcode code) {
            feed->finish(ec, code);
          })));
  auto reader = std::make_shared<detail::event_reader>(feed);
  auto first =
      open_stream<Event>([reader] { return reader->feed->async_next(boost::asio::use_awaitable); },
                         std::move(options));
  co_return co_await std::move(first);
}

}  // namespace weir::curl
