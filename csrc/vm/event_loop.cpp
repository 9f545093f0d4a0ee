#include "vm/event_loop.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>

#include <cerrno>

#include "common/errors.h"

namespace cellvm {

EventLoop::EventLoop() {
  epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_) throw HypervisorError::from_errno("epoll_create1");
  wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_) throw HypervisorError::from_errno("eventfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wake_.get();
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &ev) < 0) throw HypervisorError::from_errno("epoll_ctl");
}

EventLoop::~EventLoop() { stop(); }

void EventLoop::add(int fd, uint32_t events, Handler handler) {
  {
    std::lock_guard lock(mutex_);
    handlers_[fd] = std::move(handler);
  }
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) < 0) throw HypervisorError::from_errno("epoll_ctl(add)");
}

void EventLoop::modify(int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev) < 0) throw HypervisorError::from_errno("epoll_ctl(mod)");
}

void EventLoop::remove(int fd) {
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  std::lock_guard lock(mutex_);
  handlers_.erase(fd);
}

void EventLoop::start() {
  std::lock_guard lock(mutex_);
  if (!thread_.joinable() && !stopping_) thread_ = std::thread(&EventLoop::run, this);
}

void EventLoop::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void EventLoop::run() {
  epoll_event events[16];
  while (true) {
    int n = ::epoll_wait(epoll_.get(), events, 16, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return;
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == wake_.get()) {
        std::lock_guard lock(mutex_);
        if (stopping_) return;
        continue;
      }
      Handler handler;
      {
        std::lock_guard lock(mutex_);
        auto it = handlers_.find(events[i].data.fd);
        if (it == handlers_.end()) continue;
        handler = it->second;
      }
      handler(events[i].events);
    }
  }
}

}  // namespace cellvm
