// Where each session's prompt is likely cached: per session, the models its requests went to,
// until when each model's cache of it lives, and the input tokens its last request there sent
// (the prefix the next request resends). The router's memory for cache affinity.
// Thread-safe: one mutex, held for a lookup or an update. Sessions whose every cache has expired
// are dropped when the table has doubled since it last swept, so it stays bounded by the
// sessions active within a cache's lifetime.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace weir::detail {

template <class Clock>
class session_caches {
 public:
  using time_point = typename Clock::time_point;

  // Session's request to `model` ended at `now` having sent `prefix_tokens` of input; the
  // provider keeps its cache `ttl` after its last use.
  void note(std::string_view session, std::size_t model, std::uint64_t prefix_tokens,
            time_point now, typename Clock::duration ttl) {
    std::lock_guard lock(mutex_);
    auto it = sessions_.find(session);
    if (it == sessions_.end()) {
      if (sessions_.size() >= sweep_at_) sweep(now);
      it = sessions_.emplace(std::string(session), std::vector<warm>{}).first;
    }
    auto& models = it->second;
    std::erase_if(models, [&](const warm& w) { return w.until <= now || w.model == model; });
    models.push_back({model, now + ttl, prefix_tokens});
  }

  // Per model, the tokens of `session`'s prefix its cache holds at `now` (0: cold); false when
  // none is warm.
  bool read(std::string_view session, time_point now, std::span<std::uint64_t> cached) const {
    std::lock_guard lock(mutex_);
    const auto it = sessions_.find(session);
    if (it == sessions_.end()) return false;
    bool any = false;
    for (const auto& w : it->second)
      if (w.until > now && w.model < cached.size()) {
        cached[w.model] = w.prefix_tokens;
        any = true;
      }
    return any;
  }

  std::size_t sessions() const {
    std::lock_guard lock(mutex_);
    return sessions_.size();
  }

 private:
  struct warm {
    std::size_t model;
    time_point until;
    std::uint64_t prefix_tokens;
  };
  struct hash : std::hash<std::string_view> {
    using is_transparent = void;
  };

  void sweep(time_point now) {
    std::erase_if(sessions_, [&](const auto& s) {
      return std::all_of(s.second.begin(), s.second.end(),
                         [&](const warm& w) { return w.until <= now; });
    });
    sweep_at_ = std::max(min_sweep, 2 * sessions_.size());
  }

  static constexpr std::size_t min_sweep = 1024;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::vector<warm>, hash, std::equal_to<>> sessions_;
  std::size_t sweep_at_ = min_sweep;
};

}  // namespace weir::detail
