// Specifications of weir/redis/client.hpp: its replies, and what it does when Redis goes away,
// pauses, loads, fails over or moves a slot, seen through a shared limiter that rides it out.
#include <weir/redis/fleet.hpp>
#include <weir/redis/rate_limiter.hpp>

#include "../support/redis.hpp"

#include <array>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

TEST_CASE(
    "a command's reply comes back typed; an error reply is a reply, and says if it is for now",
    "[client]") {
  run_coroutine([](asio::any_io_executor ex) -> asio::awaitable<void> {
    using kind = weir::redis::reply::kind;
    weir::redis::client redis(ex, {.port = WEIR_REDIS_PORT});
    const auto key = unique_name("client");
    std::vector<weir::redis::reply> replies;
    for (std::vector<std::string> words : {std::vector<std::string>{"SET", key, "7"},
                                           {"INCR", key},
                                           {"GET", key},
                                           {"GET", key + "-never-set"},
                                           {"RPUSH", key + "-list", "a", "b"},
                                           {"LRANGE", key + "-list", "0", "-1"},
                                           {"INCR", key + "-list"}}) {
      auto [ec, reply] =
          co_await redis.async_command(std::move(words), asio::as_tuple(asio::use_awaitable));
      CHECK_FALSE(ec);  // an error reply too: Redis answered
      replies.push_back(std::move(reply));
    }
    REQUIRE(replies.size() == 7);
    CHECK((replies[0].type == kind::status && replies[0].text == "OK"));
    CHECK((replies[1].type == kind::integer && replies[1].integer == 8));
    CHECK((replies[2].type == kind::string && replies[2].text == "8"));
    CHECK(replies[3].type == kind::nil);
    CHECK(replies[4].integer == 2);
    REQUIRE(replies[5].type == kind::array);
    REQUIRE(replies[5].elements.size() == 2);
    CHECK(replies[5].elements[1].text == "b");
    // A wrong command is wrong for good; a loading server is only unavailable for now.
    CHECK(replies[6].is_error());
    CHECK(replies[6].text.starts_with("WRONGTYPE"));
    CHECK_FALSE(replies[6].says_unavailable());
    weir::redis::reply loading;
    loading.type = kind::error;
    loading.text = "LOADING Redis is loading the dataset in memory";
    CHECK(loading.says_unavailable());
    redis.close();
  });
}

namespace {

// How a limiter rode out a fault: one acquire at a time, the fault on from the first second to
// the second.
struct ride {
  int admitted_shared = 0, admitted_local = 0, unavailable = 0, other_errors = 0;
  std::chrono::steady_clock::duration slowest{};
  std::chrono::duration<double> elapsed{};
  std::chrono::duration<double> recovery{};  // from the end of the fault to the return to Redis
  std::chrono::duration<double> outage{};    // from the start of the fault to the return
  std::vector<std::pair<weir::redis::limiter_mode, weir::redis::limiter_mode>> switches;
  weir::redis::limiter_mode at_end = weir::redis::limiter_mode::closed;
};

constexpr auto fault_timeout = 300ms;

ride ride_out(int port, weir::redis::when_unreachable fallback,
              const std::function<void(bool)>& fault,
              std::vector<std::pair<std::string, int>> sentinels = {},
              std::string primary_name = {}) {
  ride r;
  using clock = std::chrono::steady_clock;
  clock::time_point healed_at{}, faulted_at{};
  run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = port,
                                   .reconnect_min = 50ms,
                                   .reconnect_max = 200ms,
                                   .connect_timeout = fault_timeout,
                                   .command_timeout = fault_timeout,
                                   .sentinels = sentinels,
                                   .primary_name = primary_name});
    weir::redis::rate_limiter<> shared(ex, redis,
                                       {.name = unique_name("fault"),
                                        .requests = weir::limit{weir::per_second(200), 10},
                                        .fallback = fallback,
                                        .local_fraction = 0.5,
                                        .probe_every = 100ms,
                                        .on_mode_change = [&](auto from, auto to) {
                                          r.switches.emplace_back(from, to);
                                          if (to == weir::redis::limiter_mode::shared) {
                                            r.recovery = clock::now() - healed_at;
                                            r.outage = clock::now() - faulted_at;
                                          }
                                        }});
    asio::steady_timer pause(ex);
    const auto t0 = std::chrono::steady_clock::now();
    bool on = false, healed = false;
    // Three seconds, and then until the limiter is back on Redis (a loading server takes its
    // time), within reason.
    const auto going = [&] {
      const auto t = std::chrono::steady_clock::now() - t0;
      return t < 3s || (shared.mode() != weir::redis::limiter_mode::shared && t < 20s);
    };
    while (going()) {
      const auto t = std::chrono::steady_clock::now() - t0;
      if (!on && t > 1s) {
        fault(on = true);
        faulted_at = clock::now();
      }
      if (on && !healed && t > 2s) {
        fault(!(healed = true));
        healed_at = clock::now();
      }
      const auto began = std::chrono::steady_clock::now();
      auto [ec, waited] =
          co_await shared.async_acquire({.requests = 1}, asio::as_tuple(asio::use_awaitable));
      r.slowest = std::max(r.slowest, std::chrono::steady_clock::now() - began);
      if (!ec)
        ++(shared.mode() == weir::redis::limiter_mode::shared ? r.admitted_shared
                                                              : r.admitted_local);
      else if (ec == weir::error::unavailable)
        ++r.unavailable;
      else
        ++r.other_errors;
      if (ec) {
        pause.expires_after(20ms);
        co_await pause.async_wait(asio::use_awaitable);
      }
    }
    r.at_end = shared.mode();
    r.elapsed = std::chrono::steady_clock::now() - t0;
    redis.close();
  });
  return r;
}

// What every fault must come to: no acquire waited much past the timeout (not the kernel's
// minutes), every one ended as admitted or unavailable, the fallback took over while Redis was
// away, and the limiter was back on Redis once it returned.
void check_ride(const ride& r, weir::redis::when_unreachable fallback) {
  INFO("shared " << r.admitted_shared << ", local " << r.admitted_local << ", unavailable "
                 << r.unavailable << ", slowest "
                 << std::chrono::duration_cast<std::chrono::milliseconds>(r.slowest).count()
                 << " ms, back on Redis " << r.recovery.count() * 1000
                 << " ms after the fault ended (" << r.outage.count() * 1000
                 << " ms after it began), "
                 << 200 * r.elapsed.count() + 10 - (r.admitted_shared + r.admitted_local)
                 << " admissions under the quota");
  CHECK(r.other_errors == 0);
  // Never more than the quota (200/s and a burst of 10; the local fallback has half of it).
  CHECK(r.admitted_shared + r.admitted_local <= 200 * r.elapsed.count() + 15);
  // Real time: the bound is loose (a busy machine), and still far from a TCP timeout.
  CHECK(r.slowest < fault_timeout + 2s);
  CHECK(r.admitted_shared > 0);
  REQUIRE(r.switches.size() >= 2);
  CHECK(r.switches.front().first == weir::redis::limiter_mode::shared);
  CHECK(r.switches.back().second == weir::redis::limiter_mode::shared);
  CHECK(r.at_end == weir::redis::limiter_mode::shared);
  if (fallback == weir::redis::when_unreachable::use_local) {
    CHECK(r.unavailable == 0);
    CHECK(r.admitted_local > 0);
  } else {
    CHECK(r.unavailable > 0);
  }
}

constexpr std::array fallbacks{weir::redis::when_unreachable::use_local,
                               weir::redis::when_unreachable::fail_closed};

}  // namespace

TEST_CASE("when Redis goes away the limiter falls back, and returns when it is back", "[faults]") {
  rig::redis_server server(WEIR_REDIS_PORT + 1);
  for (const auto fallback : fallbacks) {
    const auto r = ride_out(server.port(), fallback, [&](bool on) {
      if (on)
        server.stop();
      else
        server.start();
    });
    check_ride(r, fallback);
  }
}

TEST_CASE("a paused Redis (SIGSTOP) costs an acquire at most the command timeout", "[faults]") {
  rig::redis_server server(WEIR_REDIS_PORT + 2);
  for (const auto fallback : fallbacks) {
    const auto r = ride_out(server.port(), fallback, [&](bool on) {
      if (on)
        server.pause();
      else
        server.resume();
    });
    check_ride(r, fallback);
  }
}

TEST_CASE("a black-holed or slow connection costs an acquire at most the command timeout",
          "[faults]") {
  rig::redis_server server(WEIR_REDIS_PORT + 3);
  rig::proxy link(server.port());
  for (const auto fallback : fallbacks) {
    const auto r = ride_out(link.port(), fallback, [&](bool on) { link.black_hole(on); });
    check_ride(r, fallback);
  }
  // Slower than the timeout is as good as gone; a little slow is only slow.
  for (const auto fallback : fallbacks) {
    const auto r =
        ride_out(link.port(), fallback, [&](bool on) { link.delay(on ? fault_timeout * 2 : 0ms); });
    check_ride(r, fallback);
  }
  link.delay(20ms);
  const auto slow = ride_out(link.port(), weir::redis::when_unreachable::fail_closed, [](bool) {});
  CHECK(slow.unavailable == 0);
  CHECK(slow.switches.empty());
}

TEST_CASE("a Redis loading its data after a restart (LOADING) is unavailable until loaded",
          "[faults]") {
  const int port = WEIR_REDIS_PORT + 4;
  const std::string persisted =
      fmt::format("--appendonly no --save '' --dbfilename loading-{}.rdb", port);
  {
    // A dataset that takes a while to load (25 000 keys with a delay per key: about 2 s), while
    // the server answers LOADING at once (it looks at its clients every kilobyte loaded).
    std::remove(fmt::format("{}/loading-{}.rdb", WEIR_REDIS_SCRATCH, port).c_str());
    rig::redis_server seed(port, persisted + " --enable-debug-command yes");
    REQUIRE(rig::shell(fmt::format("redis-cli -p {} debug populate 25000 > /dev/null", port)) == 0);
    REQUIRE(rig::shell(fmt::format("redis-cli -p {} save > /dev/null", port)) == 0);
  }
  for (const auto fallback : fallbacks) {
    std::unique_ptr<rig::redis_server> server =
        std::make_unique<rig::redis_server>(port, persisted);
    while (server->ping().starts_with("LOADING")) std::this_thread::sleep_for(50ms);
    bool saw_loading = false;
    const auto r = ride_out(port, fallback, [&](bool on) {
      if (!on) return;  // loading ends by itself
      server.reset();
      server = std::make_unique<rig::redis_server>(
          port, persisted + " --key-load-delay 10 --loading-process-events-interval-bytes 1024");
      saw_loading = server->ping().starts_with("LOADING");
    });
    CHECK(saw_loading);
    check_ride(r, fallback);
  }
}

TEST_CASE("with Sentinel the limiter follows a failover to the new primary", "[faults][sentinel]") {
  for (const auto fallback : fallbacks) {
    rig::sentinel_group group(WEIR_REDIS_PORT + 10, "weir-primary");
    const int old_primary = group.primary().port();
    // Port 1 is nobody: the client must take the primary's place from the sentinel.
    const auto r = ride_out(
        1, fallback,
        [&](bool on) {
          if (on) group.primary().kill();  // a crash: the sentinel promotes the replica
        },
        {{"127.0.0.1", group.sentinel_port()}}, group.name());
    check_ride(r, fallback);
    CHECK(group.primary_at() == old_primary + 1);
  }
}

TEST_CASE("in a cluster the limiter follows MOVED and ASK, and each limit stays exact",
          "[cluster]") {
  rig::cluster nodes(WEIR_REDIS_PORT + 20);
  std::vector<std::string> names;
  std::set<std::size_t> owners;
  for (int i = 0; i < 9; ++i) {
    names.push_back(unique_name("cluster") + std::to_string(i));
    owners.insert(nodes.owner(fmt::format("weir:{{{}}}:requests", names.back())));
  }
  REQUIRE(owners.size() >= 2);  // the names' slots are spread over the nodes

  std::vector<int> admitted(names.size());
  run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    // One client per limiter: each follows MOVED to the node of its own slot.
    for (std::size_t i = 0; i < names.size(); ++i) {
      weir::redis::client redis(ex, {.port = nodes.node(0).port()});
      // Two dimensions: both keys carry the name as a hash tag, so one script reaches both.
      weir::redis::rate_limiter<> shared(ex, redis,
                                         {.name = names[i],
                                          .requests = weir::limit{weir::per_hour(1), 3},
                                          .tokens = weir::limit{weir::per_hour(1), 1000}});
      for (int k = 0; k < 5; ++k) {
        const bool ok =
            co_await shared.async_try_acquire({.requests = 1, .tokens = 100}, asio::use_awaitable);
        admitted[i] += ok;
      }
      CHECK(shared.mode() == weir::redis::limiter_mode::shared);
      // The fleet's shared state lives on its own slot too.
      weir::redis::fleet_state fleet(redis, {.name = names[i]});
      fleet.publish_cooldown("openai", "gpt-4o", 30s);
      const auto news = co_await fleet.read();
      REQUIRE(news);
      REQUIRE(news->cooldowns.size() == 1);
      CHECK(news->cooldowns[0].model == "gpt-4o");
      CHECK(news->cooldowns[0].left > 25s);
      redis.close();
    }
  });
  for (std::size_t i = 0; i < names.size(); ++i) CHECK(admitted[i] == 3);

  // A slot on its way from one node to another: the old node answers ASK for a key it does not
  // have, and the limiter's script runs on the new one.
  const auto name = unique_name("migrating");
  const auto key = fmt::format("weir:{{{}}}:requests", name);
  const auto source = nodes.owner(key), target = (source + 1) % 3;
  const auto slot = rig::ask(nodes.node(0).port(), "cluster keyslot '" + key + "'");
  const int slot_number = std::atoi(slot.c_str());
  rig::ask(nodes.node(target).port(),
           fmt::format("cluster setslot {} importing {}", slot_number, nodes.id(source)));
  rig::ask(nodes.node(source).port(),
           fmt::format("cluster setslot {} migrating {}", slot_number, nodes.id(target)));
  int migrating_admitted = 0;
  run_coroutine([&](asio::any_io_executor ex) -> asio::awaitable<void> {
    weir::redis::client redis(ex, {.port = nodes.node(source).port()});
    weir::redis::rate_limiter<> shared(
        ex, redis, {.name = name, .requests = weir::limit{weir::per_hour(1), 3}});
    for (int k = 0; k < 5; ++k) {
      const bool ok = co_await shared.async_try_acquire({.requests = 1}, asio::use_awaitable);
      migrating_admitted += ok;
    }
    redis.close();
  });
  CHECK(migrating_admitted == 3);
  // Counted where it ran: the key is on the node the slot is moving to.
  const auto keys_on = [&](std::size_t n) {
    return std::atoi(
        rig::ask(nodes.node(n).port(), fmt::format("cluster countkeysinslot {}", slot_number))
            .c_str());
  };
  CHECK(keys_on(target) == 1);
  CHECK(keys_on(source) == 0);
}
