// Starting one child: the parsed EXEC request and vfork/exec with an error
// channel, so "not found", "permission denied" and "bad cwd" reach the host
// as distinct errors instead of an exit code 127.
#ifndef CELLVM_AGENT_SPAWN_H
#define CELLVM_AGENT_SPAWN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define EXEC_MAX_ARGS 4096
#define EXEC_MAX_ENV 4096
#define EXEC_MAX_TIMEOUT_MS (365LL * 24 * 3600 * 1000) // keeps deadline arithmetic far from overflow

struct exec_request {
	char **argv; // NULL-terminated
	size_t argc;
	char **env; // request entries "K=V" (override) or "K" (unset)
	size_t n_env;
	char *cwd, *user;
	int64_t uid, gid; // -1: unset
	int want_stdin, pty, clear_env;
	int64_t rows, cols, timeout_ms;
};

// Parses the fields of an EXEC payload; on failure returns an error code
// and a message in `why`.
int exec_request_parse(const uint8_t *payload, uint32_t len, struct exec_request *rq, char *why,
		       size_t why_len);
void exec_request_free(struct exec_request *rq);

struct spawned {
	pid_t pid;
	int out_fd, err_fd, in_fd; // -1 if absent; with a pty all three are pty_fd
	int pty_fd;
};

// Starts the process. Returns 0, or an error code with errno-style `err` and
// a message in `why` (nothing is left running or open then).
int spawn_process(const struct exec_request *rq, struct spawned *out, int *err, char *why,
		  size_t why_len);

#endif
