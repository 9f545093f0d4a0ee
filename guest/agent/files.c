// File requests (see files.h). Everything runs as the agent (root) in the
// agent's root; relative paths are taken from the image's WorkingDir.
//
// FILE_READ and FILE_WRITE are streams that live until their RESULT or
// ERROR; the one-shot requests answer at once. Streams are never freed from
// inside a poll handler or dispatch (a later poll entry may still point at
// them): they are marked done and freed in files_after_poll().
#define _GNU_SOURCE
#include "files.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "proto.h"

#define MAX_FILE_STREAMS 256
// A LIST reply is built in memory at once; beyond this many entries the
// host should run `ls` or `find` through EXEC, which streams.
#define MAX_LIST_ENTRIES 100000

struct file_stream {
	struct file_stream *next;
	uint32_t id;
	int fd;
	int writing;
	int done;
	uint32_t credit;    // reads: bytes the host still accepts
	int64_t remaining;  // reads: bytes left of the requested length (-1: to EOF)
	uint64_t total;	    // bytes moved so far
};

static struct file_stream *streams;
static size_t n_streams;
static uint8_t chunk[DATA_CHUNK_MAX];

struct file_args {
	char *path;
	int64_t mode, offset, length;
	int64_t parents, recursive, follow, append;
};

static int parse_args(const uint8_t *payload, uint32_t len, struct file_args *a)
{
	*a = (struct file_args){.mode = -1, .length = -1};
	struct field_reader r = {payload, len};
	struct field f;
	int rc, bad = 0;
	while (!bad && (rc = field_next(&r, &f)) > 0) {
		int64_t *target = NULL;
		switch (f.tag) {
		case F_PATH:
			free(a->path);
			a->path = NULL;
			bad = field_as_cstr(&f, &a->path);
			continue;
		case F_MODE: target = &a->mode; break;
		case F_OFFSET: target = &a->offset; break;
		case F_LENGTH: target = &a->length; break;
		case F_PARENTS: target = &a->parents; break;
		case F_RECURSIVE: target = &a->recursive; break;
		case F_FOLLOW: target = &a->follow; break;
		case F_APPEND: target = &a->append; break;
		default: continue;
		}
		bad = field_as_int(&f, target);
	}
	if (bad || rc < 0 || !a->path || !a->path[0] || a->offset < 0 || a->mode > 07777) {
		free(a->path);
		a->path = NULL;
		return -1;
	}
	if (a->path[0] != '/' && image.workdir) {
		char *joined;
		if (asprintf(&joined, "%s/%s", image.workdir, a->path) < 0)
			fatal("out of memory (path)");
		free(a->path);
		a->path = joined;
	}
	return 0;
}

static struct file_stream *find(uint32_t id)
{
	for (struct file_stream *s = streams; s; s = s->next)
		if (s->id == id && !s->done)
			return s;
	return NULL;
}

int files_owns(uint32_t id)
{
	return find(id) != NULL;
}

static void fail(uint32_t id, int err, const char *what, const char *path)
{
	send_error(id, errno_code(err), err, "%s %s: %s", what, path, strerror(err));
}

static struct file_stream *add_stream(uint32_t id, int fd, int writing)
{
	struct file_stream *s = calloc(1, sizeof *s);
	if (!s)
		fatal("out of memory (file stream)");
	*s = (struct file_stream){.id = id, .fd = fd, .writing = writing, .credit = STREAM_WINDOW};
	s->next = streams;
	streams = s;
	n_streams++;
	return s;
}

static int file_type(mode_t mode)
{
	return S_ISREG(mode)    ? FT_FILE
	       : S_ISDIR(mode)  ? FT_DIR
	       : S_ISLNK(mode)  ? FT_SYMLINK
	       : S_ISCHR(mode)  ? FT_CHAR
	       : S_ISBLK(mode)  ? FT_BLOCK
	       : S_ISFIFO(mode) ? FT_FIFO
				: FT_SOCKET;
}

static int64_t mtime_ns(const struct stat *st)
{
	return (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
}

static void file_read(uint32_t id, const struct file_args *a)
{
	// O_NONBLOCK: a FIFO or a device must never stall the whole agent.
	int fd = open(a->path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	struct stat st;
	if (fd < 0 || fstat(fd, &st)) {
		fail(id, errno, "open", a->path);
		if (fd >= 0)
			close(fd);
		return;
	}
	if (S_ISDIR(st.st_mode) || S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) {
		int err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
		send_error(id, errno_code(err), err, "read %s: not a regular file", a->path);
		close(fd);
		return;
	}
	if (a->offset && lseek(fd, a->offset, SEEK_SET) < 0) {
		fail(id, errno, "seek", a->path);
		close(fd);
		return;
	}
	add_stream(id, fd, 0)->remaining = a->length;
}

static void file_write(uint32_t id, const struct file_args *a)
{
	int flags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY | (a->append ? O_APPEND : O_TRUNC);
	int fd = open(a->path, flags, a->mode >= 0 ? (mode_t)a->mode : 0644);
	if (fd < 0) {
		fail(id, errno, "open", a->path);
		return;
	}
	// Explicit, so the mode holds for existing files and ignores the umask.
	if (a->mode >= 0 && fchmod(fd, (mode_t)a->mode)) {
		fail(id, errno, "chmod", a->path);
		close(fd);
		return;
	}
	add_stream(id, fd, 1);
}

static void put_stat(struct buf *b, const struct stat *st)
{
	field_int(b, F_TYPE, file_type(st->st_mode));
	field_int(b, F_SIZE, st->st_size);
	field_int(b, F_MODE, st->st_mode & 07777);
	field_int(b, F_MTIME_NS, mtime_ns(st));
}

static void stat_path(uint32_t id, const struct file_args *a)
{
	struct stat st;
	if ((a->follow ? stat : lstat)(a->path, &st)) {
		fail(id, errno, "stat", a->path);
		return;
	}
	struct buf b = {0};
	put_stat(&b, &st);
	field_int(&b, F_UID, st.st_uid);
	field_int(&b, F_GID, st.st_gid);
	if (S_ISLNK(st.st_mode)) {
		char target[PATH_MAX];
		ssize_t n = readlink(a->path, target, sizeof target);
		if (n >= 0)
			field_bytes(&b, F_TARGET, target, (size_t)n);
	}
	send_result(id, &b);
	buf_free(&b);
}

// One RESULT per ~FRAME_MAX_PAYLOAD of entries, all but the last with FLAG_MORE.
static void list_dir(uint32_t id, const struct file_args *a)
{
	DIR *d = opendir(a->path);
	if (!d) {
		fail(id, errno, "list", a->path);
		return;
	}
	struct buf b = {0};
	struct dirent *e;
	size_t entries = 0;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (++entries > MAX_LIST_ENTRIES) {
			closedir(d);
			buf_free(&b);
			send_error(id, E_INVALID, E2BIG, "list %s: more than %d entries", a->path,
				   MAX_LIST_ENTRIES);
			return;
		}
		struct stat st;
		if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW))
			continue; // removed while we listed
		if (b.len > FRAME_MAX_PAYLOAD - 4096) {
			send_frame(MSG_RESULT, id, FLAG_MORE, b.data, b.len);
			b.len = 0;
		}
		size_t entry = field_begin(&b, F_ENTRY);
		field_str(&b, F_NAME, e->d_name);
		put_stat(&b, &st);
		field_end(&b, entry);
	}
	closedir(d);
	send_result(id, &b);
	buf_free(&b);
}

static int make_dirs(char *path, mode_t mode, int parents)
{
	if (parents)
		for (char *slash = strchr(path + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
			*slash = 0;
			struct stat st;
			int rc = mkdir(path, mode);
			int ok = !rc || (errno == EEXIST && !stat(path, &st) && S_ISDIR(st.st_mode));
			*slash = '/';
			if (!ok)
				return -1;
		}
	if (!mkdir(path, mode))
		return 0;
	struct stat st;
	if (parents && errno == EEXIST && !stat(path, &st) && S_ISDIR(st.st_mode))
		return 0;
	return -1;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path) ? errno : 0;
}

static void remove_path(uint32_t id, const struct file_args *a)
{
	struct stat st, root;
	if (lstat(a->path, &st)) {
		fail(id, errno, "remove", a->path);
		return;
	}
	if (!stat("/", &root) && st.st_dev == root.st_dev && st.st_ino == root.st_ino) {
		send_error(id, E_INVALID, EINVAL, "refusing to remove the root directory");
		return;
	}
	int err = 0;
	if (S_ISDIR(st.st_mode) && a->recursive)
		err = nftw(a->path, remove_one, 32, FTW_DEPTH | FTW_PHYS);
	else if (remove(a->path))
		err = errno;
	if (err) {
		fail(id, err > 0 ? err : errno, "remove", a->path);
		return;
	}
	send_result(id, NULL);
}

void files_request(uint16_t type, uint32_t id, const uint8_t *payload, uint32_t len)
{
	struct file_args a;
	if (parse_args(payload, len, &a)) {
		send_error(id, E_PROTOCOL, 0, "malformed fields for request type %u (path is required)", type);
		return;
	}
	if ((type == MSG_FILE_READ || type == MSG_FILE_WRITE) && n_streams >= MAX_FILE_STREAMS)
		send_error(id, E_BUSY, 0, "too many open file streams (%d)", MAX_FILE_STREAMS);
	else if (type == MSG_FILE_READ)
		file_read(id, &a);
	else if (type == MSG_FILE_WRITE)
		file_write(id, &a);
	else if (type == MSG_STAT)
		stat_path(id, &a);
	else if (type == MSG_LIST)
		list_dir(id, &a);
	else if (type == MSG_MKDIR) {
		if (make_dirs(a.path, a.mode >= 0 ? (mode_t)a.mode : 0755, a.parents != 0))
			fail(id, errno, "mkdir", a.path);
		else
			send_result(id, NULL);
	} else
		remove_path(id, &a);
	free(a.path);
}

void files_data(uint32_t id, uint16_t flags, const uint8_t *payload, uint32_t len)
{
	struct file_stream *s = find(id);
	if (!s) // the request failed already; its ERROR tells the host to stop
		return;
	if (!s->writing) {
		send_error(0, E_PROTOCOL, 0, "FILE_DATA from the host on read stream %u", id);
		return;
	}
	for (uint32_t off = 0; off < len;) {
		ssize_t n = write(s->fd, payload + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fail(id, n < 0 ? errno : EIO, "write", "file");
			s->done = 1;
			return;
		}
		off += (uint32_t)n;
	}
	s->total += len;
	if (flags & FLAG_EOF) {
		s->done = 1;
		int rc = close(s->fd);
		s->fd = -1;
		if (rc) {
			fail(id, errno, "close", "file");
			return;
		}
		struct buf b = {0};
		field_int(&b, F_SIZE, (int64_t)s->total);
		send_result(id, &b);
		buf_free(&b);
	} else if (len) {
		send_credit(id, MSG_FILE_DATA, len);
	}
}

void files_credit(uint32_t id, uint32_t bytes)
{
	struct file_stream *s = find(id);
	if (!s || s->writing)
		return;
	if (bytes > STREAM_WINDOW - s->credit) {
		send_error(0, E_PROTOCOL, 0, "CREDIT on file stream %u exceeds the window", id);
		s->credit = STREAM_WINDOW;
		return;
	}
	s->credit += bytes;
}

void files_cancel(uint32_t id)
{
	struct file_stream *s = find(id);
	if (s)
		s->done = 1;
}

static void on_readable(void *ctx, short revents)
{
	struct file_stream *s = ctx;
	(void)revents;
	size_t want = s->credit < DATA_CHUNK_MAX ? s->credit : DATA_CHUNK_MAX;
	if (s->remaining >= 0 && (uint64_t)s->remaining < want)
		want = (size_t)s->remaining;
	ssize_t n = want ? read(s->fd, chunk, want) : 0;
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n < 0) {
		fail(s->id, errno, "read", "file");
		s->done = 1;
		return;
	}
	if (n == 0) {
		struct buf b = {0};
		field_int(&b, F_SIZE, (int64_t)s->total);
		send_result(s->id, &b);
		buf_free(&b);
		s->done = 1;
		return;
	}
	send_frame(MSG_FILE_DATA, s->id, 0, chunk, (size_t)n);
	s->credit -= (uint32_t)n;
	s->total += (uint64_t)n;
	if (s->remaining > 0)
		s->remaining -= n;
}

void files_before_poll(struct pollset *ps)
{
	if (!conn_has_room())
		return;
	// A regular file always polls readable: reads then go at the pace of
	// the host's credit and the connection.
	for (struct file_stream *s = streams; s; s = s->next)
		if (!s->done && !s->writing && (s->credit || s->remaining == 0))
			pollset_add(ps, s->fd, POLLIN, on_readable, s);
}

static void free_stream(struct file_stream *s)
{
	if (s->fd >= 0)
		close(s->fd);
	free(s);
}

void files_after_poll(void)
{
	for (struct file_stream **link = &streams; *link;) {
		struct file_stream *s = *link;
		if (s->done) {
			*link = s->next;
			n_streams--;
			free_stream(s);
			continue;
		}
		link = &s->next;
	}
}

void files_close_all(void)
{
	while (streams) {
		struct file_stream *s = streams;
		streams = s->next;
		free_stream(s);
	}
	n_streams = 0;
}
