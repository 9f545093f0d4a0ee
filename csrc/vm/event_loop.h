// One host I/O thread per machine (epoll): what arrives from the host side
// of a device (console input, a backend becoming writable) is handled here,
// not on a vCPU thread, so no vCPU ever blocks on the host.
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "common/fd.h"

namespace cellvm {

class EventLoop {
 public:
  using Handler = std::function<void(uint32_t events)>;

  EventLoop();
  ~EventLoop();  // stops and joins
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Watch `fd` for `events` (EPOLLIN, EPOLLOUT...); the handler runs on the
  // loop thread. Callable from any thread, before or after start().
  void add(int fd, uint32_t events, Handler handler);
  void modify(int fd, uint32_t events);
  void remove(int fd);
  void start();
  void stop();

 private:
  void run();

  UniqueFd epoll_, wake_;
  std::mutex mutex_;
  std::map<int, Handler> handlers_;
  std::thread thread_;
  bool stopping_ = false;
};

}  // namespace cellvm
