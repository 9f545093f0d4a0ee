// Running processes: one `struct proc` per EXEC stream, from STARTED to EXIT.
//
// Flow control: stdout/stderr are read from the child only while the host
// has granted credit, so a slow host blocks the child on a full pipe rather
// than growing our memory. Stdin is buffered up to the window the host was
// given and credited back as the child takes it.
//
// EXIT is sent when the child has been reaped *and* its output pipes reached
// EOF, so every byte of output precedes EXIT.
#define _GNU_SOURCE
#include "exec.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "proto.h"
#include "spawn.h"

#define MAX_PROCS 1024

struct proc {
	struct proc *next;
	uint32_t id;
	pid_t pid;
	int pty_fd;		   // -1 without a pty; with one, out_fd/in_fd alias it
	int out_fd, err_fd, in_fd; // -1 once closed
	uint32_t out_credit, err_credit;
	int has_stdin;
	struct buf in;		   // stdin bytes not yet taken by the child
	int in_eof;		   // the host closed stdin
	int exited, status, timed_out;
	int64_t deadline_ms;	   // 0: no timeout
};

static struct proc *procs;
static size_t n_procs;
static int sigchld_fd = -1;
static uint8_t chunk[DATA_CHUNK_MAX];

int exec_init(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		return -1;
	sigchld_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	return sigchld_fd < 0 ? -1 : 0;
}

static struct proc *find(uint32_t id)
{
	for (struct proc *p = procs; p; p = p->next)
		if (p->id == id)
			return p;
	return NULL;
}

int exec_owns(uint32_t id)
{
	return find(id) != NULL;
}

static void close_fd(struct proc *p, int *fd)
{
	if (*fd >= 0 && *fd != p->pty_fd)
		close(*fd);
	*fd = -1;
}

void exec_request(uint32_t id, const uint8_t *payload, uint32_t len)
{
	struct exec_request rq;
	char why[600];
	int code = exec_request_parse(payload, len, &rq, why, sizeof why);
	if (!code && n_procs >= MAX_PROCS) {
		code = E_BUSY;
		snprintf(why, sizeof why, "too many processes (%d)", MAX_PROCS);
	}
	struct spawned s;
	int err = 0;
	if (!code)
		code = spawn_process(&rq, &s, &err, why, sizeof why);
	if (code) {
		send_error(id, code, err, "%s", why);
		exec_request_free(&rq);
		return;
	}
	struct proc *p = calloc(1, sizeof *p);
	if (!p)
		fatal("out of memory (process)");
	*p = (struct proc){
		.id = id,
		.pid = s.pid,
		.pty_fd = s.pty_fd,
		.out_fd = s.out_fd,
		.err_fd = s.err_fd,
		.in_fd = s.in_fd,
		.out_credit = STREAM_WINDOW,
		.err_credit = STREAM_WINDOW,
		.has_stdin = rq.want_stdin,
		.deadline_ms = rq.timeout_ms ? monotonic_ms() + rq.timeout_ms : 0,
	};
	p->next = procs;
	procs = p;
	n_procs++;
	exec_request_free(&rq);
	struct buf b = {0};
	field_int(&b, F_PID, p->pid);
	send_frame(MSG_STARTED, id, 0, b.data, b.len);
	buf_free(&b);
}

// SIGNAL, RESIZE: a single integer field or two; malformed ones are reported
// on id 0 because these frames have no reply of their own.
static int int_field(const uint8_t *payload, uint32_t len, uint16_t tag, int64_t *out)
{
	struct field_reader r = {payload, len};
	struct field f;
	int rc, found = 0;
	while ((rc = field_next(&r, &f)) > 0)
		if (f.tag == tag) {
			if (field_as_int(&f, out))
				return -1;
			found = 1;
		}
	return rc < 0 || !found ? -1 : 0;
}

void exec_signal(uint32_t id, const uint8_t *payload, uint32_t len)
{
	int64_t signo;
	if (int_field(payload, len, F_SIGNAL, &signo) || signo < 1 || signo >= NSIG) {
		send_error(0, E_PROTOCOL, 0, "SIGNAL on stream %u needs a signal number 1..%d", id,
			   NSIG - 1);
		return;
	}
	struct proc *p = find(id);
	if (p) // gone already: the EXIT is on its way, nothing to do
		kill(-p->pid, (int)signo);
}

void exec_resize(uint32_t id, const uint8_t *payload, uint32_t len)
{
	int64_t rows, cols;
	if (int_field(payload, len, F_ROWS, &rows) || int_field(payload, len, F_COLS, &cols) ||
	    rows < 0 || rows > 0xffff || cols < 0 || cols > 0xffff) {
		send_error(0, E_PROTOCOL, 0, "RESIZE on stream %u needs rows and cols 0..65535", id);
		return;
	}
	struct proc *p = find(id);
	if (!p || p->pty_fd < 0)
		return;
	struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
	ioctl(p->pty_fd, TIOCSWINSZ, &ws); // the kernel sends SIGWINCH to the foreground group
}

// With a pty, EOF is the terminal's EOF character: the master has no
// half-close, and closing it would hang up the child.
static void finish_stdin_if_done(struct proc *p)
{
	if (!p->in_eof || p->in.len || p->in_fd < 0)
		return;
	if (p->pty_fd >= 0) {
		ssize_t w = write(p->pty_fd, "\x04", 1);
		(void)w;
	}
	close_fd(p, &p->in_fd);
}

void exec_stdin(uint32_t id, uint16_t flags, const uint8_t *payload, uint32_t len)
{
	struct proc *p = find(id);
	if (!p) // raced with the exit; the host stops when it sees EXIT
		return;
	if (!p->has_stdin || p->in_eof) {
		send_error(0, E_PROTOCOL, 0, "STDIN on stream %u: %s", id,
			   p->has_stdin ? "after EOF" : "stdin was not requested");
		return;
	}
	if (p->in.len + len > STREAM_WINDOW) {
		send_error(0, E_PROTOCOL, 0, "STDIN on stream %u overruns its window of %u bytes", id,
			   STREAM_WINDOW);
		return;
	}
	if (flags & FLAG_EOF)
		p->in_eof = 1;
	if (p->in_fd < 0) {
		// The child closed its stdin: drop the bytes, but keep the host's
		// window open so its sender does not wait forever.
		if (len)
			send_credit(id, MSG_STDIN, len);
		return;
	}
	buf_put(&p->in, payload, len);
	finish_stdin_if_done(p);
}

void exec_credit(uint32_t id, uint16_t data_type, uint32_t bytes)
{
	struct proc *p = find(id);
	if (!p)
		return;
	uint32_t *credit = data_type == MSG_STDOUT ? &p->out_credit : &p->err_credit;
	if (bytes > STREAM_WINDOW - *credit) {
		send_error(0, E_PROTOCOL, 0, "CREDIT on stream %u exceeds the window", id);
		*credit = STREAM_WINDOW;
		return;
	}
	*credit += bytes;
}

static void pump_output(struct proc *p, int *fd, uint32_t *credit, uint16_t type)
{
	size_t want = *credit < DATA_CHUNK_MAX ? *credit : DATA_CHUNK_MAX;
	ssize_t n = read(*fd, chunk, want);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) { // EOF, or EIO: a pty whose last slave fd closed
		close_fd(p, fd);
		return;
	}
	*credit -= (uint32_t)n;
	send_frame(type, p->id, 0, chunk, (size_t)n);
}

static void on_stdout(void *ctx, short revents)
{
	struct proc *p = ctx;
	(void)revents;
	pump_output(p, &p->out_fd, &p->out_credit, MSG_STDOUT);
}

static void on_stderr(void *ctx, short revents)
{
	struct proc *p = ctx;
	(void)revents;
	pump_output(p, &p->err_fd, &p->err_credit, MSG_STDERR);
}

static void on_stdin_writable(void *ctx, short revents)
{
	struct proc *p = ctx;
	(void)revents;
	if (p->in_fd < 0)
		return;
	ssize_t n = write(p->in_fd, p->in.data, p->in.len);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) { // the child closed its stdin (EPIPE): drop what is left
		send_credit(p->id, MSG_STDIN, (uint32_t)p->in.len);
		p->in.len = 0;
		close_fd(p, &p->in_fd);
		return;
	}
	buf_consume(&p->in, (size_t)n);
	send_credit(p->id, MSG_STDIN, (uint32_t)n);
	finish_stdin_if_done(p);
}

static void reap(void *ctx, short revents)
{
	(void)ctx;
	(void)revents;
	struct signalfd_siginfo info;
	while (read(sigchld_fd, &info, sizeof info) > 0)
		;
	// As PID 1 this also reaps orphans nobody else waits for.
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		for (struct proc *p = procs; p; p = p->next)
			if (p->pid == pid && !p->exited) {
				p->exited = 1;
				p->status = status;
			}
}

void exec_before_poll(struct pollset *ps)
{
	pollset_add(ps, sigchld_fd, POLLIN, reap, NULL);
	int room = conn_has_room();
	int64_t now = monotonic_ms();
	for (struct proc *p = procs; p; p = p->next) {
		if (p->out_fd >= 0 && p->out_credit && room)
			pollset_add(ps, p->out_fd, POLLIN, on_stdout, p);
		if (p->err_fd >= 0 && p->err_credit && room)
			pollset_add(ps, p->err_fd, POLLIN, on_stderr, p);
		if (p->in_fd >= 0 && p->in.len)
			pollset_add(ps, p->in_fd, POLLOUT, on_stdin_writable, p);
		if (p->deadline_ms) {
			int64_t left = p->deadline_ms - now;
			pollset_timeout(ps, left > INT_MAX ? INT_MAX : (int)left);
		}
	}
}

static void send_exit(struct proc *p)
{
	struct buf b = {0};
	if (WIFEXITED(p->status))
		field_int(&b, F_EXIT_CODE, WEXITSTATUS(p->status));
	else if (WIFSIGNALED(p->status)) {
		field_int(&b, F_SIGNAL, WTERMSIG(p->status));
		field_int(&b, F_CORE_DUMPED, WCOREDUMP(p->status) != 0);
	}
	field_int(&b, F_TIMED_OUT, p->timed_out);
	send_frame(MSG_EXIT, p->id, 0, b.data, b.len);
	buf_free(&b);
}

static void free_proc(struct proc *p)
{
	close_fd(p, &p->out_fd);
	close_fd(p, &p->err_fd);
	close_fd(p, &p->in_fd);
	if (p->pty_fd >= 0)
		close(p->pty_fd);
	buf_free(&p->in);
	free(p);
}

void exec_after_poll(void)
{
	int64_t now = monotonic_ms();
	for (struct proc **link = &procs; *link;) {
		struct proc *p = *link;
		if (p->deadline_ms && now >= p->deadline_ms) {
			// The group, not just the child: a shell's children go too.
			kill(-p->pid, SIGKILL);
			kill(p->pid, SIGKILL);
			p->timed_out = 1;
			p->deadline_ms = 0;
		}
		if (p->exited && p->in_fd >= 0 && p->pty_fd < 0)
			close_fd(p, &p->in_fd); // nobody will read it any more
		if (p->exited && p->out_fd < 0 && p->err_fd < 0) {
			send_exit(p);
			*link = p->next;
			n_procs--;
			free_proc(p);
			continue;
		}
		link = &p->next;
	}
}

void exec_kill_all(void)
{
	while (procs) {
		struct proc *p = procs;
		procs = p->next;
		if (!p->exited)
			kill(-p->pid, SIGKILL);
		free_proc(p);
	}
	n_procs = 0;
}
