// libFuzzer target for what the HTTP clients read from a server: the input is a whole response
// (status line, headers, interim 1xx responses, a length-delimited or chunked body) read as
// http::client reads it, whole and as an event stream, over an in-memory stream that hands it
// over in pieces of a size the first byte picks. Findings: a crash, a failure other than a
// system_error (a parse error, a limit passed), an interim response taken as final, a body or an
// event past its limit. Built by scripts/fuzz (clang).
#include <weir/http/client.hpp>
#include <weir/http/limits.hpp>
#include <weir/http/sse.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/beast/_experimental/test/stream.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/read.hpp>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <string_view>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
using weir::http::response_limits;

// Small limits, so that inputs of a few KB reach them.
constexpr response_limits limits{.max_header_bytes = 1024,
                                 .max_body_bytes = 2048,
                                 .max_sse_line_bytes = 256,
                                 .max_sse_event_bytes = 512};

// Runs `read` on a test stream holding `input`, handed over `piece` bytes at a time, then the
// end of the stream. A failure that is not a system_error (weir::exception is one) traps.
template <class Read>
void over_stream(std::string_view input, std::size_t piece, Read read) {
  asio::io_context io;
  beast::test::stream client(io), server(io);
  client.connect(server);
  client.read_size(piece);
  client.append(input);
  server.close();
  asio::co_spawn(io, read(client), [](std::exception_ptr e) {
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const boost::system::system_error&) {
    } catch (...) {
      __builtin_trap();
    }
  });
  io.run();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t piece = size > 0 ? 1 + data[0] % 64 : 1;

  // Whole, as post() reads it.
  over_stream(input, piece, [](beast::test::stream& s) -> asio::awaitable<void> {
    beast::flat_buffer buffer;
    const auto res = co_await weir::http::detail::read_response(s, buffer, limits);
    const unsigned status = res.result_int();
    if (status / 100 == 1 && status != 101) __builtin_trap();
    if (res.body().size() > limits.max_body_bytes) __builtin_trap();
  });

  // As an event stream, as post_streamed() and event_source read it.
  over_stream(input, piece, [](beast::test::stream& s) -> asio::awaitable<void> {
    namespace beast_http = beast::http;
    beast::flat_buffer buffer;
    std::optional<weir::http::detail::header_parser> header;
    co_await weir::http::detail::read_final_header(s, buffer, header, limits);
    const unsigned status = header->get().result_int();
    if (status / 100 == 1 && status != 101) __builtin_trap();
    beast_http::response_parser<beast_http::buffer_body> body(std::move(*header));
    body.body_limit(boost::none);
    weir::http::sse::parser events(limits);
    char chunk[512];
    while (!body.is_done()) {
      body.get().body().data = chunk;
      body.get().body().size = sizeof chunk;
      auto [ec, n] = co_await beast_http::async_read_some(s, buffer, body,
                                                          asio::as_tuple(asio::use_awaitable));
      if (ec && ec != beast_http::error::need_buffer) throw boost::system::system_error(ec);
      events.feed(std::string_view(chunk, sizeof chunk - body.get().body().size));
      while (auto e = events.next())
        if (e->data.size() > limits.max_sse_event_bytes) __builtin_trap();
    }
  });
  return 0;
}
