// The keyed limiter's storage: one open-addressing table per shard, each entry a key and its
// limiter's GCRA state (TAT) in 40 bytes, so that a million live keys fit in well under 100 MB.
// Entries whose bucket is full again (TAT ≤ now) are dropped when a shard would grow: such an
// entry is indistinguishable from a key never seen, so dropping it changes no decision.
#pragma once

#include <weir/detail/gcra.hpp>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string_view>
#include <utility>

namespace weir::detail {

// A string of any length in 24 bytes: up to 22 characters inline, longer ones on the heap.
class compact_key {
 public:
  compact_key() noexcept { clear(); }
  explicit compact_key(std::string_view s) {
    if (s.size() <= inline_capacity) {
      std::memcpy(bytes_, s.data(), s.size());
      bytes_[inline_capacity] = static_cast<char>(s.size());
      bytes_[inline_capacity + 1] = 0;
    } else {
      auto* p = new char[s.size()];
      std::memcpy(p, s.data(), s.size());
      const std::uint64_t n = s.size();
      std::memcpy(bytes_, &p, sizeof p);
      std::memcpy(bytes_ + 8, &n, sizeof n);
      bytes_[inline_capacity + 1] = 1;
    }
  }
  compact_key(compact_key&& other) noexcept {
    std::memcpy(bytes_, other.bytes_, sizeof bytes_);
    other.clear();
  }
  compact_key& operator=(compact_key&& other) noexcept {
    if (this != &other) {
      release();
      std::memcpy(bytes_, other.bytes_, sizeof bytes_);
      other.clear();
    }
    return *this;
  }
  compact_key(const compact_key&) = delete;
  compact_key& operator=(const compact_key&) = delete;
  ~compact_key() { release(); }

  std::string_view view() const noexcept {
    if (!on_heap()) return {bytes_, static_cast<unsigned char>(bytes_[inline_capacity])};
    const char* p;
    std::uint64_t n;
    std::memcpy(&p, bytes_, sizeof p);
    std::memcpy(&n, bytes_ + 8, sizeof n);
    return {p, n};
  }
  // Heap bytes held besides the 24 inline ones.
  std::size_t heap_bytes() const noexcept { return on_heap() ? view().size() : 0; }

 private:
  static constexpr std::size_t inline_capacity = 22;
  bool on_heap() const noexcept { return bytes_[inline_capacity + 1] != 0; }
  void clear() noexcept {
    bytes_[inline_capacity] = 0;
    bytes_[inline_capacity + 1] = 0;
  }
  void release() noexcept {
    if (on_heap()) delete[] view().data();
  }

  char bytes_[24];
};

inline std::uint64_t key_hash(std::string_view key) noexcept {
  return std::hash<std::string_view>{}(key);
}

struct key_entry {
  compact_key key;
  std::uint32_t tag = 0;    // the hash's high half, never 0 in a used entry
  std::uint32_t shape = 0;  // which limit the key has (an index the owner keeps)
  nanos tat = 0;
};
static_assert(sizeof(key_entry) == 40);

// One shard's table: linear probing over a power-of-two array. Not synchronised; the owner
// locks.
class key_table {
 public:
  static constexpr std::size_t min_capacity = 16;

  std::size_t size() const noexcept { return count_; }
  std::size_t capacity() const noexcept { return mask_ ? mask_ + 1 : 0; }
  std::size_t heap_bytes() const noexcept { return heap_bytes_ + capacity() * sizeof(key_entry); }

  static std::uint32_t tag_of(std::uint64_t hash) noexcept {
    return static_cast<std::uint32_t>(hash >> 32) | 1u;
  }

  key_entry* find(std::string_view key, std::uint64_t hash) noexcept {
    if (!entries_) return nullptr;
    const auto tag = tag_of(hash);
    for (std::size_t i = hash & mask_;; i = (i + 1) & mask_) {
      auto& e = entries_[i];
      if (e.tag == 0) return nullptr;
      if (e.tag == tag && e.key.view() == key) return &e;
    }
  }

  // Adds a key known to be absent. When the table is 7/8 full it first drops the entries whose
  // TAT is at or before `now` (full buckets), and grows only if that freed too little.
  key_entry& insert(std::string_view key, std::uint64_t hash, std::uint32_t shape, nanos tat,
                    nanos now) {
    if ((count_ + 1) * 8 > capacity() * 7) rebuild(now);
    auto& e = slot_for(hash);
    e.key = compact_key(key);
    e.tag = tag_of(hash);
    e.shape = shape;
    e.tat = tat;
    ++count_;
    heap_bytes_ += e.key.heap_bytes();
    return e;
  }

  // Drops every entry whose bucket is full at `now`; shrinks the array when few are left.
  void evict_idle(nanos now) { rebuild(now); }

 private:
  key_entry& slot_for(std::uint64_t hash) noexcept {
    for (std::size_t i = hash & mask_;; i = (i + 1) & mask_)
      if (entries_[i].tag == 0) return entries_[i];
  }

  void rebuild(nanos now) {
    std::size_t live = 0;
    for (std::size_t i = 0; i < capacity(); ++i)
      if (entries_[i].tag != 0 && entries_[i].tat > now) ++live;
    // Grow when eviction left the table over 3/4 full, so that a table of live keys is rebuilt
    // once per doubling and one mostly idle is rebuilt at most once per capacity/8 insertions.
    std::size_t cap = std::max(capacity(), min_capacity);
    if ((live + 1) * 4 > cap * 3) cap *= 2;
    while (cap > min_capacity && live * 8 < cap) cap /= 2;
    auto old = std::move(entries_);
    const auto old_capacity = capacity();
    entries_ = std::make_unique<key_entry[]>(cap);
    mask_ = cap - 1;
    count_ = 0;
    heap_bytes_ = 0;
    for (std::size_t i = 0; i < old_capacity; ++i) {
      auto& e = old[i];
      if (e.tag == 0 || e.tat <= now) continue;
      auto& to = slot_for(key_hash(e.key.view()));
      to = std::move(e);
      ++count_;
      heap_bytes_ += to.key.heap_bytes();
    }
  }

  std::unique_ptr<key_entry[]> entries_;
  std::size_t mask_ = 0;
  std::size_t count_ = 0;
  std::size_t heap_bytes_ = 0;
};

}  // namespace weir::detail
