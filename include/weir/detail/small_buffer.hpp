#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <span>
#include <vector>

namespace weir::detail {

// N elements inline, more on the heap: selection among a usual catalog allocates nothing.
template <class T, std::size_t N>
class small_buffer {
 public:
  small_buffer(std::size_t n, T value) {
    if (n <= N) {
      std::fill_n(inline_.begin(), n, value);
      view_ = {inline_.data(), n};
    } else {
      heap_.assign(n, value);
      view_ = heap_;
    }
  }
  small_buffer(const small_buffer&) = delete;
  small_buffer& operator=(const small_buffer&) = delete;

  std::span<T> span() const noexcept { return view_; }

 private:
  std::array<T, N> inline_;
  std::vector<T> heap_;
  std::span<T> view_;
};

}  // namespace weir::detail
