// A small Redis client for weir's shared limiter: hiredis speaks the protocol, Asio drives the
// socket, so no thread ever blocks on Redis. Every command completes exactly once — with the
// reply, or with an error when the connection fails, is down or times out. A lost connection is
// reopened on the next command, no sooner than a backoff that grows while Redis stays away.
// Commands sent together share round trips: hiredis writes every command queued since the socket
// was last writable in one go, and Redis answers them in order.
//
// Part of the optional weir::redis target (links hiredis).
#pragma once

#include <weir/core/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weir::redis {

// A reply, copied out of hiredis (whose replies live only for the callback).
struct reply {
  enum class kind { nil, integer, string, status, error, array } type = kind::nil;
  std::int64_t integer = 0;
  std::string text;  // string, status or error
  std::vector<reply> elements;

  bool is_error() const noexcept { return type == kind::error; }

  // An error reply that says "not now" rather than "never": the server is loading its data
  // (LOADING), is a replica during a failover (READONLY, MASTERDOWN), runs a long script (BUSY),
  // is out of memory (OOM), or a cluster is resharding or down (TRYAGAIN, CLUSTERDOWN). The
  // caller should treat Redis as unavailable for now, not the command as wrong.
  bool says_unavailable() const noexcept {
    if (!is_error()) return false;
    const std::string_view code = std::string_view(text).substr(0, text.find(' '));
    for (std::string_view transient :
         {"LOADING", "READONLY", "MASTERDOWN", "BUSY", "OOM", "TRYAGAIN", "CLUSTERDOWN"})
      if (code == transient) return true;
    return false;
  }

  static reply from(const redisReply* r) {
    reply out;
    if (!r) return out;
    switch (r->type) {
      case REDIS_REPLY_INTEGER:
        out.type = kind::integer;
        out.integer = r->integer;
        break;
      case REDIS_REPLY_STRING:
        out.type = kind::string;
        out.text.assign(r->str, r->len);
        break;
      case REDIS_REPLY_STATUS:
        out.type = kind::status;
        out.text.assign(r->str, r->len);
        break;
      case REDIS_REPLY_ERROR:
        out.type = kind::error;
        out.text.assign(r->str, r->len);
        break;
      case REDIS_REPLY_ARRAY:
        out.type = kind::array;
        for (std::size_t i = 0; i < r->elements; ++i) out.elements.push_back(from(r->element[i]));
        break;
      default: break;
    }
    return out;
  }
};

struct client_options {
  std::string host = "127.0.0.1";
  int port = 6379;
  std::chrono::milliseconds reconnect_min{100};    // first wait after a failure, doubled ...
  std::chrono::milliseconds reconnect_max{5'000};  // ... up to this
  // A connection not up within this is dropped (hiredis 0.14 has no connect timeout).
  std::chrono::milliseconds connect_timeout{1'000};
  // A command unanswered after this drops the connection: every command on it completes with
  // boost::asio::error::timed_out, and the next reconnects (after the backoff). So a paused,
  // black-holed or partitioned Redis costs a caller at most this, not the kernel's TCP timeout.
  std::chrono::milliseconds command_timeout{1'000};
  // Sentinel: with sentinels listed, `host` and `port` are only where the primary was last seen.
  // Before each new connection the client asks the sentinels, in turn, where the primary named
  // `primary_name` is now; and it drops a connection whose server answers READONLY (a failover
  // made it a replica), so the next command goes to the new primary.
  std::vector<std::pair<std::string, int>> sentinels{};
  std::string primary_name = "mymaster";
  // Called (on the client's strand) when the connection comes up (true) or goes down (false).
  std::function<void(bool)> on_connection{};
};

// Copies share one connection. Commands may be issued from any thread; they run on the client's
// strand.
class client {
 public:
  using signature = void(error_code, reply);

  client(boost::asio::any_io_executor ex, client_options options)
      : state_(std::make_shared<state>(std::move(ex), std::move(options))) {}

  // Sends one command (its words as given, binary-safe). Completes with the reply (which may be
  // a Redis error reply) or with boost::asio::error::not_connected (down, or backing off),
  // connection_reset (lost), or timed_out (no answer within command_timeout, or no connection
  // within connect_timeout).
  template <class CompletionToken = boost::asio::use_awaitable_t<>>
  auto async_command(std::vector<std::string> words, CompletionToken&& token = {}) {
    return boost::asio::async_initiate<CompletionToken, signature>(
        [](auto handler, std::shared_ptr<state> s, std::vector<std::string> w) {
          // Completions run on the handler's executor, never inside hiredis's callback.
          auto shared = std::make_shared<decltype(handler)>(std::move(handler));
          completion done = [shared, strand = s->strand](error_code ec, reply r) {
            auto ex = boost::asio::get_associated_executor(*shared, strand);
            boost::asio::post(ex, boost::asio::append(std::move(*shared), ec, std::move(r)));
          };
          auto strand = s->strand;
          boost::asio::dispatch(
              strand, [s = std::move(s), w = std::move(w), done = std::move(done)]() mutable {
                s->send(s, std::move(w), std::move(done));
              });
        },
        token, state_, std::move(words));
  }

  // Closes the connection; commands in flight complete with connection_reset. While connected
  // the client waits on its socket, so like any open socket it keeps io_context::run() going
  // until it is closed or destroyed.
  void close() {
    boost::asio::dispatch(state_->strand, [s = state_] { s->disconnect(); });
  }

  bool connected() const noexcept { return state_->up.load(); }

 private:
  using completion = std::function<void(error_code, reply)>;

  // A command on its way, kept whole so that a cluster's redirection can send it again.
  struct in_flight {
    std::vector<std::string> words;
    completion done;
    int redirects = 0;
  };

  // hiredis's event hooks, on an Asio descriptor that does not own the socket (hiredis does).
  struct state {
    state(boost::asio::any_io_executor ex, client_options o)
        : strand(boost::asio::make_strand(ex)),
          options(std::move(o)),
          socket(strand),
          watchdog(strand) {
      if (options.connect_timeout.count() <= 0)
        weir::detail::invalid_option("redis client", "connect_timeout", options.connect_timeout,
                                     "be positive");
      if (options.command_timeout.count() <= 0)
        weir::detail::invalid_option("redis client", "command_timeout", options.command_timeout,
                                     "be positive");
    }

    ~state() { disconnect(); }

    void send(const std::shared_ptr<state>& self, std::vector<std::string> words, completion done,
              int redirects = 0) {
      if (!context && !options.sentinels.empty() && !primary_found) {
        // Hold the command while the sentinels say where the primary is.
        if (!finding_primary && std::chrono::steady_clock::now() < retry_at) {
          done(boost::asio::error::not_connected, {});
          return;
        }
        held.emplace_back(std::move(words), std::move(done));
        if (!finding_primary) {
          finding_primary = true;
          find_primary(self, 0);
        }
        return;
      }
      if (!context && !connect(self)) {
        done(boost::asio::error::not_connected, {});
        return;
      }
      auto* pending = new in_flight{std::move(words), std::move(done), redirects};
      std::vector<const char*> argv;
      std::vector<std::size_t> lengths;
      for (const auto& w : pending->words) {
        argv.push_back(w.data());
        lengths.push_back(w.size());
      }
      if (redisAsyncCommandArgv(context, &state::on_reply, pending, static_cast<int>(argv.size()),
                                argv.data(), lengths.data()) != REDIS_OK) {
        std::unique_ptr<in_flight> lost(pending);
        lost->done(boost::asio::error::connection_reset, {});
        return;
      }
      // Redis answers in order, so the oldest unanswered command is the first to time out.
      deadlines.push_back(std::chrono::steady_clock::now() + options.command_timeout);
      watch();
    }

    // The watchdog: one timer for the connection, set for the earliest deadline (the connect's,
    // or the oldest command's). Not moved on every reply: when it fires early it sets itself again.
    void watch() {
      if (watchdog_armed || !context) return;
      const auto due = next_deadline();
      if (!due) return;
      watchdog_armed = true;
      watchdog.expires_at(*due);
      watchdog.async_wait([weak_self = weak](boost::system::error_code) {
        auto self = weak_self.lock();
        if (!self) return;
        self->watchdog_armed = false;
        if (!self->context) return;
        const auto due = self->next_deadline();
        if (due && *due <= std::chrono::steady_clock::now()) {
          self->time_out();
          return;
        }
        self->watch();
      });
    }

    std::optional<std::chrono::steady_clock::time_point> next_deadline() const {
      std::optional<std::chrono::steady_clock::time_point> due;
      if (!up) due = connect_deadline;
      if (!deadlines.empty()) due = due ? std::min(*due, deadlines.front()) : deadlines.front();
      return due;
    }

    // Redis did not answer in time: drop the connection (every command on it completes with
    // timed_out) and back off before the next.
    void time_out() {
      dropping_for = boost::asio::error::timed_out;
      disconnect();
      dropping_for = boost::asio::error::connection_reset;
      failed(std::chrono::steady_clock::now());
    }

    // Asks sentinel number `tried` (counting from the one that answered last) where the primary
    // is; on an answer, connects there and sends what was held. On the strand.
    void find_primary(const std::shared_ptr<state>& self, std::size_t tried) {
      const auto count = options.sentinels.size();
      if (tried == count) {  // none knows: back off, as after a failed connect
        finding_primary = false;
        failed(std::chrono::steady_clock::now());
        for (auto& [words, done] : std::exchange(held, {}))
          done(boost::asio::error::not_connected, {});
        return;
      }
      const auto which = (last_sentinel + tried) % count;
      auto sentinel = std::make_shared<state>(
          strand.get_inner_executor(), client_options{.host = options.sentinels[which].first,
                                                      .port = options.sentinels[which].second,
                                                      .connect_timeout = options.connect_timeout,
                                                      .command_timeout = options.command_timeout});
      completion answered = [weak_self = std::weak_ptr<state>(self), sentinel, which, tried](
                                error_code ec, reply r) {
        // On the sentinel's strand: done with it, and back to this client's.
        boost::asio::post(sentinel->strand, [sentinel] { sentinel->disconnect(); });
        auto self = weak_self.lock();
        if (!self) return;
        boost::asio::dispatch(self->strand, [self, ec, r = std::move(r), which, tried] {
          if (!ec && r.type == reply::kind::array && r.elements.size() == 2 &&
              !r.elements[0].text.empty()) {
            self->options.host = r.elements[0].text;
            self->options.port = std::atoi(r.elements[1].text.c_str());
            self->last_sentinel = which;
            self->primary_found = true;
            self->finding_primary = false;
            for (auto& [words, done] : std::exchange(self->held, {}))
              self->send(self, std::move(words), std::move(done));
            return;
          }
          self->find_primary(self, tried + 1);
        });
      };
      boost::asio::dispatch(sentinel->strand, [sentinel, name = options.primary_name,
                                               answered = std::move(answered)]() mutable {
        sentinel->send(sentinel, {"SENTINEL", "get-master-addr-by-name", std::move(name)},
                       std::move(answered));
      });
    }

    // Starts a connection unless the backoff forbids it yet. On the strand.
    bool connect(const std::shared_ptr<state>& self) {
      const auto now = std::chrono::steady_clock::now();
      if (now < retry_at) return false;
      context = redisAsyncConnect(options.host.c_str(), options.port);
      if (!context || context->err) {
        if (context) redisAsyncFree(context);
        context = nullptr;
        failed(now);
        return false;
      }
      connect_deadline = now + options.connect_timeout;
      deadlines.clear();
      primary_found = false;  // the next connection asks the sentinels again
      context->data = this;
      weak = self;
      boost::system::error_code ec;
      socket.assign(context->c.fd, ec);
      context->ev.data = this;
      context->ev.addRead = [](void* p) { static_cast<state*>(p)->want(true, true); };
      context->ev.delRead = [](void* p) { static_cast<state*>(p)->want(true, false); };
      context->ev.addWrite = [](void* p) { static_cast<state*>(p)->want(false, true); };
      context->ev.delWrite = [](void* p) { static_cast<state*>(p)->want(false, false); };
      context->ev.cleanup = [](void* p) { static_cast<state*>(p)->cleanup(); };
      redisAsyncSetConnectCallback(context, &state::on_connect);
      redisAsyncSetDisconnectCallback(context, &state::on_disconnect);
      watch();
      return true;
    }

    void failed(std::chrono::steady_clock::time_point now) {
      backoff = backoff.count() == 0 ? options.reconnect_min
                                     : std::min(options.reconnect_max, backoff * 2);
      retry_at = now + backoff;
    }

    void want(bool read, bool on) {
      (read ? reading : writing) = on;
      if (on) arm(read);
    }

    void arm(bool read) {
      bool& pending = read ? read_armed : write_armed;
      if (pending || !context) return;
      pending = true;
      socket.async_wait(read ? boost::asio::posix::stream_descriptor::wait_read
                             : boost::asio::posix::stream_descriptor::wait_write,
                        // Weak: a pending wait must not keep the connection alive.
                        [weak_self = weak, read, id = connection](boost::system::error_code ec) {
                          auto self = weak_self.lock();
                          // A wait of a connection since dropped (a new one may be up already).
                          if (!self || self->connection != id) return;
                          (read ? self->read_armed : self->write_armed) = false;
                          if (ec || !self->context) return;
                          if (read && self->reading)
                            redisAsyncHandleRead(self->context);
                          else if (!read && self->writing)
                            redisAsyncHandleWrite(self->context);
                          // The context may be gone now (a disconnect frees it).
                          if (self->context && (read ? self->reading : self->writing))
                            self->arm(read);
                        });
    }

    // hiredis is done with the socket: forget it without closing it (hiredis closes it).
    void cleanup() {
      reading = writing = read_armed = write_armed = false;
      ++connection;  // its waits, cancelled here, must not touch the next connection's
      boost::system::error_code ec;
      socket.cancel(ec);
      if (socket.is_open()) socket.release();
    }

    // Frees the connection at once: commands in flight complete with connection_reset.
    void disconnect() {
      if (auto* c = std::exchange(context, nullptr)) redisAsyncFree(c);
    }

    static void on_reply(redisAsyncContext* c, void* r, void* privdata) {
      std::unique_ptr<in_flight> pending(static_cast<in_flight*>(privdata));
      auto& done = pending->done;
      auto* s = static_cast<state*>(c->data);
      if (!s->deadlines.empty()) s->deadlines.pop_front();
      if (!r) {
        done(s->dropping_for, {});
        return;
      }
      auto answer = reply::from(static_cast<redisReply*>(r));
      if (answer.is_error() && pending->redirects < max_redirects) {
        if (auto to = redirection(answer.text)) {
          s->redirect(c, std::move(pending), std::move(*to));
          return;
        }
      }
      if (!s->options.sentinels.empty() && answer.is_error() &&
          answer.text.starts_with("READONLY")) {
        // A failover made this server a replica: drop it (not from inside hiredis's callback),
        // so the next command asks the sentinels where the primary went.
        boost::asio::post(s->strand, [weak_self = s->weak, c] {
          if (auto self = weak_self.lock(); self && self->context == c) self->disconnect();
        });
      }
      done({}, std::move(answer));
    }

    // A cluster's answer that the key's slot is served elsewhere: "MOVED <slot> <host>:<port>"
    // (for good: this client moves there) or "ASK <slot> <host>:<port>" (this once, while the
    // slot migrates).
    struct redirect_to {
      bool moved = false;
      std::string host;
      int port = 0;
    };
    static std::optional<redirect_to> redirection(std::string_view text) {
      const bool moved = text.starts_with("MOVED ");
      if (!moved && !text.starts_with("ASK ")) return std::nullopt;
      const auto address = text.substr(text.rfind(' ') + 1);
      const auto colon = address.rfind(':');
      if (colon == std::string_view::npos) return std::nullopt;
      return redirect_to{moved, std::string(address.substr(0, colon)),
                         std::atoi(std::string(address.substr(colon + 1)).c_str())};
    }

    // Sends `pending` again where the cluster said. Inside hiredis's callback: the work is
    // posted. MOVED moves this client's one connection (the commands still on the old one end
    // with connection_reset); ASK goes once over a connection of its own, after ASKING.
    void redirect(redisAsyncContext* from, std::unique_ptr<in_flight> pending, redirect_to to) {
      auto command = std::shared_ptr<in_flight>(std::move(pending));
      ++command->redirects;
      boost::asio::post(strand, [weak_self = weak, from, command, to = std::move(to)] {
        auto self = weak_self.lock();
        if (!self) {
          command->done(boost::asio::error::connection_reset, {});
          return;
        }
        if (to.moved) {
          self->options.host = to.host;
          self->options.port = to.port;
          self->options.sentinels.clear();  // a cluster node is found by MOVED, not by sentinels
          if (self->context == from) self->disconnect();
          self->retry_at = {};
          self->send(self, std::move(command->words), std::move(command->done), command->redirects);
          return;
        }
        auto once = std::make_shared<state>(
            self->strand.get_inner_executor(),
            client_options{.host = to.host,
                           .port = to.port,
                           .connect_timeout = self->options.connect_timeout,
                           .command_timeout = self->options.command_timeout});
        boost::asio::dispatch(once->strand, [once, command] {
          once->send(once, {"ASKING"}, [](error_code, const reply&) {});
          once->send(
              once, std::move(command->words),
              [once, command](error_code ec, reply r) {
                boost::asio::post(once->strand, [once] { once->disconnect(); });
                command->done(ec, std::move(r));
              },
              command->redirects);
        });
      });
    }

    static void on_connect(const redisAsyncContext* c, int status) {
      auto* s = static_cast<state*>(c->data);
      if (status != REDIS_OK) {
        s->context = nullptr;  // hiredis frees it after this callback
        s->failed(std::chrono::steady_clock::now());
        return;
      }
      s->backoff = {};
      s->up = true;
      if (s->options.on_connection) s->options.on_connection(true);
    }

    static void on_disconnect(const redisAsyncContext* c, int status) {
      auto* s = static_cast<state*>(c->data);
      s->context = nullptr;
      s->deadlines.clear();
      const bool was_up = s->up.exchange(false);
      if (status != REDIS_OK) s->failed(std::chrono::steady_clock::now());
      if (was_up && s->options.on_connection) s->options.on_connection(false);
    }

    boost::asio::strand<boost::asio::any_io_executor> strand;
    client_options options;
    boost::asio::posix::stream_descriptor socket;
    redisAsyncContext* context = nullptr;
    std::weak_ptr<state> weak;
    bool reading = false, writing = false, read_armed = false, write_armed = false;
    std::atomic<bool> up{false};
    std::chrono::milliseconds backoff{0};
    std::chrono::steady_clock::time_point retry_at{};
    boost::asio::steady_timer watchdog;
    bool watchdog_armed = false;
    std::chrono::steady_clock::time_point connect_deadline{};
    std::deque<std::chrono::steady_clock::time_point> deadlines;     // of the commands in flight
    error_code dropping_for = boost::asio::error::connection_reset;  // what the unanswered get
    static constexpr int max_redirects = 5;  // a cluster in flux may redirect more than once
    // Sentinel mode: commands held while the primary is being found, and where we stand.
    std::vector<std::pair<std::vector<std::string>, completion>> held;
    bool finding_primary = false, primary_found = false;
    std::size_t last_sentinel = 0;
    std::uint64_t connection = 0;  // counts connections, for their socket waits
  };

  std::shared_ptr<state> state_;
};

}  // namespace weir::redis
