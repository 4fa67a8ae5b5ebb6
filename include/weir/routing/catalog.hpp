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

#include <weir/circuit_breaker.hpp>
#include <weir/error.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
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

  // USD for a request with these token counts.
  double cost(std::uint64_t input_tokens, std::uint64_t output_tokens) const noexcept {
    return (static_cast<double>(input_tokens) * input_price +
            static_cast<double>(output_tokens) * output_price) /
           1e6;
  }
};

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
    if (find_model(m.provider, m.id))
      fail(fmt::format("model {}/{} is listed twice", m.provider, m.id));
    if (!find_provider(m.provider)) add(provider_spec{.name = m.provider});
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
