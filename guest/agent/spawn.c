// EXEC request parsing and vfork/exec (see spawn.h).
#define _GNU_SOURCE
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"
#include "config.h"
#include "proto.h"

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static int append_str(char ***list, size_t *n, size_t max, const struct field *f)
{
	if (*n >= max)
		return -1;
	char *s;
	if (field_as_cstr(f, &s))
		return -1;
	char **grown = realloc(*list, (*n + 2) * sizeof *grown);
	if (!grown)
		fatal("out of memory (exec request)");
	grown[(*n)++] = s;
	grown[*n] = NULL;
	*list = grown;
	return 0;
}

int exec_request_parse(const uint8_t *payload, uint32_t len, struct exec_request *rq, char *why,
		       size_t why_len)
{
	*rq = (struct exec_request){.uid = -1, .gid = -1, .rows = 24, .cols = 80};
	struct field_reader r = {payload, len};
	struct field f;
	int rc, bad = 0;
	while (!bad && (rc = field_next(&r, &f)) > 0) {
		int64_t v = 0;
		switch (f.tag) {
		case F_ARGV:
			bad = append_str(&rq->argv, &rq->argc, EXEC_MAX_ARGS, &f);
			break;
		case F_ENV:
			bad = append_str(&rq->env, &rq->n_env, EXEC_MAX_ENV, &f);
			break;
		case F_CWD:
			free(rq->cwd);
			bad = field_as_cstr(&f, &rq->cwd);
			break;
		case F_USER:
			free(rq->user);
			bad = field_as_cstr(&f, &rq->user);
			break;
		case F_UID:
		case F_GID:
		case F_STDIN:
		case F_PTY:
		case F_CLEAR_ENV:
		case F_ROWS:
		case F_COLS:
		case F_TIMEOUT_MS:
			bad = field_as_int(&f, &v);
			if (f.tag == F_UID)
				rq->uid = v;
			else if (f.tag == F_GID)
				rq->gid = v;
			else if (f.tag == F_STDIN)
				rq->want_stdin = v != 0;
			else if (f.tag == F_PTY)
				rq->pty = v != 0;
			else if (f.tag == F_CLEAR_ENV)
				rq->clear_env = v != 0;
			else if (f.tag == F_ROWS)
				rq->rows = v;
			else if (f.tag == F_COLS)
				rq->cols = v;
			else
				rq->timeout_ms = v;
			break;
		}
	}
	if (bad || rc < 0) {
		snprintf(why, why_len, "malformed EXEC fields (bad length, NUL in a string, or too many)");
		return E_PROTOCOL;
	}
	if (rq->argc == 0 || !rq->argv[0][0]) {
		snprintf(why, why_len, "EXEC needs a non-empty argv[0]");
		return E_INVALID;
	}
	if (rq->uid < -1 || rq->uid > 0x7fffffff || rq->gid < -1 || rq->gid > 0x7fffffff ||
	    rq->rows < 0 || rq->rows > 0xffff || rq->cols < 0 || rq->cols > 0xffff ||
	    rq->timeout_ms < 0 || rq->timeout_ms > EXEC_MAX_TIMEOUT_MS) {
		snprintf(why, why_len, "EXEC field out of range (uid, gid, rows, cols or timeout)");
		return E_INVALID;
	}
	return 0;
}

static void free_list(char **list)
{
	for (size_t i = 0; list && list[i]; i++)
		free(list[i]);
	free(list);
}

void exec_request_free(struct exec_request *rq)
{
	free_list(rq->argv);
	free_list(rq->env);
	free(rq->cwd);
	free(rq->user);
}

// The child's environment: the image's Env, then the request's entries
// ("K=V" sets, "K" unsets), then PATH, HOME and (with a pty) TERM if unset.
static char **build_env(const struct exec_request *rq, const char *home, struct buf *store)
{
	size_t cap = image.n_env + rq->n_env + 4, n = 0;
	const char **env = calloc(cap, sizeof *env);
	if (!env)
		fatal("out of memory (env)");
	if (!rq->clear_env)
		for (size_t i = 0; i < image.n_env; i++)
			env[n++] = image.env[i];
	for (size_t i = 0; i < rq->n_env; i++) {
		const char *e = rq->env[i];
		size_t key_len = strcspn(e, "=");
		size_t j = 0;
		while (j < n && !(strncmp(env[j], e, key_len) == 0 && env[j][key_len] == '='))
			j++;
		if (j < n) // remove the old entry, keeping the order of the others
			memmove(&env[j], &env[j + 1], (n-- - j - 1) * sizeof *env);
		if (e[key_len] == '=')
			env[n++] = e;
	}
	struct {
		const char *key, *value;
		int wanted;
	} defaults[] = {
		{"PATH", DEFAULT_PATH, 1},
		{"HOME", home, 1},
		{"TERM", "xterm", rq->pty},
	};
	store->len = 0;
	size_t offsets[3], count = 0;
	for (size_t d = 0; d < 3; d++) {
		size_t key_len = strlen(defaults[d].key), j = 0;
		while (j < n && !(strncmp(env[j], defaults[d].key, key_len) == 0 && env[j][key_len] == '='))
			j++;
		if (!defaults[d].wanted || j < n)
			continue;
		offsets[count++] = store->len;
		buf_put(store, defaults[d].key, key_len);
		buf_put(store, "=", 1);
		buf_put(store, defaults[d].value, strlen(defaults[d].value) + 1);
	}
	for (size_t k = 0; k < count; k++) // pointers only once the store stopped growing
		env[n++] = (const char *)store->data + offsets[k];
	env[n] = NULL;
	return (char **)env;
}

static const char *env_get(char **env, const char *key)
{
	size_t key_len = strlen(key);
	for (size_t i = 0; env[i]; i++)
		if (!strncmp(env[i], key, key_len) && env[i][key_len] == '=')
			return env[i] + key_len + 1;
	return NULL;
}

// execvpe() searches the *agent's* PATH; the child's own PATH is the one
// that counts. Returns the errno that explains the failure best.
static int exec_search(char **argv, char **env)
{
	if (strchr(argv[0], '/')) {
		execve(argv[0], argv, env);
		return errno;
	}
	const char *path = env_get(env, "PATH");
	if (!path)
		path = DEFAULT_PATH;
	int best = ENOENT;
	char candidate[4096];
	for (const char *dir = path;; dir += strcspn(dir, ":") + 1) {
		size_t dir_len = strcspn(dir, ":");
		int n = snprintf(candidate, sizeof candidate, "%.*s%s%s", (int)dir_len, dir,
				 dir_len ? "/" : "", argv[0]);
		if (n > 0 && (size_t)n < sizeof candidate) {
			execve(candidate, argv, env);
			if (errno != ENOENT && errno != ENOTDIR && errno != ELOOP)
				best = errno == EACCES || best == ENOENT ? errno : best;
		}
		if (!dir[dir_len])
			break;
	}
	return best;
}

struct child_failure {
	int code, err;
};

__attribute__((noreturn)) static void child_fail(int status_fd, int code, int err)
{
	struct child_failure failure = {code, err};
	ssize_t w = write(status_fd, &failure, sizeof failure);
	(void)w;
	_exit(127);
}

struct child_fds {
	int in_r, out_w, err_w; // non-pty: the child's ends
	const char *pty_slave;	// pty: its path
	int status_w;
};

__attribute__((noreturn)) static void child(const struct exec_request *rq, const struct child_fds *c,
					      char **env, const struct user_ids *ids, int set_ids)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	// Its own session and process group: SIGNAL and timeouts hit the whole tree.
	setsid();
	if (c->pty_slave) {
		int slave = open(c->pty_slave, O_RDWR);
		if (slave < 0 || ioctl(slave, TIOCSCTTY, 0))
			child_fail(c->status_w, E_EXEC_FAILED, errno);
		dup2(slave, 0);
		dup2(slave, 1);
		dup2(slave, 2);
		if (slave > 2)
			close(slave);
	} else {
		dup2(c->in_r, 0);
		dup2(c->out_w, 1);
		dup2(c->err_w, 2);
	}
	if (set_ids) {
		if (setgroups(1, &ids->gid) || setgid(ids->gid) || setuid(ids->uid))
			child_fail(c->status_w, E_PERMISSION, errno);
	}
	const char *cwd = rq->cwd ? rq->cwd : image.workdir;
	if (cwd && chdir(cwd))
		child_fail(c->status_w, E_BAD_CWD, errno);
	int err = exec_search(rq->argv, env);
	child_fail(c->status_w,
		   err == ENOENT ? E_COMMAND_NOT_FOUND
		   : err == EACCES || err == EPERM ? E_PERMISSION
						    : E_EXEC_FAILED,
		   err);
}

// vfork: no page tables copied and no copy-on-write faults in the agent
// afterwards (both costly under PVM). The agent is single-threaded and
// suspended until the child execs or exits; the child only makes system
// calls and writes its own stack and the status pipe, never our data. A
// function of its own, so no caller's locals live across the vfork.
static pid_t start_child(const struct exec_request *rq, const struct child_fds *c, char **env,
			 const struct user_ids *ids, int set_ids)
{
	pid_t pid = vfork();
	if (pid == 0)
		child(rq, c, env, ids, set_ids);
	return pid;
}

static int open_pty(const struct exec_request *rq, int *master, char *slave, size_t slave_len)
{
	*master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*master < 0)
		return -1;
	struct winsize ws = {.ws_row = (unsigned short)rq->rows, .ws_col = (unsigned short)rq->cols};
	if (grantpt(*master) || unlockpt(*master) || ptsname_r(*master, slave, slave_len) ||
	    ioctl(*master, TIOCSWINSZ, &ws)) {
		int err = errno;
		close(*master);
		errno = err;
		return -1;
	}
	return 0;
}

static void close_all(int *fds, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (fds[i] >= 0) {
			close(fds[i]);
			fds[i] = -1;
		}
}

int spawn_process(const struct exec_request *rq, struct spawned *out, int *err, char *why,
		  size_t why_len)
{
	struct user_ids ids;
	const char *user = rq->user ? rq->user : image.user;
	int set_ids = 0;
	*err = 0;
	if (user && !rq->user && rq->uid >= 0)
		user = NULL; // an explicit uid overrides the image's User
	if (user) {
		if (resolve_user(user, &ids)) {
			snprintf(why, why_len, "no such user or group: %s", user);
			return E_BAD_USER;
		}
		set_ids = 1;
	} else {
		char uid[24];
		snprintf(uid, sizeof uid, "%lld", rq->uid >= 0 ? (long long)rq->uid : (long long)getuid());
		resolve_user(uid, &ids); // numeric: always succeeds
		set_ids = rq->uid >= 0;
	}
	if (rq->gid >= 0) {
		ids.gid = (gid_t)rq->gid;
		set_ids = 1;
	}

	// fds: [0,1] stdin pipe, [2,3] stdout, [4,5] stderr, [6,7] status, [8] pty
	int fds[9] = {-1, -1, -1, -1, -1, -1, -1, -1, -1};
	char slave[128] = "";
	struct child_fds c = {.in_r = -1};
	int failed = pipe2(fds + 6, O_CLOEXEC);
	if (!failed && rq->pty) {
		failed = open_pty(rq, &fds[8], slave, sizeof slave);
		c.pty_slave = slave;
	} else if (!failed) {
		failed = pipe2(fds + 2, O_CLOEXEC) || pipe2(fds + 4, O_CLOEXEC);
		if (!failed && rq->want_stdin)
			failed = pipe2(fds, O_CLOEXEC);
		else if (!failed)
			failed = (fds[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0;
		c.in_r = fds[0];
		c.out_w = fds[3];
		c.err_w = fds[5];
	}
	if (failed) {
		*err = errno;
		close_all(fds, 9);
		snprintf(why, why_len, "cannot create stdio: %s", strerror(*err));
		return E_IO;
	}
	c.status_w = fds[7];

	struct buf env_store = {0};
	char **env = build_env(rq, ids.home, &env_store);
	pid_t pid = start_child(rq, &c, env, &ids, set_ids);
	*err = errno;
	free(env);
	buf_free(&env_store);
	// Close the child's ends now, so EOF arrives when the child is done.
	int child_ends[] = {fds[0], fds[3], fds[5], fds[7]};
	close_all(child_ends, 4);
	fds[0] = fds[3] = fds[5] = fds[7] = -1;
	if (pid < 0) {
		close_all(fds, 9);
		snprintf(why, why_len, "vfork: %s", strerror(*err));
		return E_IO;
	}

	struct child_failure failure;
	ssize_t n;
	do
		n = read(fds[6], &failure, sizeof failure);
	while (n < 0 && errno == EINTR);
	if (n == (ssize_t)sizeof failure) {
		waitpid(pid, NULL, 0);
		close_all(fds, 9);
		*err = failure.err;
		const char *what = failure.code == E_BAD_CWD	 ? "cannot enter working directory"
				   : failure.code == E_PERMISSION ? "permission denied"
				   : failure.code == E_COMMAND_NOT_FOUND ? "command not found"
									: "cannot execute";
		snprintf(why, why_len, "%s: %s: %s", what,
			 failure.code == E_BAD_CWD ? (rq->cwd ? rq->cwd : image.workdir) : rq->argv[0],
			 strerror(failure.err));
		return failure.code;
	}
	close(fds[6]);
	out->pid = pid;
	if (rq->pty) {
		out->pty_fd = out->out_fd = fds[8];
		out->in_fd = rq->want_stdin ? fds[8] : -1;
		out->err_fd = -1;
	} else {
		out->pty_fd = -1;
		out->in_fd = fds[1];
		out->out_fd = fds[2];
		out->err_fd = fds[4];
	}
	int ours[] = {out->in_fd, out->out_fd, out->err_fd};
	for (int i = 0; i < 3; i++)
		if (ours[i] >= 0)
			fcntl(ours[i], F_SETFL, fcntl(ours[i], F_GETFL) | O_NONBLOCK);
	return 0;
}
