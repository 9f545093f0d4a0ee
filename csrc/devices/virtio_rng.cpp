#include "devices/virtio_rng.h"

#include <sys/random.h>

#include <vector>

#include "devices/virtio/mmio.h"

namespace cellvm {

void VirtioRng::process_queue(VirtioTransport& transport, int queue) {
  Virtqueue& q = transport.queue(queue);
  bool used = false;
  while (auto chain = q.pop(transport.memory())) {
    uint32_t written = 0;
    for (GuestBuffer& b : chain->buffers) {
      if (!b.device_writable) continue;
      for (uint32_t done = 0; done < b.len;) {
        ssize_t n = ::getrandom(b.data + done, b.len - done, 0);
        if (n <= 0) break;
        done += n;
        written += n;
      }
    }
    q.push_used(transport.memory(), chain->head, written);
    used = true;
  }
  if (used) transport.notify_used(queue);
}

}  // namespace cellvm
