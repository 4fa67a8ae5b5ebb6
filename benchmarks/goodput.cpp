// goodput: clients against rate limiters nobody here wrote, counted by the servers themselves.
//
// The referees: nginx's limit_req (a leaky bucket decided in whole milliseconds; refusals do not
// count) in three modes: strict (burst 0), burst=10 nodelay, and burst=10 with delay; and
// HAProxy's stick-table rate (a sliding one-second window in which refusals do count, so a
// client that keeps knocking stays locked out), which also reports X-RateLimit-Limit and
// -Remaining without a window; Flask-Limiter (Python's limiter middleware, Debian's
// python3-flask-limiter) with a fixed one-second window from its first request, reporting
// X-RateLimit-Reset in whole epoch seconds; and nginx's strict limit behind a 10% chance of a
// 503 decided before the limit is (a flaky gateway). All are started here in a scratch
// directory on loopback ports, never as system services.
//
// The clients: the naive loop (on a 429 sleep 1, 2, 4 ... s, five retries), an SDK-style client
// (two retries, 0.5 s doubling with 25% jitter, Retry-After honoured up to 60 s: what the
// official OpenAI and Anthropic SDKs do), weir's router told the limit, weir's router told the
// limit and a tokens-per-minute limit its estimates (42 tokens) bind at while every answer
// reports 14 (a refund on every call), and weir's router discovering the limit. Each runs
// `concurrency` workers that send as fast as they are let for the run.
//
//     goodput [--seconds N] [--concurrency N,N] [--limiters strict-5,strict-20,...]
//             [--clients naive,sdk,weir-given,weir-refunds,weir-discovering] [--check]
//
// GOODPUT_TRACE=1 prints the router's view of the model (its request limit, what it sent, its
// 429s) every half second of a weir run, to see how it paces.
//
// --check runs the short regression set that ctest runs (label rig) and fails below floors set
// well under the targets, so that a regression fails but a busy machine does not.
#include <weir/http/beast.hpp>
#include <weir/http/client.hpp>
#include <weir/routing/router.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <boost/beast/http/empty_body.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

constexpr std::string_view reply_body =
    R"({"id":"r","choices":[{"message":{"role":"assistant","content":"ok"}}],)"
    R"("usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}})";

enum class algorithm { strict, burst_nodelay, delay, sliding_window, fixed_window, flaky_strict };

struct limiter {
  std::string name;
  algorithm kind;
  double rate;  // requests per second
  unsigned port = 0;
};

std::vector<limiter> all_limiters() {
  return {{"strict-5", algorithm::strict, 5},
          {"strict-20", algorithm::strict, 20},
          {"strict-100", algorithm::strict, 100},
          {"burst-nodelay-20", algorithm::burst_nodelay, 20},
          {"delay-20", algorithm::delay, 20},
          {"haproxy-window-20", algorithm::sliding_window, 20},
          {"flask-fixed-20", algorithm::fixed_window, 20},
          {"flaky-503-strict-20", algorithm::flaky_strict, 20}};
}

// Requests the server answered, by status, counted on its side.
struct server_counts {
  std::uint64_t ok = 0, refused = 0, unavailable = 0;  // 200, 429, 503
};

// Flask-Limiter's fixed window, run by Debian's Python (not a virtualenv's): the limit is the
// middleware's; the app only answers and counts what it answered, on the server's side.
constexpr std::string_view flask_server = R"(import sys
from flask import Flask
from flask_limiter import Limiter
from werkzeug.serving import WSGIRequestHandler, run_simple

port, per_second, body = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
app = Flask(__name__)
limiter = Limiter(lambda: "everyone", app=app, headers_enabled=True, strategy="fixed-window",
                  storage_uri="memory://")
counts = {200: 0, 429: 0}

@app.after_request
def count(response):
    if response.status_code in counts:
        counts[response.status_code] += 1
    return response

@app.post("/v1/chat/completions")
@limiter.limit(f"{per_second} per 1 second")
def chat():
    return app.response_class(body, mimetype="application/json")

@app.get("/counts")
@limiter.exempt
def tally():
    return f"{counts[200]} {counts[429]}"

WSGIRequestHandler.protocol_version = "HTTP/1.1"
run_simple("127.0.0.1", port, app, threaded=True)
)";

// nginx and HAProxy, started in `dir` on ports from `base_port`, stopped by the destructor.
class rig {
 public:
  rig(fs::path dir, std::vector<limiter>& limiters, unsigned base_port) : dir_(std::move(dir)) {
    fs::create_directories(dir_);
    unsigned port = base_port;
    const unsigned backend = port++, stats = port++;
    stats_port_ = stats;
    std::string nginx_servers, haproxy_frontends, nginx_maps;
    for (auto& l : limiters) {
      l.port = port++;
      if (l.kind == algorithm::fixed_window) {
        write("flask_fixed_window.py", std::string(flask_server));
        spawn({"/usr/bin/python3", (dir_ / "flask_fixed_window.py").string(),
               std::to_string(l.port), std::to_string(static_cast<int>(l.rate)),
               std::string(reply_body)});
        continue;
      }
      if (l.kind == algorithm::sliding_window) {
        const auto n = static_cast<int>(l.rate);
        haproxy_frontends += fmt::format(
            "frontend {name}\n  bind 127.0.0.1:{port}\n"
            "  stick-table type integer size 1 expire 10s store http_req_rate(1s)\n"
            "  http-request track-sc0 int(1)\n"
            "  http-request deny deny_status 429 hdr Retry-After 1 hdr X-RateLimit-Limit {n} "
            "hdr X-RateLimit-Remaining 0 if {{ sc_http_req_rate(0) gt {n} }}\n"
            "  http-request return status 200 content-type application/json string \"{body}\" "
            "hdr X-RateLimit-Limit {n} hdr X-RateLimit-Remaining "
            "\"%[sc_http_req_rate(0),neg,add({n})]\"\n",
            fmt::arg("name", l.name), fmt::arg("port", l.port), fmt::arg("n", n),
            fmt::arg("body", escaped(reply_body)));
        continue;
      }
      const char* mode = l.kind == algorithm::burst_nodelay ? " burst=10 nodelay"
                         : l.kind == algorithm::delay       ? " burst=10"
                                                            : "";
      // The gateway's 503 is decided in nginx's rewrite phase, before limit_req counts the
      // request: what it refuses costs the limit nothing.
      std::string flaky;
      if (l.kind == algorithm::flaky_strict) {
        nginx_maps += fmt::format(
            "  split_clients \"${{request_id}}\" ${name}_fails {{\n"
            "    10% 1;\n    * 0;\n  }}\n",
            fmt::arg("name", l.name));
        flaky = fmt::format("      if (${}_fails) {{ return 503; }}\n", l.name);
      }
      nginx_servers += fmt::format(
          "  limit_req_zone $server_port zone={name}:1m rate={rate}r/s;\n"
          "  server {{\n    listen 127.0.0.1:{port};\n"
          "    access_log {dir}/{name}.log counts;\n"
          "    location /v1/ {{\n{flaky}      limit_req zone={name}{mode};\n"
          "      add_header Retry-After 1 always;\n"
          "      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n"
          "      proxy_pass http://model;\n    }}\n  }}\n",
          fmt::arg("name", l.name), fmt::arg("rate", static_cast<int>(l.rate)),
          fmt::arg("port", l.port), fmt::arg("dir", dir_.string()), fmt::arg("mode", mode),
          fmt::arg("flaky", flaky));
    }
    write("nginx.conf",
          fmt::format("worker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\n"
                      "error_log {dir}/nginx-error.log warn;\n"
                      "events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n"
                      "  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n"
                      "  fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n"
                      "  scgi_temp_path {dir}/scgi;\n  log_format counts '$msec $status';\n"
                      "  limit_req_status 429;\n"
                      "  upstream model {{ server 127.0.0.1:{backend}; keepalive 64; }}\n"
                      "  server {{\n    listen 127.0.0.1:{backend};\n    access_log off;\n"
                      "    default_type application/json;\n"
                      "    location / {{ return 200 '{body}'; }}\n  }}\n{maps}{servers}}}\n",
                      fmt::arg("dir", dir_.string()), fmt::arg("backend", backend),
                      fmt::arg("body", reply_body), fmt::arg("maps", nginx_maps),
                      fmt::arg("servers", nginx_servers)));
    write("haproxy.cfg", fmt::format("global\n  maxconn 4096\ndefaults\n  mode http\n"
                                     "  timeout connect 1s\n  timeout client 60s\n"
                                     "  timeout server 60s\n{}frontend stats\n"
                                     "  bind 127.0.0.1:{}\n  stats enable\n  stats uri /stats\n",
                                     haproxy_frontends, stats));
    spawn({"nginx", "-p", dir_.string(), "-c", (dir_ / "nginx.conf").string()});
    spawn({"haproxy", "-db", "-f", (dir_ / "haproxy.cfg").string()});
    for (const auto& l : limiters) wait_for_port(l.port);
    wait_for_port(stats);
  }

  ~rig() {
    for (auto pid : children_) ::kill(pid, SIGTERM);
    for (auto pid : children_) ::waitpid(pid, nullptr, 0);
  }

  rig(const rig&) = delete;
  rig& operator=(const rig&) = delete;

  // Every answer so far, as the server counted it.
  server_counts counts(const limiter& l) const {
    server_counts c;
    if (l.kind == algorithm::fixed_window) {
      std::istringstream(http_get(l.port, "/counts")) >> c.ok >> c.refused;
      return c;
    }
    if (l.kind == algorithm::sliding_window) {
      // HAProxy's own statistics: the frontend's 2xx and 4xx answers.
      std::istringstream csv(http_get(stats_port_, "/stats;csv"));
      for (std::string line; std::getline(csv, line);) {
        if (!line.starts_with(l.name + ",FRONTEND,")) continue;
        std::vector<std::string> fields;
        std::istringstream row(line);
        for (std::string f; std::getline(row, f, ',');) fields.push_back(f);
        c.ok = std::stoull(fields.at(40));
        c.refused = std::stoull(fields.at(42));
      }
      return c;
    }
    std::ifstream log(dir_ / (l.name + ".log"));
    for (std::string stamp, status; log >> stamp >> status;) {
      if (status == "200") ++c.ok;
      if (status == "429") ++c.refused;
      if (status == "503") ++c.unavailable;
    }
    return c;
  }

 private:
  static std::string escaped(std::string_view s) {
    std::string out;
    for (char c : s) {
      if (c == '"') out += '\\';
      out += c;
    }
    return out;
  }

  void write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }

  void spawn(std::vector<std::string> args) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // The servers write to files of their own, never to our output (a pipe reading it would
    // otherwise wait for them too).
    posix_spawn_file_actions_t files;
    ::posix_spawn_file_actions_init(&files);
    const auto out = (dir_ / (args[0] + ".out")).string();
    ::posix_spawn_file_actions_addopen(&files, STDOUT_FILENO, out.c_str(),
                                       O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::posix_spawn_file_actions_adddup2(&files, STDOUT_FILENO, STDERR_FILENO);
    pid_t pid;
    const int failed = ::posix_spawnp(&pid, argv[0], &files, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&files);
    if (failed != 0)
      throw std::runtime_error(fmt::format("cannot start {} (is it installed?)", args[0]));
    children_.push_back(pid);
  }

  static void wait_for_port(unsigned port) {
    asio::io_context io;
    for (int attempt = 0; attempt < 100; ++attempt) {
      asio::ip::tcp::socket s(io);
      boost::system::error_code ec;
      s.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)}, ec);
      if (!ec) return;
      std::this_thread::sleep_for(50ms);  // a server starting: real time, outside any measure
    }
    throw std::runtime_error(fmt::format("nothing listens on port {}", port));
  }

  static std::string http_get(unsigned port, const std::string& target) {
    asio::io_context io;
    boost::beast::tcp_stream s(io);
    s.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
    boost::beast::http::request<boost::beast::http::empty_body> req{boost::beast::http::verb::get,
                                                                    target, 11};
    req.set(boost::beast::http::field::host, "127.0.0.1");
    boost::beast::http::write(s, req);
    boost::beast::flat_buffer buffer;
    boost::beast::http::response<boost::beast::http::string_body> res;
    boost::beast::http::read(s, buffer, res);
    return res.body();
  }

  fs::path dir_;
  unsigned stats_port_ = 0;
  std::vector<pid_t> children_;
};

// ---- the clients ------------------------------------------------------------------------------

enum class client { naive, sdk, weir_given, weir_refunds, weir_discovering };

const char* name_of(client c) {
  switch (c) {
    case client::naive: return "naive retry loop";
    case client::sdk: return "SDK-style retries";
    case client::weir_given: return "weir, limit given";
    case client::weir_refunds: return "weir, given, refunds";
    case client::weir_discovering: return "weir, discovering";
  }
  return "?";
}

struct run_result {
  server_counts measured;    // by the server, from `measure_from` to the end
  std::uint64_t failed = 0;  // requests the client gave up on
  double measured_seconds = 0;
};

constexpr std::string_view request_body =
    R"({"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":2})";

// One worker's requests until the run ends; `failed` counts the requests given up on.
class run {
 public:
  run(const rig& referee, const limiter& l, client who, std::size_t concurrency,
      steady::duration length)
      : referee_(referee), limiter_(l), who_(who), concurrency_(concurrency), length_(length) {}

  run_result go(steady::duration measure_from) {
    asio::io_context io(1);
    const auto base = fmt::format("http://127.0.0.1:{}/v1", limiter_.port);
    client_.emplace(io.get_executor(), weir::http::endpoint::parse(base));
    if (who_ != client::naive && who_ != client::sdk) make_router(io);
    start_ = steady::now();
    end_ = start_ + length_;
    for (std::size_t w = 0; w < concurrency_; ++w) asio::co_spawn(io, worker(w), asio::detached);
    if (router_ && std::getenv("GOODPUT_TRACE")) asio::co_spawn(io, trace(), asio::detached);
    std::optional<server_counts> at_start;
    std::thread sampler([&] {
      std::this_thread::sleep_until(start_ + measure_from);
      at_start = referee_.counts(limiter_);
    });
    // Every exchange has a 30 s deadline, so the run ends by then; never wait past it.
    io.run_until(end_ + 40s);
    if (!io.stopped()) fmt::print(stderr, "goodput: the run did not end on time\n");
    io.stop();
    sampler.join();
    router_.reset();  // their sockets and timers belong to `io`: gone before it is
    client_.reset();
    const auto at_end = referee_.counts(limiter_);
    run_result r;
    r.measured = {at_end.ok - at_start->ok, at_end.refused - at_start->refused,
                  at_end.unavailable - at_start->unavailable};
    r.failed = failed_;
    r.measured_seconds =
        std::chrono::duration<double>(steady::now() - (start_ + measure_from)).count();
    return r;
  }

 private:
  using router_type =
      weir::routing::router<int, weir::http::response, steady, weir::http::response_classifier>;

  void make_router(asio::io_context& io) {
    weir::routing::catalog c;
    c.add(weir::routing::provider_spec{.name = "rig"});
    const bool given = who_ != client::weir_discovering;
    c.add(weir::routing::model_spec{
        .provider = "rig",
        .id = "m",
        .requests_per_minute = given ? limiter_.rate * 60 : 0,
        // Binding at the estimate (42 tokens a call), where each answer reports 14.
        .tokens_per_minute =
            who_ == client::weir_refunds ? limiter_.rate * 60 * estimated_tokens : 0});
    router_type::options_type o;
    o.max_attempts = 8;
    router_.emplace(io.get_executor(), std::move(c), std::move(o));
    router_->connect("rig",
                     [this](const weir::routing::model_spec&, const int&) { return send(); });
  }

  // GOODPUT_TRACE=1: the router's view of the model every half second, to see how it paces.
  asio::awaitable<void> trace() {
    asio::steady_timer tick(co_await asio::this_coro::executor);
    while (steady::now() < end_) {
      tick.expires_after(500ms);
      co_await tick.async_wait(asio::use_awaitable);
      const auto m = router_->status().at(0);
      fmt::print(stderr, "  {:5.1f} s  limit {}/min  sent {:.0f}/min  429s {}  errors {}\n",
                 std::chrono::duration<double>(steady::now() - start_).count(),
                 m.requests_limit ? fmt::format("{:.0f}", *m.requests_limit) : "?",
                 m.requests_per_minute, m.rate_limited, m.errors);
    }
  }

  asio::awaitable<weir::http::response> send() {
    return client_->post("/chat/completions", std::string(request_body), {}, 30s);
  }

  asio::awaitable<void> worker(std::size_t seed) {
    std::mt19937_64 random(seed);
    asio::steady_timer sleep(co_await asio::this_coro::executor);
    while (steady::now() < end_) {
      if (router_) {
        try {
          const std::uint64_t output = who_ == client::weir_refunds ? estimated_tokens - 12 : 2;
          auto op =
              router_->route(0, {.input_tokens = 12, .output_tokens = output, .deadline = end_});
          co_await std::move(op);
        } catch (const weir::exception& e) {
          // A wait cut short by the end of the run is not a failure, nor a call that the run's
          // end stopped (it is the call's deadline: the router ends the call by it).
          const bool cut = steady::now() >= end_ ||
                           (e.retry_after() && steady::now() + *e.retry_after() >= end_);
          if (!cut && failed_++ == 0) fmt::print(stderr, "  first failure: {}\n", e.what());
        }
        continue;
      }
      // The naive loop and the SDK-style client.
      const int attempts = who_ == client::naive ? 6 : 3;
      bool done = false;
      for (int attempt = 0; attempt < attempts && !done; ++attempt) {
        if (attempt > 0) {
          auto wait = std::chrono::duration_cast<steady::duration>(1s * (1 << (attempt - 1)));
          if (who_ == client::sdk) wait = sdk_wait(attempt, random);
          if (steady::now() + wait >= end_) co_return;  // cut by the end of the run
          sleep.expires_after(wait);
          co_await sleep.async_wait(asio::use_awaitable);
        }
        try {
          last_ = co_await send();
          done = last_.result_int() == 200;
        } catch (const std::exception&) {
        }
      }
      if (!done) ++failed_;
    }
  }

  // openai-python and openai-node: Retry-After (-ms) when between 0 and 60 s, otherwise 0.5 s
  // doubling to 8 s, less up to 25% jitter.
  steady::duration sdk_wait(int attempt, std::mt19937_64& random) const {
    weir::http::hint_parser hints;
    for (const auto& f : last_) hints.add(f.name_string(), f.value());
    if (auto r = hints.hint().retry_after; r && *r <= 60s)
      return std::chrono::duration_cast<steady::duration>(*r);
    const double base = std::min(0.5 * (1 << (attempt - 1)), 8.0);
    const double jitter = 1 - 0.25 * std::uniform_real_distribution<>(0, 1)(random);
    return std::chrono::duration_cast<steady::duration>(
        std::chrono::duration<double>(base * jitter));
  }

  static constexpr double estimated_tokens = 42;  // the refunds client's estimate of a call

  const rig& referee_;
  const limiter& limiter_;
  client who_;
  std::size_t concurrency_;
  steady::duration length_;
  steady::time_point start_, end_;
  std::optional<weir::http::client> client_;
  std::optional<router_type> router_;
  weir::http::response last_;
  std::uint64_t failed_ = 0;
};

std::vector<std::string> split(std::string_view s) {
  std::vector<std::string> out;
  while (!s.empty()) {
    const auto comma = s.find(',');
    out.emplace_back(s.substr(0, comma));
    s.remove_prefix(comma == std::string_view::npos ? s.size() : comma + 1);
  }
  return out;
}

client client_named(std::string_view n) {
  for (auto c : {client::naive, client::sdk, client::weir_given, client::weir_refunds,
                 client::weir_discovering}) {
    const std::string_view flag = c == client::naive          ? "naive"
                                  : c == client::sdk          ? "sdk"
                                  : c == client::weir_given   ? "weir-given"
                                  : c == client::weir_refunds ? "weir-refunds"
                                                              : "weir-discovering";
    if (flag == n) return c;
  }
  throw std::invalid_argument(fmt::format("unknown client '{}'", n));
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> limiter_names,
      client_names = {"naive", "sdk", "weir-given", "weir-discovering"};
  std::vector<std::size_t> concurrencies = {8, 32};
  double seconds = 30;
  bool check = false;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string_view flag = argv[i];
      const auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(fmt::format("{} needs a value", flag));
        return argv[++i];
      };
      if (flag == "--limiters") {
        limiter_names = split(value());
      } else if (flag == "--clients") {
        client_names = split(value());
      } else if (flag == "--concurrency") {
        concurrencies.clear();
        for (const auto& c : split(value())) concurrencies.push_back(std::stoul(c));
      } else if (flag == "--seconds") {
        seconds = std::stod(value());
      } else if (flag == "--check") {
        check = true;
      } else {
        fmt::print(stderr, "goodput: unknown option '{}'\n", flag);
        return 2;
      }
    }
    for (const auto& c : client_names) client_named(c);  // refuses an unknown name now
  } catch (const std::exception& e) {
    fmt::print(stderr, "goodput: {}\n", e.what());
    return 2;
  }

  // The regression set: short runs, floors well under the targets (95% given, 90% discovering).
  struct floor {
    std::string limiter;
    client who;
    std::size_t concurrency;
    double seconds, measure_from, min_goodput, max_refused;
  };
  std::vector<floor> floors;
  if (check) {
    floors = {{"strict-20", client::weir_given, 8, 12, 0, 0.85, 0.03},
              {"strict-20", client::weir_discovering, 32, 25, 10, 0.75, 0.06},
              // 95-96% in the full run, 83-87% before slots of server errors were given back.
              {"flaky-503-strict-20", client::weir_given, 32, 12, 0, 0.89, 0.03},
              // Every refusal counts against the client there: 85% in the full run, more spread.
              {"haproxy-window-20", client::weir_discovering, 8, 25, 10, 0.6, 0.06}};
  }

  auto limiters = all_limiters();
  if (check) {
    limiter_names.clear();
    for (const auto& f : floors) limiter_names.push_back(f.limiter);
  }
  if (!limiter_names.empty())
    std::erase_if(limiters, [&](const limiter& l) {
      return std::find(limiter_names.begin(), limiter_names.end(), l.name) == limiter_names.end();
    });
  const auto dir = fs::temp_directory_path() / fmt::format("weir-goodput-{}", ::getpid());
  int failures = 0;
  try {
    rig referee(dir, limiters, 18400 + static_cast<unsigned>(::getpid() % 500) * 10);
    const auto find = [&](const std::string& n) -> const limiter& {
      for (const auto& l : limiters)
        if (l.name == n) return l;
      throw std::invalid_argument(fmt::format("unknown limiter '{}'", n));
    };
    fmt::print("{:<20} {:<20} {:>5} {:>9} {:>10} {:>8} {:>7} {:>7}  {}\n", "limiter", "client",
               "conc.", "goodput", "of limit", "429s", "503s", "failed", "measured");
    const auto report = [&](const limiter& l, client who, std::size_t conc, const run_result& r,
                            double from) {
      const double goodput = static_cast<double>(r.measured.ok) / r.measured_seconds;
      const auto answered = r.measured.ok + r.measured.refused + r.measured.unavailable;
      const auto share = [&](std::uint64_t n) {
        return answered ? 100 * static_cast<double>(n) / static_cast<double>(answered) : 0.0;
      };
      const double refused = share(r.measured.refused) / 100;
      fmt::print(
          "{:<20} {:<20} {:>5} {:>7.1f}/s {:>9.0f}% {:>7.1f}% {:>6.1f}% {:>7}  after {:.0f} s\n",
          l.name, name_of(who), conc, goodput, 100 * goodput / l.rate, 100 * refused,
          share(r.measured.unavailable), r.failed, from);
      std::fflush(stdout);
      return std::pair{goodput / l.rate, refused};
    };
    if (check) {
      for (const auto& f : floors) {
        const auto& l = find(f.limiter);
        run once(
            referee, l, f.who, f.concurrency,
            std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(f.seconds)));
        const auto r = once.go(std::chrono::duration_cast<steady::duration>(
            std::chrono::duration<double>(f.measure_from)));
        const auto [share, refused] = report(l, f.who, f.concurrency, r, f.measure_from);
        if (share < f.min_goodput || refused > f.max_refused || r.failed > 0) {
          fmt::print("  FAILED: floor {:.0f}% of the limit, at most {:.0f}% 429s, none failed\n",
                     100 * f.min_goodput, 100 * f.max_refused);
          ++failures;
        }
      }
      fmt::print("{} passed, {} failed\n", floors.size() - failures, failures);
    } else {
      for (const auto& l : limiters)
        for (const auto& c : client_names)
          for (auto conc : concurrencies) {
            const auto who = client_named(c);
            const double from = who == client::weir_discovering ? 10 : 0;
            run once(referee, l, who, conc,
                     std::chrono::duration_cast<steady::duration>(
                         std::chrono::duration<double>(seconds + from)));
            const auto r = once.go(
                std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(from)));
            report(l, who, conc, r, from);
            std::this_thread::sleep_for(2s);  // let the server's window forget this run
          }
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "goodput: {}\n", e.what());
    fs::remove_all(dir);
    return 2;
  }
  fs::remove_all(dir);
  return failures == 0 ? 0 : 1;
}
