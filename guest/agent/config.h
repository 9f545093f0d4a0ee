// The image config the agent applies to every exec, and user lookup.
#ifndef CELLVM_AGENT_CONFIG_H
#define CELLVM_AGENT_CONFIG_H

#include <stddef.h>
#include <sys/types.h>

// Defaults for every exec, from the image config (Env, WorkingDir, User).
struct image_config {
	char **env; // "KEY=VALUE", NULL-terminated
	size_t n_env;
	char *workdir; // NULL: inherit the agent's (/ in the VM)
	char *user;    // NULL: run as the agent's user (root)
};
extern struct image_config image;

// Loads the config file: records "key=value", each ended by a NUL byte.
// Keys: env (repeatable, value KEY=VALUE), workdir, user, hostname. A NULL
// path loads nothing. Returns -1 with errno on failure.
int config_load(const char *path);

struct user_ids {
	uid_t uid;
	gid_t gid;
	char home[256];
};
// Resolves "name", "uid", "name:group", "uid:gid" (mixes too) against the
// current root's /etc/passwd and /etc/group, as docker does: a numeric uid
// missing from /etc/passwd runs with gid 0 and HOME=/. Returns 0, or -1 if a
// name does not exist.
int resolve_user(const char *spec, struct user_ids *out);

#endif
