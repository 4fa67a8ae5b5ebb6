// weir-gateway: weir's router behind an OpenAI- and Anthropic-compatible endpoint, so that agents
// in any language get its pacing by pointing their SDK's base URL at it (docs/gateway.md).
//
//     weir-gateway --listen 127.0.0.1:8080 --upstream https://api.openai.com/v1
//                  --dialect openai --api-key-env OPENAI_API_KEY [--rpm N] [--tpm N]
//     weir-gateway --listen 127.0.0.1:8080 --catalog gateway.json
//     weir-gateway ... --redis 10.0.0.5:6379 [--fleet prod]   (gateways sharing the limits)
#include "gateway/config.hpp"
#ifdef WEIR_GATEWAY_REDIS
#include "gateway/fleet.hpp"
#endif

#include <fmt/format.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/json/src.hpp>

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace {

constexpr const char* usage_text =
    R"(weir-gateway: weir's router behind an OpenAI- and Anthropic-compatible endpoint.

Usage: weir-gateway --listen HOST:PORT --upstream BASE_URL [options]
       weir-gateway --listen HOST:PORT --catalog FILE [options]

  --listen HOST:PORT   where clients connect (port 0: a free one, printed)
  --upstream URL       one provider's API root (https://api.openai.com/v1); every model asked
                       for goes there, unless --model names them
  --dialect D          what the upstream speaks: openai, anthropic or both (default both)
  --api-key-env VAR    the variable holding the upstream's key (never printed); default none
  --model ID           a model the upstream serves (repeatable); with none, any name goes
  --rpm N, --tpm N     the upstream's limits per model, if known; otherwise read from its
                       headers or discovered
  --client-key-env VAR the variable holding the key clients must send; default none asked
  --catalog FILE       the router's catalog plus upstreams, aliases and tenants
                       (docs/gateway.md)
  --redis ADDRESS      share the limits with the other gateways on this Redis (HOST:PORT or
                       redis://HOST:PORT): cooldowns, learned limits, each model's request limit
  --fleet NAME         the fleet's name on that Redis, the prefix of its keys (default
                       weir-gateway); gateways with the same Redis and name share
  --max-wait S         how long a request may wait for a model to have room (default 60)
  --grace S            on SIGTERM or SIGINT, how long requests in flight may finish (default 10)
  --threads N          I/O threads (default 2)
  --quiet              no line per request
  --help               this text
)";

[[noreturn]] void bad_usage(const std::string& why) {
  fmt::print(stderr, "weir-gateway: {}\nRun weir-gateway --help for the options.\n", why);
  std::exit(2);
}

double number_flag(std::string_view flag, std::string_view text, double low, double high) {
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || !(value >= low && value <= high))
    bad_usage(fmt::format("{} wants a number from {} to {}, not '{}'", flag, low, high, text));
  return value;
}

struct settings {
  gateway::config config;
  gateway::single_upstream upstream;
  std::string catalog;
  std::string redis;  // empty: this gateway alone
  std::string fleet = "weir-gateway";
  std::chrono::milliseconds grace{10'000};
  unsigned threads = 2;
};

settings parse(int argc, char** argv) {
  settings s;
  bool listen_given = false, dialect_given = false, single_only = false, fleet_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    const auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) bad_usage(fmt::format("{} needs a value", flag));
      return argv[++i];
    };
    const auto seconds = [&](double low, double high) {
      return std::chrono::milliseconds(
          static_cast<long long>(number_flag(flag, value(), low, high) * 1000));
    };
    if (flag == "--help" || flag == "-h") {
      fmt::print("{}", usage_text);
      std::exit(0);
    } else if (flag == "--listen") {
      const auto v = value();
      const auto colon = v.rfind(':');
      if (colon == std::string_view::npos) bad_usage("--listen wants HOST:PORT");
      auto host = std::string(v.substr(0, colon));
      if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
      s.config.address = host;
      s.config.port = static_cast<unsigned short>(number_flag(flag, v.substr(colon + 1), 0, 65535));
      listen_given = true;
    } else if (flag == "--upstream") {
      s.upstream.base_url = value();
    } else if (flag == "--dialect") {
      const auto d = value();
      if (d != "openai" && d != "anthropic" && d != "both")
        bad_usage(fmt::format("--dialect is openai, anthropic or both, not '{}'", d));
      s.upstream.openai = d != "anthropic";
      s.upstream.anthropic = d != "openai";
      dialect_given = true;
    } else if (flag == "--api-key-env") {
      s.upstream.api_key_env = value();
      single_only = true;
    } else if (flag == "--model") {
      s.upstream.models.emplace_back(value());
      single_only = true;
    } else if (flag == "--rpm") {
      s.upstream.requests_per_minute = number_flag(flag, value(), 1, 1e7);
      single_only = true;
    } else if (flag == "--tpm") {
      s.upstream.tokens_per_minute = number_flag(flag, value(), 1, 1e10);
      single_only = true;
    } else if (flag == "--client-key-env") {
      s.upstream.client_key_env = value();
      single_only = true;
    } else if (flag == "--catalog") {
      s.catalog = value();
    } else if (flag == "--redis") {
      s.redis = value();
#ifdef WEIR_GATEWAY_REDIS
      try {
        gateway::redis_address(s.redis);
      } catch (const std::exception& e) {
        bad_usage(fmt::format("--redis {}", e.what()));
      }
#else
      bad_usage("--redis: this weir-gateway was built without hiredis (libhiredis-dev)");
#endif
    } else if (flag == "--fleet") {
      s.fleet = value();
      if (s.fleet.empty()) bad_usage("--fleet wants a name");
      fleet_given = true;
    } else if (flag == "--max-wait") {
      s.config.max_wait = seconds(0.001, 3600);
    } else if (flag == "--grace") {
      s.grace = seconds(0, 3600);
    } else if (flag == "--threads") {
      s.threads = static_cast<unsigned>(number_flag(flag, value(), 1, 64));
    } else if (flag == "--quiet") {
      s.config.log_requests = false;
    } else {
      bad_usage(fmt::format("unknown option '{}'", flag));
    }
  }
  if (!listen_given) bad_usage("--listen HOST:PORT is needed");
  if (s.upstream.base_url.empty() == s.catalog.empty())
    bad_usage("give --upstream or --catalog, one of them");
  if (!s.catalog.empty() && (single_only || dialect_given))
    bad_usage(
        "--dialect, --api-key-env, --model, --rpm, --tpm and --client-key-env go with "
        "--upstream; a catalog file says all that");
  if (fleet_given && s.redis.empty()) bad_usage("--fleet goes with --redis");
  if (!s.upstream.base_url.empty()) {
    try {
      weir::http::endpoint::parse(s.upstream.base_url);
    } catch (const std::exception& e) {
      bad_usage(fmt::format("--upstream: {}", e.what()));
    }
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  auto s = parse(argc, argv);
  try {
    s.config = s.catalog.empty() ? gateway::single(s.upstream, std::move(s.config))
                                 : gateway::load_config_file(s.catalog, std::move(s.config));
  } catch (const std::exception& e) {
    fmt::print(stderr, "weir-gateway: {}\n", e.what());
    return 2;
  }
  if (s.config.tenants.empty() && s.config.address != "127.0.0.1" && s.config.address != "::1" &&
      s.config.address != "localhost")
    fmt::print(stderr,
               "weir-gateway: warning: no client key is asked for, and {} is reachable from other "
               "hosts\n",
               s.config.address);

  boost::asio::io_context io(static_cast<int>(s.threads));
#ifdef WEIR_GATEWAY_REDIS
  std::optional<weir::redis::client> redis;
  if (!s.redis.empty()) {
    redis.emplace(io.get_executor(), gateway::redis_address(s.redis));
    gateway::join_fleet(s.config, io.get_executor(), *redis, s.fleet);
  }
#endif
  std::optional<gateway::server> gw;
  try {
    gw.emplace(io.get_executor(), std::move(s.config));
    gw->start();
  } catch (const std::exception& e) {
    fmt::print(stderr, "weir-gateway: {}\n", e.what());
    return 1;
  }
  fmt::print("weir-gateway: listening; base URL {}\n", gw->base_url());
  std::fflush(stdout);

  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    fmt::print(stderr, "weir-gateway: stopping; requests in flight have {} ms\n", s.grace.count());
    boost::asio::co_spawn(io, gw->drain(s.grace), [&](std::exception_ptr) {
      const auto c = gw->counts();
      fmt::print(stderr, "weir-gateway: stopped after {} requests\n", c.requests);
#ifdef WEIR_GATEWAY_REDIS
      if (redis) redis->close();
#endif
      io.stop();
    });
  });
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < s.threads; ++i) threads.emplace_back([&] { io.run(); });
  io.run();
  for (auto& t : threads) t.join();
  return 0;
}
