// The connection to the host: one byte stream (a socket or pipe in host-process
// mode, /dev/hvc0 in the VM) carrying frames both ways. Input is parsed into
// whole frames and handed to dispatch(); output is queued and flushed when the
// fd is writable, so nothing here ever blocks the loop.
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"
#include "proto.h"

static struct {
	int in_fd, out_fd;
	struct buf in, out;
	uint32_t discard; // bytes of an oversized payload still to skip
	int closed;
} conn;

void conn_init(int in_fd, int out_fd)
{
	conn.in_fd = in_fd;
	conn.out_fd = out_fd;
	conn.closed = 0;
	conn.discard = 0;
	conn.in.len = 0;
	conn.out.len = 0;
	buf_reserve(&conn.in, FRAME_HEADER_SIZE + FRAME_MAX_PAYLOAD);
	fcntl(in_fd, F_SETFL, fcntl(in_fd, F_GETFL) | O_NONBLOCK);
	fcntl(out_fd, F_SETFL, fcntl(out_fd, F_GETFL) | O_NONBLOCK);
	fcntl(in_fd, F_SETFD, FD_CLOEXEC);
	fcntl(out_fd, F_SETFD, FD_CLOEXEC);
}

int conn_closed(void)
{
	return conn.closed;
}

int conn_has_room(void)
{
	return !conn.closed && conn.out.len < OUT_HIGH_WATER;
}

void send_frame(uint16_t type, uint32_t id, uint16_t flags, const void *payload, size_t len)
{
	if (conn.closed)
		return;
	uint8_t hdr[FRAME_HEADER_SIZE];
	put_u32(hdr, (uint32_t)len);
	put_u32(hdr + 4, id);
	put_u16(hdr + 8, type);
	put_u16(hdr + 10, flags);
	buf_put(&conn.out, hdr, sizeof hdr);
	buf_put(&conn.out, payload, len);
}

void send_result(uint32_t id, const struct buf *fields)
{
	send_frame(MSG_RESULT, id, 0, fields ? fields->data : NULL, fields ? fields->len : 0);
}

int errno_code(int err)
{
	switch (err) {
	case ENOENT:
		return E_NOT_FOUND;
	case EACCES:
	case EPERM:
	case EROFS:
		return E_PERMISSION;
	case EEXIST:
		return E_EXISTS;
	case ENOTDIR:
		return E_NOT_A_DIRECTORY;
	case EISDIR:
		return E_IS_A_DIRECTORY;
	case ENOTEMPTY:
		return E_NOT_EMPTY;
	case EINVAL:
	case ENAMETOOLONG:
	case ELOOP:
		return E_INVALID;
	default:
		return E_IO;
	}
}

void send_error(uint32_t id, int code, int err, const char *fmt, ...)
{
	char message[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(message, sizeof message, fmt, ap);
	va_end(ap);
	struct buf b = {0};
	field_int(&b, F_CODE, code);
	field_int(&b, F_ERRNO, err);
	field_str(&b, F_MESSAGE, message);
	send_frame(MSG_ERROR, id, 0, b.data, b.len);
	buf_free(&b);
}

void send_credit(uint32_t id, uint16_t data_type, uint32_t bytes)
{
	uint8_t p[8] = {0};
	put_u16(p, data_type);
	put_u32(p + 4, bytes);
	send_frame(MSG_CREDIT, id, 0, p, sizeof p);
}

// Hands every complete frame in the input buffer to dispatch(). A payload
// longer than FRAME_MAX_PAYLOAD is answered with a protocol error and
// skipped, so one bad frame never ends the connection.
static void parse_input(void)
{
	size_t off = 0;
	for (;;) {
		uint8_t *p = conn.in.data + off;
		size_t left = conn.in.len - off;
		if (conn.discard) {
			size_t n = left < conn.discard ? left : conn.discard;
			conn.discard -= (uint32_t)n;
			off += n;
			if (conn.discard)
				break;
			continue;
		}
		if (left < FRAME_HEADER_SIZE)
			break;
		uint32_t len = get_u32(p);
		uint32_t id = get_u32(p + 4);
		uint16_t type = get_u16(p + 8), flags = get_u16(p + 10);
		if (len > FRAME_MAX_PAYLOAD) {
			send_error(error_id(type, id), E_PROTOCOL, 0,
				   "frame payload of %u bytes exceeds the maximum of %u", len, FRAME_MAX_PAYLOAD);
			conn.discard = len;
			off += FRAME_HEADER_SIZE;
			continue;
		}
		if (left - FRAME_HEADER_SIZE < len)
			break;
		off += FRAME_HEADER_SIZE + len;
		if (flags & ~FLAG_KNOWN)
			send_error(error_id(type, id), E_PROTOCOL, 0, "unknown flags 0x%x on frame type %u",
				   flags, type);
		else
			dispatch(type, id, flags, p + FRAME_HEADER_SIZE, len);
	}
	buf_consume(&conn.in, off);
}

static void on_readable(void *ctx, short revents)
{
	(void)ctx;
	(void)revents;
	size_t room = conn.in.cap - conn.in.len;
	ssize_t n = read(conn.in_fd, conn.in.data + conn.in.len, room);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		conn.closed = 1;
		return;
	}
	conn.in.len += (size_t)n;
	parse_input();
}

static void on_writable(void *ctx, short revents)
{
	(void)ctx;
	(void)revents;
	while (conn.out.len) {
		ssize_t n = write(conn.out_fd, conn.out.data, conn.out.len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			conn.closed = 1;
			conn.out.len = 0;
			return;
		}
		buf_consume(&conn.out, (size_t)n);
	}
}

void conn_flush(void)
{
	if (!conn.closed && conn.out.len)
		on_writable(NULL, 0);
}

void conn_poll(struct pollset *ps)
{
	if (conn.closed)
		return;
	// Stop taking requests while replies pile up: the host must read first.
	if (conn.out.len < OUT_HIGH_WATER)
		pollset_add(ps, conn.in_fd, POLLIN, on_readable, NULL);
	if (conn.out.len)
		pollset_add(ps, conn.out_fd, POLLOUT, on_writable, NULL);
}
