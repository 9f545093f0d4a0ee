// Image config (docs/PROTOCOL.md, "Image config") and /etc/passwd lookups.
// The agent is static, and glibc's getpwnam() would need NSS modules at run
// time, so the two files are parsed here.
#define _GNU_SOURCE
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

#define CONFIG_MAX_BYTES (1u << 20)

struct image_config image;

static char *read_small_file(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	struct buf b = {0};
	for (;;) {
		buf_reserve(&b, 4096);
		ssize_t n = read(fd, b.data + b.len, b.cap - b.len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 || b.len + (size_t)n > CONFIG_MAX_BYTES) {
			int err = n < 0 ? errno : EFBIG;
			close(fd);
			buf_free(&b);
			errno = err;
			return NULL;
		}
		if (n == 0)
			break;
		b.len += (size_t)n;
	}
	close(fd);
	buf_put(&b, "", 1); // terminates the last record even without its NUL
	*len = b.len - 1;
	return (char *)b.data;
}

static void add_env(const char *entry)
{
	char **env = realloc(image.env, (image.n_env + 2) * sizeof *env);
	char *copy = strdup(entry);
	if (!env || !copy)
		fatal("out of memory (image env)");
	image.env = env;
	image.env[image.n_env++] = copy;
	image.env[image.n_env] = NULL;
}

int config_load(const char *path)
{
	if (!path)
		return 0;
	size_t len;
	char *data = read_small_file(path, &len);
	if (!data)
		return -1;
	for (char *rec = data, *next; rec < data + len; rec = next) {
		next = rec + strlen(rec) + 1; // before the record is cut at its '='
		char *eq = strchr(rec, '=');
		if (!*rec)
			continue;
		if (!eq) {
			log_line("cellvm-agent: config: ignoring record without '=': %.60s", rec);
			continue;
		}
		*eq = 0;
		const char *value = eq + 1;
		if (!strcmp(rec, "env") && strchr(value, '='))
			add_env(value);
		else if (!strcmp(rec, "workdir"))
			image.workdir = *value ? strdup(value) : NULL; // empty: not set
		else if (!strcmp(rec, "user"))
			image.user = *value ? strdup(value) : NULL;
		else if (!strcmp(rec, "hostname")) {
			if (opt.init && sethostname(value, strlen(value)))
				log_line("cellvm-agent: sethostname: %s", strerror(errno));
		} else
			log_line("cellvm-agent: config: ignoring unknown key %.40s", rec);
	}
	free(data);
	return 0;
}

static int parse_id(const char *s, long *out)
{
	char *end;
	if (!*s)
		return -1;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (*end || errno || v < 0 || v > 0x7fffffff)
		return -1;
	*out = v;
	return 0;
}

// Finds the line of a colon-separated database whose field 0 (the name) or
// field 2 (the id) matches; copies its fields into f[0..n). Returns 0 if found.
static int db_lookup(const char *path, const char *name, long id, char f[][256], int n)
{
	FILE *fp = fopen(path, "re");
	if (!fp)
		return -1;
	char line[1024];
	int found = -1;
	while (found && fgets(line, sizeof line, fp)) {
		line[strcspn(line, "\n")] = 0;
		char *tok = line;
		int i = 0;
		for (char *p = line;; p++) {
			if (*p == ':' || *p == 0) {
				int end = !*p;
				*p = 0;
				if (i < n)
					snprintf(f[i], 256, "%.255s", tok);
				i++;
				tok = p + 1;
				if (end)
					break;
			}
		}
		if (i < 3)
			continue;
		long line_id;
		if (name ? !strcmp(f[0], name) : (!parse_id(f[2], &line_id) && line_id == id))
			found = 0;
	}
	fclose(fp);
	return found;
}

int resolve_user(const char *spec, struct user_ids *out)
{
	char user[256], fields[7][256];
	const char *group = NULL;
	snprintf(user, sizeof user, "%s", spec);
	char *colon = strchr(user, ':');
	if (colon) {
		*colon = 0;
		group = colon + 1;
	}
	long id;
	snprintf(out->home, sizeof out->home, "/");
	if (!parse_id(user, &id)) {
		out->uid = (uid_t)id;
		out->gid = 0;
		if (!db_lookup("/etc/passwd", NULL, id, fields, 7)) {
			out->gid = (gid_t)atol(fields[3]);
			snprintf(out->home, sizeof out->home, "%s", fields[5]);
		}
	} else {
		if (db_lookup("/etc/passwd", user, 0, fields, 7))
			return -1;
		if (parse_id(fields[2], &id))
			return -1;
		out->uid = (uid_t)id;
		out->gid = (gid_t)atol(fields[3]);
		snprintf(out->home, sizeof out->home, "%s", fields[5]);
	}
	if (group && *group) {
		if (!parse_id(group, &id))
			out->gid = (gid_t)id;
		else if (!db_lookup("/etc/group", group, 0, fields, 3) && !parse_id(fields[2], &id))
			out->gid = (gid_t)id;
		else
			return -1;
	}
	if (!out->home[0])
		snprintf(out->home, sizeof out->home, "/");
	return 0;
}
