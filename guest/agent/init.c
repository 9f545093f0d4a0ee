// PID 1 duties (see init.h). Kernel command line keys (docs/PROTOCOL.md):
//   cellvm.root=/dev/vda        the image's root filesystem; without it the
//                               initramfs stays the root
//   cellvm.rootfstype=erofs     its filesystem type (default erofs)
//   cellvm.rootflags=...        mount data for it (optional)
//   cellvm.channel=/dev/hvc0    the protocol's device (default /dev/hvc0)
//   cellvm.config=/cellvm/config  image config in the initramfs (default)
#define _GNU_SOURCE
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "config.h"

#define DEVICE_WAIT_MS 10000
#define STAGING "/.cellvm"

static char cmdline[4096];

void power_off(void)
{
	sync();
	// The VMM maps the reset (reboot=k: the i8042) to the end of the machine.
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

// A crash of PID 1 would panic the kernel; one line and a power-off is clearer.
static void on_crash(int sig)
{
	static const char msg[] = "cellvm-agent: fatal: crashed (signal ";
	char num[4] = {(char)('0' + sig / 10 % 10), (char)('0' + sig % 10), ')', '\n'};
	ssize_t w = write(2, msg, sizeof msg - 1);
	w = write(2, num, sizeof num);
	(void)w;
	sync();
	reboot(RB_AUTOBOOT);
	_exit(1);
}

// Value of key=value on the command line, copied into out; NULL if absent.
static const char *param(const char *key, char *out, size_t out_len)
{
	size_t key_len = strlen(key);
	for (const char *p = cmdline; (p = strstr(p, key)) != NULL; p += key_len) {
		if ((p == cmdline || p[-1] == ' ') && p[key_len] == '=') {
			const char *v = p + key_len + 1;
			snprintf(out, out_len, "%.*s", (int)strcspn(v, " \n"), v);
			return out;
		}
	}
	return NULL;
}

static void mount_or_die(const char *src, const char *target, const char *type, unsigned long flags,
			 const char *data)
{
	mkdir(target, 0755);
	if (mount(src, target, type, flags, data))
		fatal("mount %s on %s (%s): %s", src, target, type, strerror(errno));
}

static void wait_for(const char *path)
{
	struct timespec step = {0, 10 * 1000 * 1000};
	for (int waited = 0; access(path, F_OK) && waited < DEVICE_WAIT_MS; waited += 10)
		nanosleep(&step, NULL);
}

static void read_cmdline(const char *override)
{
	if (override) {
		snprintf(cmdline, sizeof cmdline, "%s", override);
		return;
	}
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof cmdline - 1) : -1;
	if (n < 0)
		fatal("read /proc/cmdline: %s", strerror(errno));
	cmdline[n] = 0;
	close(fd);
}

// The image's root, read-only, under a tmpfs overlay; then it becomes "/".
// pivot_root cannot leave an initramfs, so this is switch_root's MS_MOVE.
static void switch_to_image_root(const char *device)
{
	char fstype[64] = "erofs", flags[512] = "";
	param("cellvm.rootfstype", fstype, sizeof fstype);
	param("cellvm.rootflags", flags, sizeof flags);
	wait_for(device);
	mkdir(STAGING, 0700);
	mount_or_die(device, STAGING "/lower", fstype, MS_RDONLY, flags[0] ? flags : NULL);
	mount_or_die("tmpfs", STAGING "/rw", "tmpfs", 0, "mode=0755");
	mkdir(STAGING "/rw/upper", 0755);
	mkdir(STAGING "/rw/work", 0755);
	mount_or_die("overlay", STAGING "/root", "overlay", 0,
		     "lowerdir=" STAGING "/lower,upperdir=" STAGING "/rw/upper,workdir=" STAGING "/rw/work");
	if (chdir(STAGING "/root") || mount(".", "/", NULL, MS_MOVE, NULL) || chroot(".") || chdir("/"))
		fatal("switching to the image root: %s", strerror(errno));
}

static void mount_api_filesystems(int fresh_root)
{
	if (fresh_root) {
		mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
		mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	}
	mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_or_die("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		     "newinstance,ptmxmode=0666,mode=0620,gid=5");
	mount_or_die("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_or_die("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	// devtmpfs lacks these; shells use them for process substitution.
	symlink("/proc/self/fd", "/dev/fd");
	symlink("/proc/self/fd/0", "/dev/stdin");
	symlink("/proc/self/fd/1", "/dev/stdout");
	symlink("/proc/self/fd/2", "/dev/stderr");
}

// What a container runtime gives every process and programs take for
// granted; none of it is worth powering off for, so failures are logged.
static void machine_defaults(void)
{
	// Loopback up: local servers (REPL kernels, test servers) use 127.0.0.1.
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
	if (sock < 0 || ioctl(sock, SIOCGIFFLAGS, &ifr) ||
	    (ifr.ifr_flags |= IFF_UP, ioctl(sock, SIOCSIFFLAGS, &ifr)))
		log_line("cellvm-agent: bringing up lo: %s", strerror(errno));
	if (sock >= 0)
		close(sock);
	// The kernel's default of 1024 open files is too few for node or a build;
	// this is docker's value, or the most the kernel allows.
	struct rlimit files = {.rlim_cur = 1048576, .rlim_max = 1048576};
	if (setrlimit(RLIMIT_NOFILE, &files) && (getrlimit(RLIMIT_NOFILE, &files) ||
	    (files.rlim_cur = files.rlim_max, setrlimit(RLIMIT_NOFILE, &files))))
		log_line("cellvm-agent: raising RLIMIT_NOFILE: %s", strerror(errno));
	mkdir("/sys/fs/cgroup", 0755);
	if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
		log_line("cellvm-agent: mount cgroup2: %s", strerror(errno));
}

void init_machine(struct init_result *out, const char *cmdline_override)
{
	static const int crash_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
	for (size_t i = 0; i < sizeof crash_signals / sizeof *crash_signals; i++)
		signal(crash_signals[i], on_crash);
	umask(022);
	mkdir("/dev", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") && errno != EBUSY)
		fatal("mount devtmpfs on /dev: %s", strerror(errno));
	for (int fd = 0; fd < 3; fd++) // the kernel gives us the console only if the initramfs has it
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/console", O_RDWR | O_NOCTTY) != fd)
			open("/dev/null", O_RDWR);
	mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	read_cmdline(cmdline_override);

	char config[256] = "/cellvm/config";
	int config_given = param("cellvm.config", config, sizeof config) != NULL;
	// Read before the switch: the file lives in the initramfs.
	if (config_load(config) && (config_given || errno != ENOENT))
		fatal("image config %s: %s", config, strerror(errno));

	snprintf(out->channel, sizeof out->channel, "/dev/hvc0");
	param("cellvm.channel", out->channel, sizeof out->channel);

	char root[256];
	int fresh_root = param("cellvm.root", root, sizeof root) != NULL;
	if (fresh_root)
		switch_to_image_root(root);
	mount_api_filesystems(fresh_root);
	machine_defaults();
	if (chdir("/"))
		fatal("chdir /: %s", strerror(errno));
}

void make_raw(int fd)
{
	struct termios t;
	if (!isatty(fd) || tcgetattr(fd, &t))
		return;
	cfmakeraw(&t);
	t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
	if (tcsetattr(fd, TCSANOW, &t))
		fatal("raw mode on the channel: %s", strerror(errno));
	// Anything that arrived before raw mode was cooked; the host waits for
	// READY before it sends, so nothing of value is lost.
	tcflush(fd, TCIFLUSH);
}

int open_channel(const char *path)
{
	wait_for(path);
	int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		fatal("open %s: %s", path, strerror(errno));
	make_raw(fd);
	return fd;
}
