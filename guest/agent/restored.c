// RESTORED (see restored.h). Handled synchronously in frame order, so an
// EXEC the host sends right after it already sees the new entropy and time.
#define _GNU_SOURCE
#include "restored.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "proto.h"

#define MAX_ENTROPY_BYTES 4096

// Credits the bytes as full entropy (the host read them from its own RNG)
// and forces the CRNG to reseed now rather than at its next interval.
static int add_entropy(const uint8_t *bytes, uint32_t len, int *reseeded)
{
	int fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	struct rand_pool_info *info = malloc(sizeof *info + len);
	if (!info)
		fatal("out of memory (entropy)");
	info->entropy_count = (int)len * 8;
	info->buf_size = (int)len;
	memcpy(info->buf, bytes, len);
	int rc = ioctl(fd, RNDADDENTROPY, info);
	int err = errno;
	free(info);
	if (!rc)
		*reseeded = ioctl(fd, RNDRESEEDCRNG) == 0;
	close(fd);
	errno = err;
	return rc;
}

void restored_request(uint32_t id, const uint8_t *payload, uint32_t len)
{
	struct field_reader r = {payload, len};
	struct field f;
	const uint8_t *entropy = NULL;
	uint32_t entropy_len = 0;
	int64_t time_ns = -1;
	int rc, bad = 0;
	while (!bad && (rc = field_next(&r, &f)) > 0) {
		if (f.tag == F_ENTROPY) {
			entropy = f.value;
			entropy_len = f.len;
		} else if (f.tag == F_TIME_NS)
			bad = field_as_int(&f, &time_ns);
	}
	if (bad || rc < 0 || time_ns < 0 || entropy_len > MAX_ENTROPY_BYTES) {
		send_error(id, E_PROTOCOL, 0,
			   "RESTORED needs time_ns >= 0 and at most %d bytes of entropy", MAX_ENTROPY_BYTES);
		return;
	}

	int reseeded = 0;
	if (entropy_len && add_entropy(entropy, entropy_len, &reseeded)) {
		int err = errno;
		send_error(id, errno_code(err), err, "adding entropy: %s", strerror(err));
		return;
	}

	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	int64_t offset = time_ns - ((int64_t)now.tv_sec * 1000000000 + now.tv_nsec);
	int stepped = 0;
	if (opt.allow_clock_step) {
		struct timespec ts = {.tv_sec = time_ns / 1000000000, .tv_nsec = time_ns % 1000000000};
		if (clock_settime(CLOCK_REALTIME, &ts)) {
			int err = errno;
			send_error(id, errno_code(err), err, "setting the clock: %s", strerror(err));
			return;
		}
		stepped = 1;
	}

	struct buf b = {0};
	field_int(&b, F_ENTROPY_ADDED, entropy_len);
	field_int(&b, F_RESEEDED, reseeded);
	field_int(&b, F_CLOCK_STEPPED, stepped);
	field_int(&b, F_CLOCK_OFFSET_NS, offset);
	send_result(id, &b);
	buf_free(&b);
}
