// Reads a catalog from JSON, with errors that name the field and the line.
//
//     {
//       "providers": [
//         {"name": "openai", "default_cooldown_seconds": 2, "cooldown_scope": "model",
//          "gen_ai_name": "openai",
//          "breaker": {"consecutive_failures": 5, "break_seconds": 30},
//          "cache": {"read_factor": 0.5, "write_factor": 1, "reads_count_toward_limits": true,
//                    "ttl_seconds": 300}}
//       ],
//       "models": [
//         {"provider": "openai", "id": "gpt-4o-mini", "input_price": 0.15, "output_price": 0.6,
//          "cached_input_price": 0.075, "cache_write_price": 0.15,
//          "cache_reads_count_toward_limits": true,
//          "capability": 7, "context_window": 128000,
//          "requests_per_minute": 500, "tokens_per_minute": 200000}
//       ]
//     }
//
// A provider's "cache" and a model's cache fields are optional: what they leave out is the
// provider's documented rule (routing::documented_cache_rules).
//
// Uses Boost.JSON's parser, which is compiled once per program: include <boost/json/src.hpp> in
// exactly one of your source files (or link Boost::json).
#pragma once

#include <weir/routing/catalog.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <boost/json/basic_parser_impl.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weir::routing {

// A catalog file that could not be read: the field (e.g. "models[2].input_price") and the
// 1-based line it is on (0 when the file itself could not be opened).
class catalog_error : public weir::exception {
 public:
  catalog_error(std::string field, std::size_t line, const std::string& problem)
      : weir::exception(error::invalid_argument,
                        fmt::format("catalog line {}: {}: {}", line, field, problem)),
        field_(std::move(field)),
        line_(line) {}

  const std::string& field() const noexcept { return field_; }
  std::size_t line() const noexcept { return line_; }

 private:
  std::string field_;
  std::size_t line_;
};

}  // namespace weir::routing

namespace weir::detail::json_catalog {

using namespace weir::routing;

struct member;

// A JSON value that remembers the line it started on.
struct node {
  enum class kind { null, boolean, number, string, array, object } type = kind::null;
  std::size_t line = 0;
  bool boolean = false;
  double number = 0;
  bool integral = false;  // written without a fraction or exponent
  std::string text;
  std::vector<node> items;
  // Its own type, not std::pair<std::string, node>: clang 14 rejects that pair's instantiation
  // while node is still incomplete.
  std::vector<member> members;
};

// One key of an object and its value.
struct member {
  std::string key;
  node value;
};

// Builds nodes from the parser's events. The input is fed one line at a time, so the line being
// fed is the line of every event it triggers.
struct builder {
  static constexpr std::size_t max_array_size = static_cast<std::size_t>(-1);
  static constexpr std::size_t max_object_size = static_cast<std::size_t>(-1);
  static constexpr std::size_t max_string_size = static_cast<std::size_t>(-1);
  static constexpr std::size_t max_key_size = static_cast<std::size_t>(-1);

  using ec_t = boost::json::error_code;
  using sv = boost::json::string_view;

  std::size_t line = 1;
  std::vector<node> open;  // containers being filled, innermost last
  std::vector<std::string> keys;
  std::string partial;
  std::optional<node> root;

  void attach(node n) {
    if (open.empty()) {
      root = std::move(n);
    } else if (open.back().type == node::kind::array) {
      open.back().items.push_back(std::move(n));
    } else {
      open.back().members.push_back(member{std::move(keys.back()), std::move(n)});
    }
  }
  node scalar(node::kind k) const {
    node n;
    n.type = k;
    n.line = line;
    return n;
  }
  bool begin(node::kind k) {
    open.push_back(scalar(k));
    if (k == node::kind::object) keys.emplace_back();
    return true;
  }
  bool end() {
    node n = std::move(open.back());
    open.pop_back();
    if (n.type == node::kind::object) keys.pop_back();
    attach(std::move(n));
    return true;
  }
  bool number(double v, bool integral) {
    node n = scalar(node::kind::number);
    n.number = v;
    n.integral = integral;
    attach(std::move(n));
    return true;
  }

  bool on_document_begin(ec_t&) { return true; }
  bool on_document_end(ec_t&) { return true; }
  bool on_array_begin(ec_t&) { return begin(node::kind::array); }
  bool on_array_end(std::size_t, ec_t&) { return end(); }
  bool on_object_begin(ec_t&) { return begin(node::kind::object); }
  bool on_object_end(std::size_t, ec_t&) { return end(); }
  bool on_string_part(sv s, std::size_t, ec_t&) {
    partial.append(s.data(), s.size());
    return true;
  }
  bool on_string(sv s, std::size_t, ec_t&) {
    node n = scalar(node::kind::string);
    n.text = std::move(partial.append(s.data(), s.size()));
    partial.clear();
    attach(std::move(n));
    return true;
  }
  bool on_key_part(sv s, std::size_t, ec_t&) {
    partial.append(s.data(), s.size());
    return true;
  }
  bool on_key(sv s, std::size_t, ec_t&) {
    keys.back() = std::move(partial.append(s.data(), s.size()));
    partial.clear();
    return true;
  }
  bool on_number_part(sv, ec_t&) { return true; }
  bool on_int64(std::int64_t v, sv, ec_t&) { return number(static_cast<double>(v), true); }
  bool on_uint64(std::uint64_t v, sv, ec_t&) { return number(static_cast<double>(v), true); }
  bool on_double(double v, sv, ec_t&) { return number(v, false); }
  bool on_bool(bool b, ec_t&) {
    node n = scalar(node::kind::boolean);
    n.boolean = b;
    attach(std::move(n));
    return true;
  }
  bool on_null(ec_t&) {
    attach(scalar(node::kind::null));
    return true;
  }
  bool on_comment_part(sv, ec_t&) { return true; }
  bool on_comment(sv, ec_t&) { return true; }
};

inline node parse(std::string_view text) {
  boost::json::basic_parser<builder> parser(boost::json::parse_options{});
  auto& b = parser.handler();
  std::size_t start = 0;
  for (;;) {
    auto newline = text.find('\n', start);
    const bool last = newline == std::string_view::npos;
    const auto stop = last ? text.size() : newline + 1;
    boost::json::error_code ec;
    parser.write_some(!last, text.data() + start, stop - start, ec);
    if (ec) throw catalog_error("(syntax)", b.line, ec.message());
    if (last) break;
    start = stop;
    ++b.line;
  }
  return std::move(*b.root);
}

// Reads the fields of one object, refusing unknown ones (a typo must not pass silently).
class reader {
 public:
  reader(const node& n, std::string path) : node_(n), path_(std::move(path)) {
    if (n.type != node::kind::object) throw catalog_error(path_, n.line, "expected an object");
  }

  const node* find(std::string_view key) {
    for (const auto& [k, v] : node_.members)
      if (k == key) {
        used_.push_back(k);
        return &v;
      }
    return nullptr;
  }

  std::string field(std::string_view key) const { return fmt::format("{}.{}", path_, key); }

  std::string string(std::string_view key, bool required) {
    const node* v = find(key);
    if (!v) {
      if (required) throw catalog_error(field(key), node_.line, "missing");
      return {};
    }
    if (v->type != node::kind::string || v->text.empty())
      throw catalog_error(field(key), v->line, "expected a non-empty string");
    return v->text;
  }

  std::optional<double> number(std::string_view key, bool required, double max = 1e300) {
    const node* v = find(key);
    if (!v) {
      if (required) throw catalog_error(field(key), node_.line, "missing");
      return std::nullopt;
    }
    if (v->type != node::kind::number || v->number < 0 || v->number > max)
      throw catalog_error(field(key), v->line, fmt::format("expected a number in [0, {}]", max));
    return v->number;
  }

  std::optional<bool> boolean(std::string_view key) {
    const node* v = find(key);
    if (!v) return std::nullopt;
    if (v->type != node::kind::boolean)
      throw catalog_error(field(key), v->line, "expected true or false");
    return v->boolean;
  }

  std::optional<std::uint64_t> count(std::string_view key, std::uint64_t max) {
    const node* v = find(key);
    if (!v) return std::nullopt;
    if (v->type != node::kind::number || !v->integral || v->number < 0 ||
        v->number > static_cast<double>(max))
      throw catalog_error(field(key), v->line, fmt::format("expected an integer in [0, {}]", max));
    return static_cast<std::uint64_t>(v->number);
  }

  // Call after reading every known field.
  void no_unknown_fields() const {
    for (const auto& [k, v] : node_.members) {
      bool known = false;
      for (auto u : used_) known = known || u == k;
      if (!known)
        throw catalog_error(field(k), v.line,
                            fmt::format("unknown field (valid here: {})", fmt::join(used_, ", ")));
    }
  }

  const node& self() const noexcept { return node_; }

 private:
  const node& node_;
  std::string path_;
  std::vector<std::string_view> used_;
};

inline std::chrono::nanoseconds seconds(double s) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(s));
}

constexpr double max_seconds = 86400.0 * 365;

inline provider_spec read_provider(const node& n, const std::string& path) {
  reader r(n, path);
  provider_spec p;
  p.name = r.string("name", true);
  p.gen_ai_name = r.string("gen_ai_name", false);
  if (auto s = r.number("default_cooldown_seconds", false, max_seconds))
    p.default_cooldown = seconds(*s);
  if (const auto scope = r.string("cooldown_scope", false); scope == "provider")
    p.cooldown_scope = cooldown_scope::provider;
  else if (!scope.empty() && scope != "model")
    throw catalog_error(r.field("cooldown_scope"), r.find("cooldown_scope")->line,
                        "expected \"model\" or \"provider\"");
  if (const node* b = r.find("breaker")) {
    reader br(*b, r.field("breaker"));
    constexpr std::uint64_t max_count = 1'000'000;
    if (auto c = br.count("consecutive_failures", max_count))
      p.breaker.consecutive_failures = static_cast<std::uint32_t>(*c);
    if (auto s = br.number("break_seconds", false, max_seconds))
      p.breaker.break_duration = seconds(*s);
    if (auto s = br.number("max_break_seconds", false, max_seconds))
      p.breaker.max_break_duration = seconds(*s);
    if (auto g = br.number("break_growth", false, 1000)) p.breaker.break_growth = *g;
    if (auto c = br.count("half_open_permits", max_count))
      p.breaker.half_open_permits = static_cast<std::uint32_t>(*c);
    if (auto c = br.count("successes_to_close", max_count))
      p.breaker.successes_to_close = static_cast<std::uint32_t>(*c);
    if (auto s = br.number("probe_timeout_seconds", false, max_seconds))
      p.breaker.probe_timeout = seconds(*s);
    br.no_unknown_fields();
    // The breaker checks these itself, but only once the router builds it: name them here.
    for (auto [name, value] : {std::pair{"consecutive_failures", p.breaker.consecutive_failures},
                               std::pair{"half_open_permits", p.breaker.half_open_permits},
                               std::pair{"successes_to_close", p.breaker.successes_to_close}})
      if (value == 0) throw catalog_error(br.field(name), b->line, "must be at least 1");
    if (p.breaker.successes_to_close > p.breaker.half_open_permits)
      throw catalog_error(br.field("successes_to_close"), b->line,
                          "must not exceed half_open_permits");
    if (p.breaker.probe_timeout.count() <= 0)
      throw catalog_error(br.field("probe_timeout_seconds"), b->line, "must be positive");
  }
  if (const node* c = r.find("cache")) {
    // What the object leaves out is the provider's documented rule.
    reader cr(*c, r.field("cache"));
    auto rules = documented_cache_rules(p.name);
    if (auto f = cr.number("read_factor", false, 100)) rules.read_factor = *f;
    if (auto f = cr.number("write_factor", false, 100)) rules.write_factor = *f;
    if (auto counts = cr.boolean("reads_count_toward_limits"))
      rules.reads_count_toward_limits = *counts;
    if (auto s = cr.number("ttl_seconds", false, max_seconds)) rules.ttl = seconds(*s);
    cr.no_unknown_fields();
    p.cache = rules;
  }
  r.no_unknown_fields();
  return p;
}

inline model_spec read_model(const node& n, const std::string& path) {
  reader r(n, path);
  model_spec m;
  m.provider = r.string("provider", true);
  m.id = r.string("id", true);
  m.capability = *r.number("capability", true);
  m.input_price = r.number("input_price", false).value_or(0);
  m.output_price = r.number("output_price", false).value_or(0);
  m.context_window = r.count("context_window", std::uint64_t{1} << 40).value_or(0);
  m.requests_per_minute = r.number("requests_per_minute", false).value_or(0);
  m.tokens_per_minute = r.number("tokens_per_minute", false).value_or(0);
  m.cached_input_price = r.number("cached_input_price", false);
  m.cache_write_price = r.number("cache_write_price", false);
  m.cache_reads_count = r.boolean("cache_reads_count_toward_limits");
  r.no_unknown_fields();
  return m;
}

}  // namespace weir::detail::json_catalog

namespace weir::routing {

// Parses a catalog. Throws catalog_error (a weir::exception with code invalid_argument) naming
// the field and line of the first problem: bad syntax, a missing or mistyped field, an unknown
// field, a duplicate model. `other_fields` are top-level fields the caller reads itself (a
// gateway's tenants, say): neither read nor refused here.
inline catalog load_catalog(std::string_view json,
                            std::span<const std::string_view> other_fields = {}) {
  using namespace detail::json_catalog;
  const node root = parse(json);
  reader top(root, "catalog");
  for (const auto field : other_fields) top.find(field);
  catalog c;
  const auto each = [&](std::string_view key, bool required, auto add) {
    const node* list = top.find(key);
    if (!list) {
      if (required) throw catalog_error(std::string(key), root.line, "missing");
      return;
    }
    if (list->type != node::kind::array)
      throw catalog_error(std::string(key), list->line, "expected an array");
    for (std::size_t i = 0; i < list->items.size(); ++i) {
      const auto path = fmt::format("{}[{}]", key, i);
      try {
        add(list->items[i], path);
      } catch (const catalog_error&) {
        throw;
      } catch (const weir::exception& e) {  // the catalog's own checks, e.g. duplicates
        throw catalog_error(path, list->items[i].line, e.what());
      }
    }
  };
  each("providers", false,
       [&](const node& n, const std::string& path) { c.add(read_provider(n, path)); });
  each("models", true, [&](const node& n, const std::string& path) { c.add(read_model(n, path)); });
  top.no_unknown_fields();
  return c;
}

// Reads and parses a catalog file. Throws catalog_error with line 0 if it cannot be read.
inline catalog load_catalog_file(const std::filesystem::path& path,
                                 std::span<const std::string_view> other_fields = {}) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw catalog_error(path.string(), 0, "cannot open the file");
  std::ostringstream text;
  text << in.rdbuf();
  return load_catalog(text.str(), other_fields);
}

}  // namespace weir::routing
