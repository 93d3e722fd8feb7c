/*
 * probe: one hostile (or ordinary) action per subcommand, for kiln's sandbox tests.
 * Each attempt prints "ok" when the kernel let it happen, or "errno=N" when it was
 * refused, and exits 0 or 1 accordingly; the tests run the same probe inside the
 * sandbox (contained) and, where meaningful, on the host (the control: it works).
 *
 *   probe [--isolate=mnt,uts,net,ipc,pid] SUBCOMMAND ARGS...
 *
 * --isolate runs the attempt in fresh namespaces on the host (mount tree made
 * private first), so that a control run cannot change the host.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/bpf.h>
#include <linux/keyctl.h>
#include <linux/netlink.h>
#include <linux/perf_event.h>
#include <linux/reboot.h>
#include <linux/rtnetlink.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/timex.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int result(long r) {
	if (r < 0) {
		printf("errno=%d\n", errno);
		return 1;
	}
	printf("ok\n");
	return 0;
}

static int fail(void) { return result(-1); }

/* int80 makes getpid through the 32-bit ABI (int 0x80, i386 number 20). */
static int int80(void) {
	long r;
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(20L) : "memory");
	if (r < 0 && r > -4096) {
		errno = (int)-r;
		return fail();
	}
	return result(0);
}

static long num(const char *s) { return strtol(s, NULL, 0); }

static int tcp_connect(const char *host, int port) {
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) return fail();
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, host, &a.sin_addr);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) return fail();
	char buf[64];
	ssize_t n = read(fd, buf, sizeof buf - 1);
	if (n > 0) { buf[n] = 0; fprintf(stderr, "read %s\n", buf); }
	return result(0);
}

static int udp_connect(const char *host, int port) {
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) return fail();
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, host, &a.sin_addr);
	return result(connect(fd, (struct sockaddr *)&a, sizeof a));
}

static int udp_send(const char *host, int port, const char *msg) {
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) return fail();
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, host, &a.sin_addr);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) return fail();
	for (int i = 0; i < 3; i++) {
		if (send(fd, msg, strlen(msg), 0) < 0) return fail();
	}
	return result(0);
}

/* tcp_self listens on the sandbox's own loopback and talks to itself. */
static int tcp_self(void) {
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof a;
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0 ||
	    getsockname(l, (struct sockaddr *)&a, &al) < 0) return fail();
	int c = socket(AF_INET, SOCK_STREAM, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a) < 0) return fail();
	int s = accept(l, NULL, NULL);
	if (s < 0 || write(c, "ping", 4) != 4) return fail();
	char buf[4];
	if (read(s, buf, 4) != 4 || memcmp(buf, "ping", 4) != 0) return fail();
	return result(0);
}

static int abstract_connect(const char *name) {
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0) return fail();
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	size_t n = strlen(name);
	memcpy(a.sun_path + 1, name, n);
	return result(connect(fd, (struct sockaddr *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + n));
}

/* netlink_addaddr asks the kernel to add 10.9.8.7/32 to lo. */
static int netlink_addaddr(void) {
	int fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
	if (fd < 0) return fail();
	struct {
		struct nlmsghdr nh;
		struct ifaddrmsg ifa;
		struct rtattr rta;
		struct in_addr addr;
	} req = {0};
	req.nh.nlmsg_len = sizeof req;
	req.nh.nlmsg_type = RTM_NEWADDR;
	req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
	req.ifa.ifa_family = AF_INET;
	req.ifa.ifa_prefixlen = 32;
	req.ifa.ifa_index = 1;
	req.rta.rta_type = IFA_LOCAL;
	req.rta.rta_len = RTA_LENGTH(sizeof req.addr);
	inet_pton(AF_INET, "10.9.8.7", &req.addr);
	if (send(fd, &req, sizeof req, 0) < 0) return fail();
	char buf[4096];
	ssize_t n = recv(fd, buf, sizeof buf, 0);
	if (n < 0) return fail();
	struct nlmsghdr *h = (struct nlmsghdr *)buf;
	if (h->nlmsg_type == NLMSG_ERROR) {
		struct nlmsgerr *e = NLMSG_DATA(h);
		if (e->error) { errno = -e->error; return fail(); }
	}
	return result(0);
}

static int readfile(const char *p) {
	int fd = open(p, O_RDONLY);
	if (fd < 0) return fail();
	char buf[256];
	ssize_t n = read(fd, buf, sizeof buf - 1);
	if (n < 0) return fail();
	buf[n] = 0;
	fprintf(stderr, "%s", buf);
	return result(0);
}

static int writefile(const char *p, const char *content) {
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) return fail();
	if (write(fd, content, strlen(content)) < 0) return fail();
	return result(close(fd));
}

static int child_pause(void) {
	pid_t c = fork();
	if (c == 0) { for (;;) pause(); }
	return c;
}

static int ptrace_child(void) {
	pid_t c = child_pause();
	long r = ptrace(PTRACE_ATTACH, c, 0, 0);
	int e = errno;
	kill(c, SIGKILL);
	waitpid(c, NULL, 0);
	errno = e;
	return result(r);
}

static int vm_read_child(void) {
	static long secret = 42;
	pid_t c = child_pause();
	long v = 0;
	struct iovec l = {&v, sizeof v}, r = {&secret, sizeof secret};
	long n = process_vm_readv(c, &l, 1, &r, 1, 0);
	int e = errno;
	kill(c, SIGKILL);
	waitpid(c, NULL, 0);
	errno = e;
	return result(n);
}

static int clone_flags(unsigned long flags) {
	long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
	if (pid == 0) _exit(0);
	if (pid > 0) waitpid(pid, NULL, 0);
	return result(pid);
}

static int clone3_try(void) {
	struct { uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls; } args = {0};
	args.exit_signal = SIGCHLD;
	long pid = syscall(435 /* clone3 */, &args, sizeof args);
	if (pid == 0) _exit(0);
	if (pid > 0) waitpid(pid, NULL, 0);
	return result(pid);
}

static int bpf_map(void) {
	union bpf_attr a;
	memset(&a, 0, sizeof a);
	a.map_type = BPF_MAP_TYPE_ARRAY;
	a.key_size = 4;
	a.value_size = 4;
	a.max_entries = 1;
	return result(syscall(SYS_bpf, BPF_MAP_CREATE, &a, sizeof a));
}

static int perf(void) {
	struct perf_event_attr a;
	memset(&a, 0, sizeof a);
	a.size = sizeof a;
	a.type = PERF_TYPE_SOFTWARE;
	a.config = PERF_COUNT_SW_CPU_CLOCK;
	return result(syscall(SYS_perf_event_open, &a, 0, -1, -1, 0));
}

static int io_uring(void) {
	char params[120];
	memset(params, 0, sizeof params);
	return result(syscall(425 /* io_uring_setup */, 1, params));
}

static int forkbomb(void) {
	int n = 0;
	for (;;) {
		pid_t c = fork();
		if (c == 0) { for (;;) pause(); }
		if (c < 0) break;
		n++;
		if (n > 100000) break;
	}
	printf("forks=%d errno=%d\n", n, errno);
	fflush(stdout);
	return 0;
}

static int memhog(long mb) {
	for (long i = 0; i < mb; i++) {
		char *p = malloc(1 << 20);
		if (!p) return fail();
		memset(p, 1, 1 << 20);
		if (i % 16 == 0) { printf("mb=%ld\n", i); fflush(stdout); }
	}
	return result(0);
}

static int filltmp(const char *path) {
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) return fail();
	static char buf[65536];
	memset(buf, 'x', sizeof buf);
	long total = 0;
	for (;;) {
		ssize_t n = write(fd, buf, sizeof buf);
		if (n <= 0) break;
		total += n;
	}
	printf("bytes=%ld errno=%d\n", total, errno);
	return 0;
}

/* daemon_heartbeat leaves a detached grandchild appending to path every 20 ms. */
static int daemon_heartbeat(const char *path) {
	pid_t c = fork();
	if (c == 0) {
		setsid();
		if (fork() != 0) _exit(0);
		signal(SIGHUP, SIG_IGN);
		for (;;) {
			int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
			if (fd >= 0) { write(fd, "x", 1); close(fd); }
			usleep(20000);
		}
	}
	waitpid(c, NULL, 0);
	usleep(100000); /* let the daemon write a few beats */
	return result(0);
}

static int isolate(const char *spec) {
	int flags = 0;
	if (strstr(spec, "mnt")) flags |= CLONE_NEWNS;
	if (strstr(spec, "uts")) flags |= CLONE_NEWUTS;
	if (strstr(spec, "net")) flags |= CLONE_NEWNET;
	if (strstr(spec, "ipc")) flags |= CLONE_NEWIPC;
	if (unshare(flags) < 0) { perror("probe: unshare"); return -1; }
	if ((flags & CLONE_NEWNS) && mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
		perror("probe: private mounts");
		return -1;
	}
	return 0;
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IONBF, 0);
	if (argc > 1 && strncmp(argv[1], "--isolate=", 10) == 0) {
		if (isolate(argv[1] + 10) < 0) return 2;
		argv++;
		argc--;
	}
	if (argc < 2) { fprintf(stderr, "usage: probe [--isolate=...] cmd args\n"); return 2; }
	const char *cmd = argv[1];
	const char *a1 = argc > 2 ? argv[2] : "", *a2 = argc > 3 ? argv[3] : "", *a3 = argc > 4 ? argv[4] : "";
#define IS(s) (strcmp(cmd, s) == 0)
	if (IS("tcp-connect")) return tcp_connect(a1, num(a2));
	if (IS("udp-connect")) return udp_connect(a1, num(a2));
	if (IS("udp-send")) return udp_send(a1, num(a2), a3);
	if (IS("tcp-self")) return tcp_self();
	if (IS("abstract-connect")) return abstract_connect(a1);
	if (IS("socket")) return result(socket(num(a1), num(a2), num(a3)));
	if (IS("syscall")) return result(syscall(num(a1), 0, 0, 0, 0, 0));
	if (IS("int80")) return int80();
	if (IS("socketpair")) { int sv[2]; return result(socketpair(num(a1), num(a2), 0, sv)); }
	if (IS("netlink-addaddr")) return netlink_addaddr();
	if (IS("read")) return readfile(a1);
	if (IS("write")) return writefile(a1, a2);
	if (IS("mkdir")) return result(mkdir(a1, 0755));
	if (IS("mount-tmpfs")) return result(mount("tmpfs", a1, "tmpfs", 0, "size=64k"));
	if (IS("umount")) return result(umount2(a1, MNT_DETACH));
	if (IS("pivot-root")) return result(syscall(SYS_pivot_root, a1, a1));
	if (IS("chroot")) return result(chroot(a1));
	if (IS("unshare")) return result(unshare(num(a1)));
	if (IS("setns")) { int fd = open(a1, O_RDONLY); if (fd < 0) return fail(); return result(setns(fd, 0)); }
	if (IS("clone-flags")) return clone_flags(num(a1));
	if (IS("clone3")) return clone3_try();
	if (IS("fork")) return clone_flags(0);
	if (IS("ptrace-child")) return ptrace_child();
	if (IS("ptrace-pid")) return result(ptrace(PTRACE_ATTACH, num(a1), 0, 0));
	if (IS("vm-read-child")) return vm_read_child();
	if (IS("keyctl")) return result(syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1));
	if (IS("add-key")) return result(syscall(SYS_add_key, "user", "kiln-probe", "x", 1, KEY_SPEC_PROCESS_KEYRING));
	if (IS("bpf-map")) return bpf_map();
	if (IS("perf")) return perf();
	if (IS("mknod-dev")) return result(mknod(a1, S_IFCHR | 0666, makedev(1, 3)));
	if (IS("mknod-block")) return result(mknod(a1, S_IFBLK | 0666, makedev(8, 0)));
	if (IS("mknod-fifo")) return result(mknod(a1, S_IFIFO | 0644, 0));
	if (IS("settime")) { struct timespec ts = {0, -1}; return result(syscall(SYS_clock_settime, CLOCK_REALTIME, &ts)); }
	if (IS("euid")) { printf("%d\n", (int)geteuid()); return 0; }
	if (IS("settimeofday-null")) return result(syscall(SYS_settimeofday, NULL, NULL));
	if (IS("adjtimex-read")) { struct timex t = {0}; return result(adjtimex(&t)); }
	if (IS("sethostname")) return result(sethostname(a1, strlen(a1)));
	if (IS("setdomainname")) return result(setdomainname(a1, strlen(a1)));
	if (IS("personality")) return result(personality(num(a1)));
	if (IS("userfaultfd")) return result(syscall(SYS_userfaultfd, O_CLOEXEC));
	if (IS("io-uring")) return io_uring();
	if (IS("reboot-badmagic")) return result(syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, 0, LINUX_REBOOT_CMD_RESTART, NULL));
	if (IS("delete-module")) return result(syscall(SYS_delete_module, a1, O_NONBLOCK));
	if (IS("init-module-null")) return result(syscall(SYS_init_module, NULL, 0, ""));
	if (IS("kexec-bad")) return result(syscall(SYS_kexec_load, 0, 0, NULL, 0xdead0000UL));
	if (IS("swapon")) return result(syscall(SYS_swapon, a1, 0));
	if (IS("iopl")) return result(syscall(SYS_iopl, 3));
	if (IS("open-by-handle")) return result(syscall(SYS_open_by_handle_at, -1, NULL, 0));
	if (IS("forkbomb")) return forkbomb();
	if (IS("memhog")) return memhog(num(a1));
	if (IS("filltmp")) return filltmp(a1);
	if (IS("daemon")) return daemon_heartbeat(a1);
	if (IS("kill")) return result(kill(num(a1), num(a2)));
	if (IS("spin")) { for (;;) { } }
	if (IS("uname")) { struct utsname u; uname(&u); printf("%s\n", u.nodename); return 0; }
	fprintf(stderr, "probe: unknown command %s\n", cmd);
	return 2;
}
