// `--metrics-port N` of the demos: weir::http::metrics_endpoint on 127.0.0.1, on a thread of its
// own for the program's whole life (across runs), so a Prometheus can scrape it meanwhile.
#pragma once

#include <weir/http/metrics_endpoint.hpp>

#include <fmt/format.h>
#include <boost/asio/io_context.hpp>

#include <charconv>
#include <chrono>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace demo {

// The port of `--metrics-port` (0: a free one), or nothing if `text` is not one.
inline std::optional<unsigned short> parse_port(std::string_view text) {
  unsigned short port = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), port);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return port;
}

class metrics_server {
 public:
  // Binds at once (throws if the port is taken) and prints the URL once.
  metrics_server(unsigned short port, std::vector<weir::http::metrics_source> sources)
      : endpoint_(io_.get_executor(), {.port = port}, std::move(sources)) {
    endpoint_.start();
    fmt::print("metrics: {}\n", endpoint_.url());
    thread_ = std::thread([this] { io_.run(); });
  }
  ~metrics_server() {
    endpoint_.stop();  // the acceptor and connections close; io_.run() then returns
    thread_.join();
  }
  // Whether a first scrape came within `within`: a run started after it is seen from zero.
  bool await_first_scrape(std::chrono::milliseconds within) const {
    const auto until = std::chrono::steady_clock::now() + within;
    while (endpoint_.stats().scrapes == 0) {
      if (std::chrono::steady_clock::now() >= until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return true;
  }

  metrics_server(const metrics_server&) = delete;
  metrics_server& operator=(const metrics_server&) = delete;

 private:
  boost::asio::io_context io_{1};
  weir::http::metrics_endpoint endpoint_;
  std::thread thread_;
};

}  // namespace demo
