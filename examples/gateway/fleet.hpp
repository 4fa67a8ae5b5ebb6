// weir-gateway's fleet: gateways that share one Redis keep to one provider's limits together.
// Their routers share cooldowns, breaker openings and learned limits (weir::redis::fleet_state),
// and before every attempt a gateway takes a turn on the model's request limit in Redis
// (weir::redis::rate_limiter), so two gateways at a 600 rpm limit send 600 a minute between them,
// not 600 each.
//
//     weir::redis::client redis(io.get_executor(), gateway::redis_address("10.0.0.5:6379"));
//     gateway::join_fleet(config, io.get_executor(), redis, "prod");  // before the server
//
// A model's request limit is shared when the catalog (or --rpm) gives it; a limit found from the
// provider's headers is shared as the routers' advice. Token limits are each gateway's own.
// Part of the optional weir::redis target (links hiredis).
#pragma once

#include "gateway.hpp"

#include <weir/redis/fleet.hpp>
#include <weir/redis/rate_limiter.hpp>

#include <charconv>
#include <map>
#include <stdexcept>

namespace gateway {

// Where Redis is: "HOST:PORT", "HOST" (port 6379), "[::1]:6379" or "redis://HOST[:PORT][/]".
// Throws std::invalid_argument saying what is wrong.
inline weir::redis::client_options redis_address(std::string_view text) {
  weir::redis::client_options out;
  auto rest = text;
  if (rest.starts_with("redis://")) {
    rest.remove_prefix(8);
    if (rest.ends_with('/')) rest.remove_suffix(1);
  }
  if (rest.find_first_of("/@") != std::string_view::npos)
    throw std::invalid_argument(fmt::format(
        "'{}': give HOST:PORT or redis://HOST:PORT, with no database, user or password", text));
  auto colon = rest.rfind(':');
  if (rest.starts_with('[')) {
    const auto close = rest.find(']');
    if (close == std::string_view::npos)
      throw std::invalid_argument(fmt::format("'{}': an IPv6 address wants its ']'", text));
    colon = close + 1 < rest.size() && rest[close + 1] == ':' ? close + 1 : std::string_view::npos;
    out.host = std::string(rest.substr(1, close - 1));
  } else {
    out.host = std::string(rest.substr(0, colon));
  }
  if (colon != std::string_view::npos) {
    const auto port = rest.substr(colon + 1);
    const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), out.port);
    if (ec != std::errc() || end != port.data() + port.size() || out.port < 1 || out.port > 65535)
      throw std::invalid_argument(fmt::format("'{}': the port is a number from 1 to 65535", text));
  }
  if (out.host.empty()) throw std::invalid_argument(fmt::format("'{}': no host", text));
  return out;
}

namespace detail {

// The fleet's request limit of each catalog model that has one, by provider and model.
using shared_limits = std::map<std::pair<std::string, std::string>, weir::redis::rate_limiter<>>;

inline asio::awaitable<void> take_turn(std::shared_ptr<const shared_limits> limits,
                                       weir::routing::model_spec m, steady::time_point deadline) {
  const auto it = limits->find({m.provider, m.id});
  if (it == limits->end()) co_return;
  auto limiter = it->second;  // a copy shares the limiter's state
  const auto left = std::max(steady::duration::zero(), deadline - steady::now());
  auto [ec, waited] = co_await limiter.async_acquire(
      {.requests = 1}, std::chrono::duration_cast<std::chrono::nanoseconds>(left),
      asio::as_tuple(asio::use_awaitable));
  if (!ec) co_return;
  if (ec == asio::error::operation_aborted) throw boost::system::system_error(ec);
  // A local refusal: the router neither cools the model down nor counts it against the
  // provider; it tries another model, or answers that none has room before the deadline.
  throw weir::exception::refusal(
      weir::error::no_provider_available,
      fmt::format("the fleet's request limit of {} has no turn before the request's deadline",
                  m.id),
      waited);
}

}  // namespace detail

// Makes the gateway of `c` a member of fleet `name` (the prefix of its Redis keys: a provider
// account's label, never its key). Call it once the catalog is in `c`, before the server is
// built. While Redis cannot be reached, each gateway goes on at a quarter of each model's limit
// (weir::redis::when_unreachable::use_local), on its routers' own state.
inline void join_fleet(config& c, asio::any_io_executor ex, weir::redis::client redis,
                       const std::string& name) {
  c.fleet =
      std::make_shared<weir::redis::fleet_state>(redis, weir::redis::fleet_options{.name = name});
  auto limits = std::make_shared<detail::shared_limits>();
  for (const auto& m : c.catalog.models()) {
    if (m.requests_per_minute <= 0) continue;
    limits->emplace(std::pair{m.provider, m.id},
                    weir::redis::rate_limiter<>(
                        ex, redis,
                        {.name = fmt::format("gateway:{}:{}:{}", name, m.provider, m.id),
                         .requests = weir::limit::per_minute(m.requests_per_minute),
                         .fallback = weir::redis::when_unreachable::use_local}));
  }
  if (limits->empty()) return;
  c.wait_shared_turn = [limits = std::shared_ptr<const detail::shared_limits>(limits)](
                           const weir::routing::model_spec& m, steady::time_point deadline) {
    return detail::take_turn(limits, m, deadline);
  };
}

}  // namespace gateway
