#include "devices/virtio_console.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "devices/virtio/mmio.h"

namespace cellvm {

VirtioConsole::VirtioConsole(UniqueFd backend, EventLoop& loop) : backend_(std::move(backend)), loop_(loop) {}

VirtioConsole::~VirtioConsole() {
  if (registered_) loop_.remove(backend_.get());
}

void VirtioConsole::read_config(uint64_t offset, uint8_t* data, uint32_t len) {
  // struct virtio_console_config: u16 cols, u16 rows, u32 max_nr_ports, u32 emerg_wr
  uint8_t config[12] = {};
  uint32_t ports = 1;
  std::memcpy(config + 4, &ports, 4);
  std::memset(data, 0, len);
  if (offset < sizeof config) std::memcpy(data, config + offset, std::min<uint64_t>(len, sizeof config - offset));
}

void VirtioConsole::activate(VirtioTransport& transport) {
  transport_ = &transport;
  if (!registered_) {
    registered_ = true;
    interest_ = EPOLLIN;
    loop_.add(backend_.get(), interest_, [this](uint32_t events) {
      auto lock = transport_->lock();
      try {
        on_backend(*transport_, events);
      } catch (const VirtqueueError& e) {
        transport_->fail(e.what());
      } catch (const std::out_of_range& e) {
        transport_->fail(std::string("ring outside guest memory: ") + e.what());
      }
    });
  }
}

// Bytes in flight either way belong to the agent protocol: keep them.
Blob VirtioConsole::save_state() const {
  std::vector<uint8_t> out(output_.begin(), output_.end());
  return BlobWriter().pod(uint32_t{1}).sized(out.data(), out.size()).sized(input_.data(), input_.size()).take();
}

void VirtioConsole::restore_state(const Blob& state) {
  BlobReader r(state, "virtio-console state");
  if (uint32_t version = r.pod<uint32_t>(); version != 1)
    throw SnapshotIncompatibleError("virtio-console state version " + std::to_string(version));
  Blob out = r.sized();
  output_.assign(out.begin(), out.end());
  input_ = r.sized();
  r.expect_end();
}

void VirtioConsole::reset() {
  output_.clear();
  input_.clear();
}

void VirtioConsole::process_queue(VirtioTransport& transport, int queue) {
  transport_ = &transport;
  if (queue == kTransmitQueue) take_transmit(transport);
  else deliver_input(transport);
  update_interest();
}

void VirtioConsole::take_transmit(VirtioTransport& transport) {
  Virtqueue& q = transport.queue(kTransmitQueue);
  bool used = false;
  while (output_.size() < kBufferLimit && q.has_available(transport.memory())) {
    auto chain = q.pop(transport.memory());
    for (const GuestBuffer& b : chain->buffers)
      if (!b.device_writable) output_.insert(output_.end(), b.data, b.data + b.len);
    q.push_used(transport.memory(), chain->head, 0);
    used = true;
  }
  if (used) transport.notify_used(kTransmitQueue);
  flush_output();
}

void VirtioConsole::flush_output() {
  while (!output_.empty() && !backend_closed_) {
    // deque storage is segmented: write what is contiguous
    uint8_t chunk[65536];
    size_t n = std::min(output_.size(), sizeof chunk);
    std::copy(output_.begin(), output_.begin() + n, chunk);
    ssize_t sent = ::send(backend_.get(), chunk, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (sent <= 0) {
      backend_closed_ = true;  // the host went away: drop output, keep the guest running
      output_.clear();
      return;
    }
    output_.erase(output_.begin(), output_.begin() + sent);
  }
}

void VirtioConsole::deliver_input(VirtioTransport& transport) {
  Virtqueue& q = transport.queue(kReceiveQueue);
  bool used = false;
  size_t offset = 0;
  while (offset < input_.size() && q.has_available(transport.memory())) {
    auto chain = q.pop(transport.memory());
    size_t n = chain->write(input_.data() + offset, input_.size() - offset);
    q.push_used(transport.memory(), chain->head, n);
    offset += n;
    used = true;
  }
  input_.erase(input_.begin(), input_.begin() + offset);
  if (used) transport.notify_used(kReceiveQueue);
}

void VirtioConsole::on_backend(VirtioTransport& transport, uint32_t events) {
  if (events & EPOLLOUT) {
    flush_output();
    take_transmit(transport);  // room again: take what the guest queued meanwhile
  }
  if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
    uint8_t buf[65536];
    while (input_.size() < kBufferLimit) {
      ssize_t n = ::recv(backend_.get(), buf, std::min(sizeof buf, kBufferLimit - input_.size()), MSG_DONTWAIT);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) backend_closed_ = true;
        break;
      }
      input_.insert(input_.end(), buf, buf + n);
    }
    if (transport.driver_ok_locked()) deliver_input(transport);
  }
  update_interest();
}

void VirtioConsole::update_interest() {
  if (!registered_) return;
  uint32_t want = 0;
  if (!backend_closed_ && input_.size() < kBufferLimit) want |= EPOLLIN;
  if (!backend_closed_ && !output_.empty()) want |= EPOLLOUT;
  if (want != interest_) {
    interest_ = want;
    loop_.modify(backend_.get(), want);
  }
}

}  // namespace cellvm
