// Processes started by EXEC: spawn, stdio streams with flow control, signals,
// pty window size, timeouts, exit status.
#ifndef CELLVM_AGENT_EXEC_H
#define CELLVM_AGENT_EXEC_H

#include <stdint.h>

#include "agent.h"

int exec_init(void); // SIGCHLD through a signalfd; -1 with errno
void exec_request(uint32_t id, const uint8_t *payload, uint32_t len);
void exec_signal(uint32_t id, const uint8_t *payload, uint32_t len);
void exec_resize(uint32_t id, const uint8_t *payload, uint32_t len);
void exec_stdin(uint32_t id, uint16_t flags, const uint8_t *payload, uint32_t len);
void exec_credit(uint32_t id, uint16_t data_type, uint32_t bytes);
int exec_owns(uint32_t id);
void exec_before_poll(struct pollset *ps);
void exec_after_poll(void); // timeouts, EXIT for finished processes
void exec_kill_all(void);

#endif
