// Server-sent events, as the LLM APIs stream them: an incremental parser (bytes in, events out,
// any split of the bytes), and the tallies that read tokens from OpenAI's chunks
// (`stream_options.include_usage` puts the usage in a last chunk) and Anthropic's typed events
// (`message_start` has the input, `message_delta` the output).
//
//     weir::http::sse::parser parser;
//     parser.feed(bytes);
//     while (auto e = parser.next()) handle(*e);
#pragma once

#include <weir/core/stage.hpp>
#include <weir/http/classify.hpp>
#include <weir/http/limits.hpp>
#include <weir/http/usage.hpp>

#include <cstddef>
#include <deque>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace weir::http::sse {

struct event {
  std::string type = "message";  // the `event:` field; "message" when there is none
  std::string data;              // the `data:` lines, joined by newlines
  std::string id;
};

// OpenAI's last event: `data: [DONE]`.
inline bool is_done(const event& e) noexcept { return e.data == "[DONE]"; }

// The event stream format of the HTML standard: lines end in LF, CRLF or CR; a blank line
// dispatches the event; `:` starts a comment; `field: value` with one optional space. An event
// with no data is not dispatched. A line or an event's data longer than the limits' is
// limit_exceeded, thrown from feed: what it holds stays bounded whatever the server sends.
class parser {
 public:
  parser() : parser(response_limits{}) {}
  explicit parser(const response_limits& limits)
      : max_line_(limits.max_sse_line_bytes), max_event_(limits.max_sse_event_bytes) {}

  void feed(std::string_view bytes) {
    for (const char ch : bytes) {
      if (after_cr_ && ch == '\n') {
        after_cr_ = false;
        continue;
      }
      after_cr_ = ch == '\r';
      if (ch == '\r' || ch == '\n') {
        line_ended();
        line_.clear();
      } else {
        if (line_.size() >= max_line_)
          detail::limit_passed("sse::parser", "a line", fmt::format("{} bytes", max_line_));
        line_ += ch;
      }
    }
  }

  // The next complete event, in order.
  std::optional<event> next() {
    if (ready_.empty()) return std::nullopt;
    std::optional<event> e(std::move(ready_.front()));
    ready_.pop_front();
    return e;
  }

 private:
  void line_ended() {
    if (line_.empty()) {
      if (has_data_) {
        if (!pending_.data.empty() && pending_.data.back() == '\n') pending_.data.pop_back();
        ready_.push_back(std::move(pending_));
      }
      pending_ = event{};
      has_data_ = false;
      return;
    }
    if (line_.front() == ':') return;  // a comment (a keep-alive)
    const auto colon = line_.find(':');
    const std::string_view field = std::string_view(line_).substr(0, colon);
    std::string_view value;
    if (colon != std::string::npos) {
      value = std::string_view(line_).substr(colon + 1);
      if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    }
    if (field == "data") {
      if (pending_.data.size() + value.size() + 1 > max_event_)
        detail::limit_passed("sse::parser", "an event's data", fmt::format("{} bytes", max_event_));
      pending_.data.append(value);
      pending_.data += '\n';
      has_data_ = true;
    } else if (field == "event") {
      pending_.type = value;
    } else if (field == "id") {
      pending_.id = value;
    }
  }

  std::size_t max_line_;
  std::size_t max_event_;
  std::string line_;
  bool after_cr_ = false;
  event pending_{};
  bool has_data_ = false;
  std::deque<event> ready_;
};

// The failure an error event inside a stream stands for, judged by its type (http::stream_error:
// rate limits, overloads, a spent quota or credit, a bad request, as their statuses would be),
// or nullptr for any other event. Reads OpenAI's `data: {"error": {...}}` (its chunks and every
// OpenAI-compatible server's) and Anthropic's `event: error`. For stream_options::in_band_error,
// so that an error is never handed over as content.
inline std::exception_ptr in_band_error(const event& e) {
  // `{"error":` at the start of the data, blanks allowed: an error object, not a chunk whose
  // text mentions one.
  const auto is_error_object = [](std::string_view data) {
    std::size_t at = 0;
    const auto skip_blanks = [&] {
      while (at < data.size() &&
             (data[at] == ' ' || data[at] == '\t' || data[at] == '\n' || data[at] == '\r'))
        ++at;
    };
    const auto take = [&](std::string_view token) {
      skip_blanks();
      if (!data.substr(at).starts_with(token)) return false;
      at += token.size();
      return true;
    };
    return take("{") && take("\"error\"") && take(":");
  };
  if (e.type != "error" && !is_error_object(e.data)) return nullptr;
  return std::make_exception_ptr(stream_error::from(e.data));
}

// Whether an event only opens the answer, carrying none of it: Anthropic's message_start and
// content_block_start (and a ping), OpenAI's first delta with its role and no content or tool
// call. For stream_options::opening, so that an error sent after them is still retried.
inline bool opens_answer(const event& e) {
  if (e.type == "message_start" || e.type == "content_block_start" || e.type == "ping") return true;
  if (e.type != "message" || detail::json_key(e.data, "role") == std::string_view::npos ||
      detail::json_key(e.data, "tool_calls") != std::string_view::npos)
    return false;
  bool carries = false;
  detail::for_each_json_value(
      e.data, "content", [&](std::string_view v) { return carries = !v.empty() && v != "null"; });
  return !carries;
}

// OpenAI's chunks (and every OpenAI-compatible server's): a chunk whose delta has content counts
// one output token (the API sends about one per chunk); a chunk with a usage object reports both.
inline void openai_tally(const event& e, stream_tally& tally) {
  if (is_done(e)) return;
  if (auto used = reported_usage(e.data)) {
    tally.report_input(*used);
    tally.reported_output_tokens = used->output_tokens;
    return;
  }
  auto at = detail::json_key(e.data, "content");
  if (at == std::string_view::npos) return;
  while (at < e.data.size() && e.data[at] == ' ') ++at;
  // A non-empty string ("" opens the stream, null closes it).
  if (at + 1 < e.data.size() && e.data[at] == '"' && e.data[at + 1] != '"')
    ++tally.counted_output_tokens;
}

// Anthropic's events: each text or JSON delta counts one output token; message_start reports
// the input (its cache reads and writes among it), message_delta the output so far (the last
// one, the total) and, in newer versions of the API, the input again.
inline void anthropic_tally(const event& e, stream_tally& tally) {
  if (e.type == "content_block_delta") {
    ++tally.counted_output_tokens;
  } else if (e.type == "message_start") {
    if (auto used = reported_usage(e.data)) tally.report_input(*used);
  } else if (e.type == "message_delta") {
    if (auto out = detail::json_token_count(e.data, "output_tokens"))
      tally.reported_output_tokens = out;
    if (auto used = reported_usage(e.data)) tally.report_input(*used);
  }
}

}  // namespace weir::http::sse
