// What a router shares with the other routers of its fleet (processes and hosts using one API
// key): cooldowns a server ordered, breakers that opened, and the request limits servers
// reported. One member's 429 then keeps every member away from that model, and a member that
// starts late paces at the limit the others already learned. weir::redis::fleet_state keeps it
// in Redis; a test may keep it in memory. Durations are from now, so members' clocks do not
// need to agree.
#pragma once

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace weir::routing {

// What the fleet knows at one moment.
struct fleet_news {
  struct cooling {
    std::string provider;
    std::string model;  // empty: every model of the provider
    std::chrono::nanoseconds left{0};
  };
  struct learned_limit {
    std::string provider;
    std::string model;
    double requests_per_second = 0;
  };
  std::vector<cooling> cooldowns;
  std::vector<learned_limit> limits;
};

class fleet {
 public:
  virtual ~fleet() = default;

  // `provider` (or only its `model`) takes no requests for `left`: a server's cooldown, an open
  // breaker's break. Fire and forget: a publication that cannot reach the fleet is dropped.
  virtual void publish_cooldown(std::string_view provider, std::string_view model,
                                std::chrono::nanoseconds left) = 0;
  // The request limit a server reported for a model.
  virtual void publish_limit(std::string_view provider, std::string_view model,
                             double requests_per_second) = 0;
  // What the fleet knows now, in one round trip; nullopt when it cannot be reached.
  virtual boost::asio::awaitable<std::optional<fleet_news>> read() = 0;
};

}  // namespace weir::routing
