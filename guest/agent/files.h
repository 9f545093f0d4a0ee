// File requests: FILE_READ and FILE_WRITE (streamed, with flow control),
// LIST, STAT, MKDIR, REMOVE.
#ifndef CELLVM_AGENT_FILES_H
#define CELLVM_AGENT_FILES_H

#include <stdint.h>

#include "agent.h"

void files_request(uint16_t type, uint32_t id, const uint8_t *payload, uint32_t len);
void files_data(uint32_t id, uint16_t flags, const uint8_t *payload, uint32_t len);
void files_credit(uint32_t id, uint32_t bytes);
void files_cancel(uint32_t id);
int files_owns(uint32_t id);
void files_before_poll(struct pollset *ps);
void files_after_poll(void);
void files_close_all(void);

#endif
