// An intrusive doubly linked FIFO of waiters: no allocation, O(1) removal from the middle when a
// waiter is cancelled. `Waiter` has `prev`, `next` (pointers to Waiter or a base) and `linked`.
#pragma once

namespace weir::detail {

template <class Waiter>
class waiter_list {
 public:
  bool empty() const noexcept { return head_ == nullptr; }
  Waiter* front() const noexcept { return head_; }
  Waiter* back() const noexcept { return tail_; }

  void push_back(Waiter& w) noexcept {
    w.prev = tail_;
    w.next = nullptr;
    (tail_ ? tail_->next : head_) = &w;
    tail_ = &w;
    w.linked = true;
  }

  void erase(Waiter& w) noexcept {
    (w.prev ? w.prev->next : head_) = w.next;
    (w.next ? w.next->prev : tail_) = w.prev;
    w.prev = w.next = nullptr;
    w.linked = false;
  }

 private:
  Waiter* head_ = nullptr;
  Waiter* tail_ = nullptr;
};

}  // namespace weir::detail
