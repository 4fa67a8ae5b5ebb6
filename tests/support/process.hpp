// Programs the tests start as child processes (weir-gateway, weir-demo, a Prometheus server):
// start one, read its output as it comes, wait for its end.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace test_process {

// Starts argv[0] (a path) with `argv`. Its stdout goes to the returned pipe, or with a `log`
// path, stdout and stderr go to that file and the pipe is -1. Returns the child's pid and the
// pipe's read end.
inline std::pair<pid_t, int> spawn(const std::vector<std::string>& argv,
                                   const std::string& log = {}) {
  int out[2] = {-1, -1};
  if (log.empty()) REQUIRE(::pipe(out) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    if (log.empty()) {
      ::dup2(out[1], STDOUT_FILENO);
      ::close(out[0]);
      ::close(out[1]);
    } else {
      const int file = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (file < 0) ::_exit(126);
      ::dup2(file, STDOUT_FILENO);
      ::dup2(file, STDERR_FILENO);
      ::close(file);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  if (!log.empty()) return {pid, -1};
  ::close(out[1]);
  return {pid, out[0]};
}

// Reads `fd` into `seen` until `seen` holds a whole line containing `marker` at or after `from`,
// waiting at most `within`. Returns the position just past that line, or npos.
inline std::size_t read_until(int fd, std::string& seen, std::string_view marker,
                              std::chrono::milliseconds within, std::size_t from = 0) {
  const auto until = std::chrono::steady_clock::now() + within;
  for (;;) {
    if (const auto at = seen.find(marker, from); at != std::string::npos)
      if (const auto end = seen.find('\n', at); end != std::string::npos) return end + 1;
    if (std::chrono::steady_clock::now() >= until) return std::string::npos;
    ::pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    char buffer[4096];
    const auto n = ::read(fd, buffer, sizeof buffer);
    if (n <= 0) return std::string::npos;
    seen.append(buffer, static_cast<std::size_t>(n));
  }
}

// The rest of the first line of `fd` that holds `marker`, after it, waiting at most `within`.
inline std::string line_with(int fd, std::string_view marker, std::chrono::milliseconds within) {
  std::string seen;
  const auto end = read_until(fd, seen, marker, within);
  if (end == std::string::npos) return {};
  const auto at = seen.find(marker) + marker.size();
  return seen.substr(at, end - 1 - at);
}

// The child's exit status, or -1 if it has not exited within `within` (it is then killed).
inline int wait_exit(pid_t pid, std::chrono::milliseconds within) {
  const auto until = std::chrono::steady_clock::now() + within;
  while (std::chrono::steady_clock::now() < until) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return -1;
}

}  // namespace test_process
