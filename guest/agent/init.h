// PID 1 duties: the machine's filesystems, the root switch, the channel to
// the host, power-off.
#ifndef CELLVM_AGENT_INIT_H
#define CELLVM_AGENT_INIT_H

struct init_result {
	char channel[256]; // the device the protocol runs on
};

// Mounts /dev, /proc, /sys, devpts, /dev/shm, /tmp; loads the image config
// from the initramfs; with cellvm.root= mounts the image's root filesystem
// read-only under a tmpfs overlay and switches into it. Fatal on failure.
// `cmdline` replaces /proc/cmdline when not NULL (tests run the agent as
// PID 1 of a PID namespace on the host).
void init_machine(struct init_result *out, const char *cmdline);
// Opens the channel device (waiting for it to appear) in raw mode.
int open_channel(const char *path);
void make_raw(int fd); // cfmakeraw, if fd is a terminal
__attribute__((noreturn)) void power_off(void);

#endif
