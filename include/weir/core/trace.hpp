// W3C Trace Context (level 1): a call may carry the caller's trace, and each attempt it makes is
// a span of its own in that trace. Every attempt's request carries a `traceparent` header with
// the caller's trace id and flags and a fresh span id as its parent-id (a retry or a hedge gets
// another), and every event of the call carries the trace id and the attempt's span id, so the
// provider's or a gateway's logs and the caller's own traces join weir's events. A call without
// a trace context sends no header.
//
//     weir::call_context ctx{.operation = "chat"};
//     if (auto given = weir::trace_context::parse(incoming_traceparent, incoming_tracestate))
//       ctx.trace = *given;
//     auto reply = co_await guarded(ctx, [&](const weir::trace_context& attempt) {
//       return openai.complete(ask, 60s, weir::http::trace_headers(attempt));
//     });
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>

namespace weir {

using trace_id = std::array<std::uint8_t, 16>;
using span_id = std::array<std::uint8_t, 8>;

namespace detail {
// Whether every byte of an id is zero (the spec's invalid id). An OR of the bytes, which the
// compiler folds into a load or two: operator== on std::array calls memcmp, and this is asked on
// every call through a policy.
template <std::size_t N>
constexpr bool all_zero(const std::array<std::uint8_t, N>& id) noexcept {
  std::uint8_t any = 0;
  for (const auto b : id) any |= b;
  return any == 0;
}
}  // namespace detail

// What an event carries to be joined to a trace: the call's trace id and the span id of the
// attempt it belongs to (the parent-id that attempt's traceparent sent). All zero when the call
// has no trace context; the span id alone is zero for an event of the call as a whole.
struct trace_ids {
  weir::trace_id trace{};
  weir::span_id span{};

  explicit operator bool() const noexcept { return !detail::all_zero(trace); }
  friend bool operator==(const trace_ids&, const trace_ids&) = default;
};

namespace detail {
inline constexpr char hex_digits[] = "0123456789abcdef";

template <std::size_t N>
void write_hex(const std::array<std::uint8_t, N>& bytes, char* out) noexcept {
  for (const auto b : bytes) {
    *out++ = hex_digits[b >> 4];
    *out++ = hex_digits[b & 0xf];
  }
}
template <std::size_t N>
std::string to_hex(const std::array<std::uint8_t, N>& bytes) {
  std::string out(2 * N, '0');
  write_hex(bytes, out.data());
  return out;
}

// The value of a lowercase hex digit, or -1 (uppercase is not allowed by the spec).
constexpr int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}
// `text` (2 N lowercase hex digits) into `out`; false for anything else.
template <std::size_t N>
constexpr bool read_hex(std::string_view text, std::array<std::uint8_t, N>& out) noexcept {
  if (text.size() != 2 * N) return false;
  for (std::size_t i = 0; i < N; ++i) {
    const int high = hex_value(text[2 * i]), low = hex_value(text[2 * i + 1]);
    if (high < 0 || low < 0) return false;
    out[i] = static_cast<std::uint8_t>(high << 4 | low);
  }
  return true;
}

// A tracestate weir passes on: printable ASCII (nothing that could split a header) and at most
// the 512 characters every vendor is asked to propagate. Anything else is not passed on.
constexpr bool passable_tracestate(std::string_view s) noexcept {
  if (s.size() > 512) return false;
  for (const char c : s)
    if (c < 0x20 || c > 0x7e) return false;
  return true;
}

// splitmix64 over a per-thread state seeded once from std::random_device: span ids need to be
// unique within a trace, not secret, and a lock or a syscall per attempt would cost more than the
// attempt's bookkeeping.
inline std::uint64_t next_random() noexcept {
  thread_local std::uint64_t state = [] {
    std::uint64_t seed = 0;
    try {
      std::random_device device;
      seed = (std::uint64_t{device()} << 32) ^ device();
    } catch (...) {  // no entropy source: the thread's address still differs per thread
    }
    return seed ^ reinterpret_cast<std::uintptr_t>(&seed);
  }();
  std::uint64_t z = (state += 0x9e3779b97f4a7c15);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9;
  z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
  return z ^ (z >> 31);
}
}  // namespace detail

// A random span id, never all zero. Thread-safe; no lock, no allocation.
inline span_id new_span_id() noexcept {
  std::uint64_t r = 0;
  while (r == 0) r = detail::next_random();
  span_id id;
  for (std::size_t i = 0; i < id.size(); ++i) id[i] = static_cast<std::uint8_t>(r >> (8 * i));
  return id;
}

// A trace context as the W3C spells it: the trace, the span that is the parent of what is sent
// with it, the trace flags, and the vendors' tracestate. The default one (all-zero ids) is no
// context: nothing is sent.
struct trace_context {
  static constexpr std::uint8_t sampled_flag = 0x01;

  weir::trace_id trace_id{};
  weir::span_id parent_id{};
  std::uint8_t flags = 0;  // level 1 knows the sampled bit only; the others are sent as zero
  // Sent unchanged beside traceparent when not empty (and passable: printable ASCII, at most 512
  // characters). It must outlive the call, as call_context::operation does.
  std::string_view tracestate{};

  // Both ids set (the spec holds an all-zero id invalid).
  bool valid() const noexcept {
    return !detail::all_zero(trace_id) && !detail::all_zero(parent_id);
  }
  explicit operator bool() const noexcept { return valid(); }
  bool sampled() const noexcept { return (flags & sampled_flag) != 0; }

  // The context of a span of this trace: same trace, flags and tracestate, `span` its parent-id.
  trace_context child(span_id span) const noexcept {
    trace_context c = *this;
    c.parent_id = span;
    return c;
  }
  // The ids an event of that span carries.
  trace_ids ids() const noexcept { return {trace_id, parent_id}; }

  // Reads a traceparent header's value (and the tracestate that came with it): nullopt when it
  // is not a valid one, which per the spec means restarting the trace — never a partial
  // context. Version 00 is exactly `00-<32 hex>-<16 hex>-<2 hex>`, lowercase; a later version
  // is read for those fields if a dash or the end follows them; version ff, an all-zero id, a
  // wrong length or an uppercase digit is invalid. A tracestate that is not passable is dropped.
  static std::optional<trace_context> parse(std::string_view traceparent,
                                            std::string_view tracestate = {}) noexcept {
    // Optional whitespace around a header's value is not part of it.
    const auto blank = [](char c) { return c == ' ' || c == '\t'; };
    while (!traceparent.empty() && blank(traceparent.front())) traceparent.remove_prefix(1);
    while (!traceparent.empty() && blank(traceparent.back())) traceparent.remove_suffix(1);
    constexpr std::size_t length = 55;  // of version 00
    if (traceparent.size() < length) return std::nullopt;
    std::array<std::uint8_t, 1> version{}, flags{};
    trace_context c;
    if (!detail::read_hex(traceparent.substr(0, 2), version) || version[0] == 0xff ||
        traceparent[2] != '-' || !detail::read_hex(traceparent.substr(3, 32), c.trace_id) ||
        traceparent[35] != '-' || !detail::read_hex(traceparent.substr(36, 16), c.parent_id) ||
        traceparent[52] != '-' || !detail::read_hex(traceparent.substr(53, 2), flags))
      return std::nullopt;
    // Version 00 has nothing after its flags; a later one may add fields, after a dash.
    if (traceparent.size() > length && (version[0] == 0 || traceparent[length] != '-'))
      return std::nullopt;
    if (!c.valid()) return std::nullopt;
    c.flags = flags[0] & sampled_flag;
    if (detail::passable_tracestate(tracestate)) c.tracestate = tracestate;
    return c;
  }

  // The traceparent header's value, version 00 (the one weir speaks, whatever it read):
  // "00-<trace id>-<parent id>-<flags>". Empty for no context.
  std::string traceparent() const {
    if (!valid()) return {};
    std::string out = "00-";
    out.resize(55, '-');
    detail::write_hex(trace_id, out.data() + 3);
    detail::write_hex(parent_id, out.data() + 36);
    const std::array<std::uint8_t, 1> sent{static_cast<std::uint8_t>(flags & sampled_flag)};
    detail::write_hex(sent, out.data() + 53);
    return out;
  }
};

}  // namespace weir
