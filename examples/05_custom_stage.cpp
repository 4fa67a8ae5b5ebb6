// A policy of your own in a pipeline: any class with a `slot`, `try_enter` and `exit` is a stage
// (weir/core/stage.hpp has the whole protocol). This one is a switch an operator can throw to stop
// calls, and a gauge of the calls in flight that every way out of the pipeline brings back down.
#include <weir/composition/pipeline.hpp>
#include <weir/failure/retry.hpp>

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

namespace asio = boost::asio;
using namespace std::chrono_literals;

class switch_and_gauge {
 public:
  struct slot {
    bool counted = false;
  };
  // It never judges a value, so a successful call keeps the pipeline's fast path.
  static constexpr bool values_succeed = true;

  // Refused calls were never sent: exception::refusal says so to the stages outside.
  bool try_enter(slot& s, weir::stage_context<>&) {
    if (state_->stopped) throw weir::exception::refusal(weir::error::shut_down, "calls are off");
    ++state_->in_flight;
    s.counted = true;
    return true;
  }
  template <class Outcome>
  weir::stage_action exit(slot& s, weir::stage_context<>&, const Outcome&) {
    leave(s);
    return {};
  }
  // Cancelled while inside, or its coroutine destroyed: no outcome, but still a way out.
  void abandon(slot& s) { leave(s); }

  void stop() { state_->stopped = true; }
  int in_flight() const { return state_->in_flight; }

 private:
  void leave(slot& s) {
    if (std::exchange(s.counted, false)) --state_->in_flight;
  }
  struct state {
    std::atomic<bool> stopped{false};
    std::atomic<int> in_flight{0};
  };
  std::shared_ptr<state> state_ = std::make_shared<state>();  // copies share it, as weir's do
};

int calls = 0;
asio::awaitable<std::string> flaky_call() {
  if (++calls == 1) throw std::runtime_error("connection reset");  // one transient failure
  co_return "an answer";
}

int main() {
  asio::io_context io;
  switch_and_gauge guard;
  // The retry is outside the guard: each attempt enters it again.
  auto guarded = weir::pipeline(weir::retry<>({.backoff = weir::backoff::constant(10ms)}), guard);

  std::string first, second;
  asio::co_spawn(io, guarded(flaky_call), [&](std::exception_ptr e, std::string answer) {
    first = e ? "failed" : answer;
    guard.stop();  // the operator throws the switch
    asio::co_spawn(io, guarded(flaky_call), [&](std::exception_ptr e, std::string) {
      try {
        if (e) std::rethrow_exception(e);
      } catch (const weir::exception& refused) {
        second = refused.what();
      }
    });
  });
  io.run();

  fmt::print("first call: {} after {} attempts\nsecond call: {}\nin flight: {}\n", first, calls,
             second, guard.in_flight());
  return first == "an answer" && calls == 2 && !second.empty() && guard.in_flight() == 0 ? 0 : 1;
}
