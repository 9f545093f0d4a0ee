// cellvm-agent: serves the cellvm protocol (docs/PROTOCOL.md) on one byte
// stream. As PID 1 of a cellvm VM it first sets the machine up (init.c) and
// serves /dev/hvc0; as a host process (tests) it serves an inherited fd.
//
//   cellvm-agent --init                 PID 1 (also implied when getpid() == 1)
//   cellvm-agent --fd N                 serve fd N (a socket) in both directions
//   cellvm-agent --stdio                serve stdin/stdout
//   options: --config FILE (image config, see config.c), --allow-clock-step,
//            --cmdline STRING (instead of /proc/cmdline in init mode, for tests)
//
// With --init and --fd the agent serves the inherited fd instead of opening
// cellvm.channel, and powers off when it closes (tests: PID 1 of a PID
// namespace, where power-off ends the namespace).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "config.h"
#include "exec.h"
#include "files.h"
#include "init.h"
#include "proto.h"
#include "restored.h"

struct options opt;

void log_line(const char *fmt, ...)
{
	char line[600];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	// One write, so the line is never split by other console output.
	ssize_t w = write(2, line, (size_t)n);
	(void)w;
}

void fatal(const char *fmt, ...)
{
	char message[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(message, sizeof message, fmt, ap);
	va_end(ap);
	log_line("cellvm-agent: fatal: %s", message);
	if (opt.init)
		power_off();
	exit(1);
}

void pollset_add(struct pollset *ps, int fd, short events, poll_handler h, void *ctx)
{
	if (ps->n == ps->cap) {
		size_t cap = ps->cap ? ps->cap * 2 : 64;
		struct pollfd *fds = realloc(ps->fds, cap * sizeof *fds);
		poll_handler *hs = realloc(ps->handlers, cap * sizeof *hs);
		void **ctxs = realloc(ps->ctxs, cap * sizeof *ctxs);
		if (!fds || !hs || !ctxs)
			fatal("out of memory (poll set of %zu)", cap);
		ps->fds = fds;
		ps->handlers = hs;
		ps->ctxs = ctxs;
		ps->cap = cap;
	}
	ps->fds[ps->n] = (struct pollfd){.fd = fd, .events = events};
	ps->handlers[ps->n] = h;
	ps->ctxs[ps->n] = ctx;
	ps->n++;
}

void pollset_timeout(struct pollset *ps, int ms)
{
	if (ms < 0)
		ms = 0;
	if (ps->timeout_ms < 0 || ms < ps->timeout_ms)
		ps->timeout_ms = ms;
}

int64_t monotonic_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void hello(uint32_t id, const uint8_t *payload, uint32_t len)
{
	struct field_reader r = {payload, len};
	struct field f;
	int64_t version = -1;
	int rc;
	while ((rc = field_next(&r, &f)) > 0)
		if (f.tag == F_VERSION && field_as_int(&f, &version))
			rc = -1;
	if (rc < 0 || version < 0) {
		send_error(id, E_PROTOCOL, 0, "HELLO needs an integer version");
		return;
	}
	if (version != PROTO_VERSION) {
		send_error(id, E_PROTOCOL, 0, "protocol version %lld is not supported (agent speaks %d)",
			   (long long)version, PROTO_VERSION);
		return;
	}
	struct buf b = {0};
	field_int(&b, F_VERSION, PROTO_VERSION);
	field_str(&b, F_AGENT, AGENT_NAME);
	field_int(&b, F_PID, getpid());
	field_int(&b, F_INIT, opt.init);
	field_int(&b, F_WINDOW, STREAM_WINDOW);
	field_int(&b, F_MAX_PAYLOAD, FRAME_MAX_PAYLOAD);
	send_result(id, &b);
	buf_free(&b);
}

static void credit(uint32_t id, const uint8_t *payload, uint32_t len)
{
	if (len != 8) {
		send_error(0, E_PROTOCOL, 0, "CREDIT on stream %u: payload must be 8 bytes, got %u", id, len);
		return;
	}
	uint16_t data_type = get_u16(payload);
	uint32_t bytes = get_u32(payload + 4);
	if (data_type == MSG_FILE_DATA)
		files_credit(id, bytes);
	else if (data_type == MSG_STDOUT || data_type == MSG_STDERR)
		exec_credit(id, data_type, bytes);
	else
		send_error(0, E_PROTOCOL, 0, "CREDIT on stream %u for data type %u", id, data_type);
}

uint32_t error_id(uint16_t type, uint32_t id)
{
	switch (type) {
	case MSG_SIGNAL:
	case MSG_RESIZE:
	case MSG_CANCEL:
	case MSG_STDIN:
	case MSG_FILE_DATA:
	case MSG_CREDIT:
		return 0;
	default:
		return id;
	}
}

static int is_new_request(uint16_t type)
{
	return type == MSG_EXEC || type == MSG_FILE_READ || type == MSG_FILE_WRITE;
}

void dispatch(uint16_t type, uint32_t id, uint16_t flags, const uint8_t *payload, uint32_t len)
{
	// Requests that open a stream must not reuse a live stream's id: the
	// replies would be indistinguishable.
	if (is_new_request(type) && (id == 0 || exec_owns(id) || files_owns(id))) {
		send_error(id, E_PROTOCOL, 0, "stream id %u is 0 or already in use", id);
		return;
	}
	switch (type) {
	case MSG_HELLO:
		hello(id, payload, len);
		break;
	case MSG_EXEC:
		exec_request(id, payload, len);
		break;
	case MSG_SIGNAL:
		exec_signal(id, payload, len);
		break;
	case MSG_RESIZE:
		exec_resize(id, payload, len);
		break;
	case MSG_STDIN:
		exec_stdin(id, flags, payload, len);
		break;
	case MSG_RESTORED:
		restored_request(id, payload, len);
		break;
	case MSG_CANCEL:
		files_cancel(id);
		break;
	case MSG_FILE_READ:
	case MSG_FILE_WRITE:
	case MSG_LIST:
	case MSG_STAT:
	case MSG_MKDIR:
	case MSG_REMOVE:
		files_request(type, id, payload, len);
		break;
	case MSG_FILE_DATA:
		files_data(id, flags, payload, len);
		break;
	case MSG_CREDIT:
		credit(id, payload, len);
		break;
	default:
		send_error(id, E_PROTOCOL, 0, "unknown frame type %u", type);
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: cellvm-agent [--init] [--fd N | --stdio] [--config FILE] "
			"[--allow-clock-step] [--cmdline STRING]\n");
	exit(2);
}

static void serve(int in_fd, int out_fd)
{
	conn_init(in_fd, out_fd);
	struct buf ready = {0};
	field_int(&ready, F_VERSION, PROTO_VERSION);
	field_str(&ready, F_AGENT, AGENT_NAME);
	field_int(&ready, F_PID, getpid());
	send_frame(MSG_READY, 0, 0, ready.data, ready.len);
	buf_free(&ready);

	struct pollset ps = {0};
	while (!conn_closed()) {
		ps.n = 0;
		ps.timeout_ms = -1;
		exec_before_poll(&ps);
		files_before_poll(&ps);
		conn_poll(&ps);
		if (poll(ps.fds, ps.n, ps.timeout_ms) < 0 && errno != EINTR)
			fatal("poll: %s", strerror(errno));
		for (size_t i = 0; i < ps.n; i++)
			if (ps.fds[i].revents)
				ps.handlers[i](ps.ctxs[i], ps.fds[i].revents);
		exec_after_poll();
		files_after_poll();
		// Replies go out now rather than after one more poll() round.
		conn_flush();
	}
	// The host went away: everything started for it goes too.
	exec_kill_all();
	files_close_all();
}

int main(int argc, char **argv)
{
	int fd = -1, stdio = 0;
	const char *cmdline = NULL;
	opt.init = getpid() == 1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--init"))
			opt.init = 1;
		else if (!strcmp(argv[i], "--stdio"))
			stdio = 1;
		else if (!strcmp(argv[i], "--fd") && i + 1 < argc)
			fd = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--config") && i + 1 < argc)
			opt.config_path = argv[++i];
		else if (!strcmp(argv[i], "--cmdline") && i + 1 < argc)
			cmdline = argv[++i];
		else if (!strcmp(argv[i], "--allow-clock-step"))
			opt.allow_clock_step = 1;
		else
			usage();
	}
	signal(SIGPIPE, SIG_IGN);
	if (exec_init())
		fatal("cannot watch SIGCHLD: %s", strerror(errno));

	if (opt.init) {
		opt.allow_clock_step = 1;
		struct init_result machine;
		init_machine(&machine, cmdline);
		if (fd >= 0) {
			make_raw(fd);
			serve(fd, fd);
			fatal("the host closed fd %d", fd);
		}
		// The host may reconnect (a new VMM process after restore): never exit.
		for (;;) {
			int channel = open_channel(machine.channel);
			serve(channel, channel);
			close(channel);
			sleep(1);
		}
	}
	// Orphans of our children come back to us to be reaped, as in the VM.
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	// Pipes must never land on fds 0-2: a child's dup2() onto them would be
	// a no-op that leaves them close-on-exec.
	for (int std = 0; std < 3; std++)
		if (fcntl(std, F_GETFD) < 0 && open("/dev/null", O_RDWR) != std)
			fatal("cannot open /dev/null as fd %d", std);
	if (config_load(opt.config_path))
		fatal("image config %s: %s", opt.config_path, strerror(errno));
	if (fd >= 0) {
		make_raw(fd);
		serve(fd, fd);
	} else if (stdio) {
		serve(0, 1);
	}
	else
		usage();
	return 0;
}
