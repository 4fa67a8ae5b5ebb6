// A router fleet's shared state in Redis (see weir/routing/fleet.hpp):
//
//     auto shared = std::make_shared<weir::redis::fleet_state>(redis, {.name = "agents-prod"});
//     router_options.fleet = shared;
//
// Two hashes per fleet: "weir:fleet:{name}:cooling" (provider and model -> the end, on Redis's
// clock) and "weir:fleet:{name}:limits" (provider and model -> requests per second). Both expire
// by themselves: the first when its last cooldown ends, the second `limit_ttl` after the last
// limit was told. Reading is one script run, which also drops the cooldowns that have ended.
//
// Part of the optional weir::redis target (links hiredis).
#pragma once

#include <weir/redis/client.hpp>
#include <weir/routing/fleet.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weir::redis {

struct fleet_options {
  // Names the fleet (a provider account's label, never its key).
  std::string name = "default";
  // How long a learned limit stays after it was last told (servers change their limits rarely;
  // a member that hears one paces by it until its own server says otherwise).
  std::chrono::milliseconds limit_ttl = std::chrono::minutes(10);
};

namespace detail {

// KEYS: cooling hash. ARGV: field, µs from now. The end only ever moves later.
inline constexpr const char* cool_script = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ends = now + tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or 0)
if ends > old then redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', ends)) end
local keep = math.ceil((ends - now) / 1000) + 1
if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
return 1
)lua";

// KEYS: cooling hash, limits hash. Returns {field, µs left, ...} for the cooldowns under way, then
// "limits", then {field, per second, ...}.
inline constexpr const char* read_script = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local cooling = redis.call('HGETALL', KEYS[1])
for i = 1, #cooling, 2 do
  local left = tonumber(cooling[i + 1]) - now
  if left > 0 then
    out[#out + 1] = cooling[i]
    out[#out + 1] = string.format('%.0f', left)
  else
    redis.call('HDEL', KEYS[1], cooling[i])
  end
end
out[#out + 1] = 'limits'
local limits = redis.call('HGETALL', KEYS[2])
for i = 1, #limits do out[#out + 1] = limits[i] end
return out
)lua";

// A hash field for a provider's model: the two joined by a unit separator, which names do not
// contain.
inline std::string fleet_field(std::string_view provider, std::string_view model) {
  return fmt::format("{}\x1f{}", provider, model);
}
inline std::pair<std::string, std::string> fleet_names(std::string_view field) {
  const auto cut = field.find('\x1f');
  if (cut == std::string_view::npos) return {std::string(field), {}};
  return {std::string(field.substr(0, cut)), std::string(field.substr(cut + 1))};
}

}  // namespace detail

// Copies of the client share its connection; a fleet_state may serve many routers.
class fleet_state final : public routing::fleet {
 public:
  fleet_state(client redis, fleet_options options)
      : redis_(std::move(redis)),
        options_(std::move(options)),
        cooling_key_(fmt::format("weir:fleet:{{{}}}:cooling", options_.name)),
        limits_key_(fmt::format("weir:fleet:{{{}}}:limits", options_.name)) {}

  void publish_cooldown(std::string_view provider, std::string_view model,
                        std::chrono::nanoseconds left) override {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(left).count();
    if (us <= 0) return;
    send({"EVAL", detail::cool_script, "1", cooling_key_, detail::fleet_field(provider, model),
          std::to_string(us)});
  }

  void publish_limit(std::string_view provider, std::string_view model,
                     double requests_per_second) override {
    const auto field = detail::fleet_field(provider, model);
    send({"HSET", limits_key_, field, fmt::format("{:.6f}", requests_per_second)});
    send({"PEXPIRE", limits_key_, std::to_string(options_.limit_ttl.count())});
  }

  boost::asio::awaitable<std::optional<routing::fleet_news>> read() override {
    std::vector<std::string> words{"EVAL", detail::read_script, "2", cooling_key_, limits_key_};
    auto [ec, r] = co_await redis_.async_command(std::move(words),
                                                 boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec || r.type != reply::kind::array) co_return std::nullopt;
    routing::fleet_news news;
    bool limits = false;
    for (std::size_t i = 0; i < r.elements.size(); ++i) {
      const auto& field = r.elements[i].text;
      if (!limits && field == "limits") {
        limits = true;
        continue;
      }
      if (i + 1 >= r.elements.size()) break;
      const auto& value = r.elements[++i].text;
      auto [provider, model] = detail::fleet_names(field);
      if (limits)
        news.limits.push_back({std::move(provider), std::move(model), std::atof(value.c_str())});
      else
        news.cooldowns.push_back({std::move(provider), std::move(model),
                                  std::chrono::microseconds(std::atoll(value.c_str()))});
    }
    co_return news;
  }

  const fleet_options& options() const noexcept { return options_; }

 private:
  // Fire and forget, on the client's own ordering: a publication Redis cannot take is dropped
  // (the fleet's state is advice; each member still learns for itself).
  void send(std::vector<std::string> words) {
    redis_.async_command(std::move(words), [](error_code, const reply&) {});
  }

  client redis_;
  fleet_options options_;
  std::string cooling_key_, limits_key_;
};

}  // namespace weir::redis
