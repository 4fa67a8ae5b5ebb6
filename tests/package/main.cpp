// A consumer of the installed package: it only needs find_package(weir) and weir::weir.
#include <weir/weir.hpp>

#include <fmt/core.h>

int main() {
  weir::error_code ec = weir::error::rate_limited;
  auto verdict = weir::default_classifier{}(weir::outcome<int>::from_error(ec));
  fmt::print("consumer: {} -> {}\n", ec.message(), verdict.kind == weir::verdict::rate_limited);
  return verdict.kind == weir::verdict::rate_limited ? 0 : 1;
}
