// What weir's small servers (the metrics endpoint, the mock providers) share: listening, and
// closing down with every connection still open.
#pragma once

#include <boost/asio/ip/tcp.hpp>

#include <memory>
#include <vector>

namespace weir::detail {

// Opens, binds and listens; throws boost::system::system_error if it cannot. Returns the port
// bound (the one asked for, or a free one for port 0).
inline unsigned short listen_on(boost::asio::ip::tcp::acceptor& acceptor,
                                const boost::asio::ip::tcp::endpoint& at) {
  acceptor.open(at.protocol());
  acceptor.set_option(boost::asio::ip::tcp::acceptor::reuse_address(true));
  acceptor.bind(at);
  acceptor.listen();
  return acceptor.local_endpoint().port();
}

// Closes the acceptor and each connection still open: their pending operations end with
// operation_aborted, and the coroutines awaiting them return.
template <class Stream>
void close_all(boost::asio::ip::tcp::acceptor& acceptor,
               std::vector<std::weak_ptr<Stream>>& connections) {
  boost::system::error_code ignored;
  acceptor.close(ignored);
  for (auto& weak : connections)
    if (auto stream = weak.lock()) stream->socket().close(ignored);
  connections.clear();
}

}  // namespace weir::detail
