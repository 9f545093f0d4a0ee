// What the agent's parts share: options, the fatal path, the poll set of the
// main loop, and the one connection to the host (frame.c).
#ifndef CELLVM_AGENT_H
#define CELLVM_AGENT_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>

#include "fields.h"

#define AGENT_NAME "cellvm-agent 0.1"

struct options {
	int init;		// PID 1: mount, switch root, never exit
	int allow_clock_step;	// RESTORED may set CLOCK_REALTIME (always on in init mode)
	const char *config_path; // image config (config.c); NULL for none
};
extern struct options opt;

// Prints one line (to /dev/console in init mode) and ends the agent: as PID 1
// it powers the machine off (reboot(RB_AUTOBOOT)); otherwise exit(1).
__attribute__((noreturn, format(printf, 1, 2))) void fatal(const char *fmt, ...);
__attribute__((format(printf, 1, 2))) void log_line(const char *fmt, ...);

// The main loop's poll set, rebuilt every iteration by each part.
typedef void (*poll_handler)(void *ctx, short revents);
struct pollset {
	struct pollfd *fds;
	poll_handler *handlers;
	void **ctxs;
	size_t n, cap;
	int timeout_ms; // -1 = none
};
void pollset_add(struct pollset *ps, int fd, short events, poll_handler h, void *ctx);
void pollset_timeout(struct pollset *ps, int ms);
int64_t monotonic_ms(void);

// frame.c: the connection. Frames are queued in order and flushed by the
// loop; producers stop while the queue is above OUT_HIGH_WATER.
#define OUT_HIGH_WATER (1u << 20)
void conn_init(int in_fd, int out_fd);
void conn_poll(struct pollset *ps);
void conn_flush(void); // writes what the socket takes now, without waiting
int conn_closed(void);
int conn_has_room(void);
void send_frame(uint16_t type, uint32_t id, uint16_t flags, const void *payload, size_t len);
void send_result(uint32_t id, const struct buf *fields);
__attribute__((format(printf, 4, 5))) void send_error(uint32_t id, int code, int err, const char *fmt, ...);
int errno_code(int err); // errno -> enum error_code
void send_credit(uint32_t id, uint16_t data_type, uint32_t bytes);

// main.c: one complete frame from the host.
void dispatch(uint16_t type, uint32_t id, uint16_t flags, const uint8_t *payload, uint32_t len);
// The id an ERROR about a frame goes to: frames without a reply of their own
// (data, CREDIT, SIGNAL, ...) are reported on 0, so a live stream survives.
uint32_t error_id(uint16_t type, uint32_t id);

#endif
