// What the router can choose from: providers and their models, with prices, capability, context
// windows and limits. Built in code, or read from JSON with weir/routing/catalog_json.hpp.
//
//     weir::routing::catalog models;
//     models.add(weir::routing::provider_spec{.name = "openai"});
//     models.add(weir::routing::model_spec{.provider = "openai", .id = "gpt-4o-mini", .input_price = 0.15,
//                                 .output_price = 0.60, .capability = 7,
//                                 .context_window = 128'000, .requests_per_minute = 500,
//                                 .tokens_per_minute = 200'000});
#pragma once

#include <weir/core/call_context.hpp>
#include <weir/core/error.hpp>
#include <weir/core/price.hpp>
#include <weir/failure/circuit_breaker.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weir::routing {

struct model_spec {
  std::string provider;
  std::string id;
  double input_price = 0;            // USD per million input tokens
  double output_price = 0;           // USD per million output tokens
  double capability = 0;             // higher is more capable; the scale is the user's
  std::uint64_t context_window = 0;  // tokens; 0 when unknown (never filtered on)
  double requests_per_minute = 0;    // 0: no local request limit
  double tokens_per_minute = 0;      // 0: no local token limit
  // USD per million input tokens read from the provider's prompt cache, and written to it; and
  // whether the tokens read count toward tokens_per_minute. Left unset, catalog::add fills them
  // in by the provider's cache_rules; outside a catalog, unset is the input price and counted.
  std::optional<double> cached_input_price{};
  std::optional<double> cache_write_price{};
  std::optional<bool> cache_reads_count{};

  weir::price prices() const noexcept {
    return {.input_per_million = input_price,
            .output_per_million = output_price,
            .cached_input_per_million = cached_input_price,
            .cache_write_per_million = cache_write_price};
  }
  // USD for a request with these token counts (none of them cached).
  double cost(std::uint64_t input_tokens, std::uint64_t output_tokens) const noexcept {
    return prices().of(input_tokens, output_tokens);
  }
  // The most such a request can cost (its prompt written to the cache): what budgets reserve.
  double most_cost(std::uint64_t input_tokens, std::uint64_t output_tokens) const noexcept {
    return prices().most_for(input_tokens, output_tokens);
  }
  // USD for what a response reported, its cache reads and writes at their prices.
  double cost(const token_usage& used) const noexcept { return prices().of(used); }

  // What the provider counts toward the model's token limit of what a response reported.
  usage limited_usage(const token_usage& used) const noexcept {
    const auto input =
        cache_reads_count.value_or(true)
            ? used.input_tokens
            : used.input_tokens - std::min(used.input_tokens, used.cache_read_tokens);
    return {.requests = 1,
            .tokens = weir::detail::saturating_add(input, used.output_tokens),
            .input_tokens = input,
            .output_tokens = used.output_tokens};
  }
};

// What a provider's prompt cache does to its models' prices and limits, where a model does not
// say: cache reads cost read_factor × the input price, writes write_factor × it; reads count
// toward the token limits or not; a cached prefix lives `ttl` after its last use.
struct cache_rules {
  double read_factor = 1;
  double write_factor = 1;
  bool reads_count_toward_limits = true;
  std::chrono::nanoseconds ttl = std::chrono::minutes(5);
};

// The rules the providers document, by the provider's name in the catalog:
//  - "anthropic": reads 0.1× the input price, 5-minute writes 1.25×, and reads do not count
//    toward the input-tokens-per-minute limit (on current models; set a model's
//    cache_reads_count for the older ones where they do);
//  - "openai": reads 0.5× (the highest of its models' discounts, which run 0.1–0.5×: set a
//    model's cached_input_price for the exact one), writes at the input price, and reads count;
//  - any other: no discount assumed (cached tokens at the input price), and reads count.
// Every provider's cache lives 5 minutes after its last use.
inline cache_rules documented_cache_rules(std::string_view provider) noexcept {
  if (provider == "anthropic")
    return {.read_factor = 0.1, .write_factor = 1.25, .reads_count_toward_limits = false};
  if (provider == "openai") return {.read_factor = 0.5};
  return {};
}

// The value of OpenTelemetry's gen_ai.provider.name for a provider weir knows by this name (a
// well-known value of the GenAI semantic conventions: "gemini" is "gcp.gemini", "mistral"
// "mistral_ai"), else the name itself.
inline std::string_view well_known_gen_ai_provider(std::string_view name) noexcept {
  constexpr std::pair<std::string_view, std::string_view> aliases[] = {
      {"gemini", "gcp.gemini"},
      {"google", "gcp.gen_ai"},
      {"vertex", "gcp.vertex_ai"},
      {"vertex_ai", "gcp.vertex_ai"},
      {"bedrock", "aws.bedrock"},
      {"azure_openai", "azure.ai.openai"},
      {"azure-openai", "azure.ai.openai"},
      {"mistral", "mistral_ai"},
      {"xai", "x_ai"},
      {"grok", "x_ai"},
      {"watsonx", "ibm.watsonx.ai"},
      {"moonshot", "moonshot_ai"}};
  for (const auto& [alias, value] : aliases)
    if (name == alias) return value;
  return name;
}

// What a refusal that says the quota is exhausted cools down.
enum class cooldown_scope {
  model,     // the model (deployment) it came from: limits are per model (OpenAI, Anthropic)
  provider,  // every model of the provider: limits are per account
};

struct provider_spec {
  std::string name;
  circuit_breaker_options breaker{};  // on_state_change is kept and called besides the router's
  // How long a refused request waits before it tries the same model again when the refusal
  // names no time (no Retry-After, no reset).
  std::chrono::nanoseconds default_cooldown = std::chrono::seconds(1);
  weir::routing::cooldown_scope cooldown_scope = cooldown_scope::model;
  // Its prompt cache; nullopt: documented_cache_rules(name).
  std::optional<cache_rules> cache{};
  // gen_ai.provider.name in the GenAI metrics; empty: well_known_gen_ai_provider(name).
  std::string gen_ai_name{};

  weir::routing::cache_rules cache_or_documented() const noexcept {
    return cache ? *cache : documented_cache_rules(name);
  }
  std::string_view gen_ai_name_or_well_known() const noexcept {
    return gen_ai_name.empty() ? well_known_gen_ai_provider(name) : std::string_view(gen_ai_name);
  }
};

// An ordered list of providers and models. Adding a model for a provider not added yet adds the
// provider with default settings.
class catalog {
 public:
  // Throws weir::exception(invalid_argument) for an empty or duplicate name, or a negative
  // default cooldown.
  catalog& add(provider_spec p) {
    if (p.name.empty()) fail("provider name is empty");
    if (find_provider(p.name)) fail(fmt::format("provider {} is listed twice", p.name));
    if (p.default_cooldown.count() < 0)
      fail(fmt::format("provider {}: default_cooldown is negative", p.name));
    if (p.cache) {
      for (auto [v, field] : {std::pair{p.cache->read_factor, "cache.read_factor"},
                              std::pair{p.cache->write_factor, "cache.write_factor"}})
        if (!std::isfinite(v) || v < 0)
          fail(fmt::format("provider {}: {} must be a finite number ≥ 0", p.name, field));
      if (p.cache->ttl.count() < 0) fail(fmt::format("provider {}: cache.ttl is negative", p.name));
    }
    providers_.push_back(std::move(p));
    return *this;
  }

  // Throws weir::exception(invalid_argument) naming the field: empty provider or id, a duplicate
  // (provider, id), or a price, capability or limit that is negative or not finite.
  catalog& add(model_spec m) {
    if (m.provider.empty()) fail("model provider is empty");
    if (m.id.empty()) fail(fmt::format("model of {}: id is empty", m.provider));
    const auto check = [&](double v, const char* field) {
      if (!std::isfinite(v) || v < 0)
        fail(fmt::format("model {}/{}: {} must be a finite number ≥ 0", m.provider, m.id, field));
    };
    check(m.input_price, "input_price");
    check(m.output_price, "output_price");
    check(m.capability, "capability");
    check(m.requests_per_minute, "requests_per_minute");
    check(m.tokens_per_minute, "tokens_per_minute");
    if (m.cached_input_price) check(*m.cached_input_price, "cached_input_price");
    if (m.cache_write_price) check(*m.cache_write_price, "cache_write_price");
    if (find_model(m.provider, m.id))
      fail(fmt::format("model {}/{} is listed twice", m.provider, m.id));
    if (!find_provider(m.provider)) add(provider_spec{.name = m.provider});
    const auto rules = find_provider(m.provider)->cache_or_documented();
    if (!m.cached_input_price) m.cached_input_price = m.input_price * rules.read_factor;
    if (!m.cache_write_price) m.cache_write_price = m.input_price * rules.write_factor;
    if (!m.cache_reads_count) m.cache_reads_count = rules.reads_count_toward_limits;
    models_.push_back(std::move(m));
    return *this;
  }

  std::span<const provider_spec> providers() const noexcept { return providers_; }
  std::span<const model_spec> models() const noexcept { return models_; }

  const provider_spec* find_provider(std::string_view name) const noexcept {
    for (const auto& p : providers_)
      if (p.name == name) return &p;
    return nullptr;
  }
  const model_spec* find_model(std::string_view provider, std::string_view id) const noexcept {
    for (const auto& m : models_)
      if (m.provider == provider && m.id == id) return &m;
    return nullptr;
  }

 private:
  [[noreturn]] static void fail(std::string what) {
    throw weir::exception(error::invalid_argument, "catalog: " + what);
  }

  std::vector<provider_spec> providers_;
  std::vector<model_spec> models_;
};

}  // namespace weir::routing
