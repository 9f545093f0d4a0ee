// RESTORED: the VM was restored from a snapshot. Reseed the RNG with host
// entropy and step the wall clock, before anything else is served.
#ifndef CELLVM_AGENT_RESTORED_H
#define CELLVM_AGENT_RESTORED_H

#include <stdint.h>

void restored_request(uint32_t id, const uint8_t *payload, uint32_t len);

#endif
