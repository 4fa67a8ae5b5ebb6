// weir-gateway's two ways to be set up: one upstream from the command line, or a catalog file —
// the catalog the router reads (routing/catalog_json.hpp) plus the gateway's own sections:
//
//     "upstreams": [{"provider": "openai", "base_url": "https://api.openai.com/v1",
//                    "api_key_env": "OPENAI_API_KEY", "dialects": ["openai"]}],
//     "aliases":   [{"name": "fast", "min_capability": 5, "max_cost": 0.01,
//                    "providers": ["groq"]}],
//     "tenants":   [{"name": "team-a", "key_env": "TEAM_A_KEY", "requests_per_minute": 60,
//                    "tokens_per_minute": 100000, "budget_usd_per_day": 5, "weight": 1}]
//
// Keys come from the environment (`api_key_env`, `key_env`) or, for a client key, as its
// SHA-256 digest (`key_sha256`): never from the file or the command line themselves.
#pragma once

#include "gateway.hpp"

#include <weir/routing/catalog_json.hpp>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace gateway {

// A setup that cannot work; the message names the field, never a key.
class config_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One upstream, every model it is asked for passed through (the catalog's one model "*"), or
// the models named, each with the limits given (0: found from its headers or discovered).
struct single_upstream {
  std::string base_url;
  std::string api_key_env;  // empty: no key sent
  bool openai = true;
  bool anthropic = true;
  std::vector<std::string> models{};
  double requests_per_minute = 0;
  double tokens_per_minute = 0;
  std::string client_key_env{};  // empty: no client key asked for
};

namespace detail {

inline std::string from_env(const std::string& var, std::string_view field) {
  const char* value = std::getenv(var.c_str());
  if (!value || !*value) throw config_error(fmt::format("{}: ${} is not set", field, var));
  return value;
}

// The fields of one object of the gateway's sections, refusing unknown ones.
class fields {
 public:
  fields(const boost::json::value& v, std::string path) : path_(std::move(path)) {
    if (!v.is_object()) throw config_error(path_ + ": expected an object");
    object_ = &v.as_object();
  }
  // Call after reading every known field: an unknown one (a typo) must not pass silently.
  void done() const {
    for (const auto& [key, value] : *object_)
      if (std::find(used_.begin(), used_.end(), std::string_view(key)) == used_.end())
        throw config_error(fmt::format("{}.{}: unknown field", path_, std::string_view(key)));
  }
  fields(const fields&) = delete;
  fields& operator=(const fields&) = delete;

  std::string field(std::string_view key) const { return fmt::format("{}.{}", path_, key); }

  const boost::json::value* find(std::string_view key) {
    used_.push_back(key);
    return object_->if_contains(key);
  }
  std::string text(std::string_view key, bool required) {
    const auto* v = find(key);
    if (!v) {
      if (required) throw config_error(field(key) + ": missing");
      return {};
    }
    if (!v->is_string() || v->as_string().empty())
      throw config_error(field(key) + ": expected a non-empty string");
    return std::string(v->as_string());
  }
  std::optional<double> number(std::string_view key) {
    const auto* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number() || v->to_number<double>() < 0)
      throw config_error(field(key) + ": expected a number ≥ 0");
    return v->to_number<double>();
  }
  std::vector<std::string> texts(std::string_view key) {
    std::vector<std::string> out;
    const auto* v = find(key);
    if (!v) return out;
    if (!v->is_array()) throw config_error(field(key) + ": expected an array of strings");
    for (const auto& item : v->as_array()) {
      if (!item.is_string()) throw config_error(field(key) + ": expected an array of strings");
      out.emplace_back(item.as_string());
    }
    return out;
  }

 private:
  std::string path_;
  const boost::json::object* object_;
  std::vector<std::string_view> used_;
};

template <class Read>
void each(const boost::json::object& top, std::string_view key, Read read) {
  const auto* list = top.if_contains(key);
  if (!list) return;
  if (!list->is_array()) throw config_error(fmt::format("{}: expected an array", key));
  for (std::size_t i = 0; i < list->as_array().size(); ++i)
    read(list->as_array()[i], fmt::format("{}[{}]", key, i));
}

}  // namespace detail

// The gateway's settings from a catalog file's text (the listener's are left as they are).
// Throws config_error, or weir::routing::catalog_error naming the catalog's field and line.
inline config load_config(std::string_view json, config base = {}) {
  static constexpr std::string_view ours[] = {"upstreams", "aliases", "tenants"};
  base.catalog = weir::routing::load_catalog(json, ours);
  boost::system::error_code ec;
  const auto root = boost::json::parse(json, ec);
  if (ec || !root.is_object()) throw config_error("the file is not a JSON object");
  const auto& top = root.as_object();
  base.upstreams.clear();
  detail::each(top, "upstreams", [&](const boost::json::value& v, std::string path) {
    detail::fields f(v, std::move(path));
    upstream u;
    u.provider = f.text("provider", true);
    u.base_url = f.text("base_url", true);
    try {
      weir::http::endpoint::parse(u.base_url);
    } catch (const std::exception& e) {
      throw config_error(f.field("base_url") + ": " + e.what());
    }
    if (auto var = f.text("api_key_env", false); !var.empty())
      u.api_key = detail::from_env(var, f.field("api_key_env"));
    auto dialects = f.texts("dialects");
    if (dialects.empty()) dialects = {"openai"};
    u.speaks_openai = u.speaks_anthropic = false;
    for (const auto& d : dialects) {
      if (d == "openai")
        u.speaks_openai = true;
      else if (d == "anthropic")
        u.speaks_anthropic = true;
      else
        throw config_error(f.field("dialects") + ": \"openai\" or \"anthropic\", not \"" + d +
                           "\"");
    }
    f.done();
    base.upstreams.push_back(std::move(u));
  });
  for (const auto& p : base.catalog.providers())
    if (std::none_of(base.upstreams.begin(), base.upstreams.end(),
                     [&](const upstream& u) { return u.provider == p.name; }))
      throw config_error(fmt::format("upstreams: none for provider {}", p.name));
  base.aliases.clear();
  detail::each(top, "aliases", [&](const boost::json::value& v, std::string path) {
    detail::fields f(v, std::move(path));
    alias a;
    a.name = f.text("name", true);
    a.min_capability = f.number("min_capability").value_or(0);
    a.max_cost = f.number("max_cost");
    a.providers = f.texts("providers");
    f.done();
    base.aliases.push_back(std::move(a));
  });
  base.tenants.clear();
  detail::each(top, "tenants", [&](const boost::json::value& v, std::string path) {
    detail::fields f(v, std::move(path));
    tenant t;
    t.name = f.text("name", true);
    const auto var = f.text("key_env", false);
    t.key_sha256 = f.text("key_sha256", false);
    if (var.empty() == t.key_sha256.empty())
      throw config_error(f.field("key_env") + ": give key_env or key_sha256, one of them");
    if (!var.empty()) t.key_sha256 = sha256_hex(detail::from_env(var, f.field("key_env")));
    t.requests_per_minute = f.number("requests_per_minute").value_or(0);
    t.tokens_per_minute = f.number("tokens_per_minute").value_or(0);
    t.budget_per_day = f.number("budget_usd_per_day").value_or(0);
    t.weight = f.number("weight").value_or(1);
    if (!(t.weight > 0)) throw config_error(f.field("weight") + ": must be positive");
    f.done();
    base.tenants.push_back(std::move(t));
  });
  return base;
}

inline config load_config_file(const std::string& path, config base = {}) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw config_error(path + ": cannot open the file");
  std::ostringstream text;
  text << in.rdbuf();
  return load_config(text.str(), std::move(base));
}

// The setup of `--upstream`: one provider, "upstream", of the models named or of any.
inline config single(const single_upstream& u, config base = {}) {
  base.catalog = {};
  base.catalog.add(weir::routing::provider_spec{.name = "upstream"});
  auto models = u.models;
  if (models.empty()) models.push_back("*");
  for (const auto& id : models)
    base.catalog.add(weir::routing::model_spec{.provider = "upstream",
                                               .id = id,
                                               .requests_per_minute = u.requests_per_minute,
                                               .tokens_per_minute = u.tokens_per_minute});
  upstream up{.provider = "upstream",
              .base_url = u.base_url,
              .speaks_openai = u.openai,
              .speaks_anthropic = u.anthropic};
  if (!u.api_key_env.empty()) up.api_key = detail::from_env(u.api_key_env, "--api-key-env");
  base.upstreams = {up};
  base.tenants.clear();
  if (!u.client_key_env.empty())
    base.tenants.push_back(
        tenant{.name = "default",
               .key_sha256 = sha256_hex(detail::from_env(u.client_key_env, "--client-key-env"))});
  return base;
}

}  // namespace gateway
