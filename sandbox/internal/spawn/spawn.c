//go:build linux && cgo

/*
 * kiln_spawn: the first process of a sandbox, started the way bubblewrap and nsjail
 * start theirs. One clone() makes a process in new mount, uts, ipc, pid and network
 * namespaces; it joins its cgroups, takes a new cgroup namespace, builds its file
 * system from the steps the caller planned (mounts over a read-only root, /proc with
 * its masks, /dev, /tmp, bind mounts, then pivot_root), names its host, brings up its
 * loopback, sets its rlimits and umask, gives up every capability and its ids,
 * sets no_new_privs, loads the seccomp filter, and execs the init executable
 * (kiln-init) as PID 1 of its pid namespace.
 *
 * The child shares the caller's memory until it execs (CLONE_VM | CLONE_VFORK, as
 * posix_spawn does): nothing is copied, and the caller's thread waits until the
 * child has exec'd or failed. So the child may only make system calls (no malloc, no
 * stdio, no locks) and reads only what the caller prepared; credentials are changed
 * with raw system calls, since glibc's wrappers would signal the caller's threads.
 * Signals are blocked in the caller across the clone, so no handler of the caller
 * runs in the child; exec resets the handlers and kiln-init the mask.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "spawn.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

#define STACK_SIZE (256 * 1024)

static int fail(struct kiln_spawn *s, int step) {
	__atomic_store_n(&s->failed_errno, errno, __ATOMIC_SEQ_CST);
	__atomic_store_n(&s->failed_step, step, __ATOMIC_SEQ_CST);
	_exit(127);
}

static int run_step(const struct kiln_step *st) {
	switch (st->kind) {
	case KILN_MOUNT:
		return mount(st->src, st->dst, st->fstype, st->flags, st->data);
	case KILN_MKNOD:
		return mknod(st->dst, st->mode, st->dev);
	case KILN_SYMLINK:
		return symlink(st->src, st->dst);
	case KILN_MKDIR:
		return mkdir(st->dst, st->mode);
	case KILN_MASK: {
		struct stat sb;
		if (stat(st->dst, &sb) < 0) return errno == ENOENT ? 0 : -1;
		if (S_ISDIR(sb.st_mode)) {
			if (mount("tmpfs", st->dst, "tmpfs", MS_RDONLY, "nr_blocks=1,nr_inodes=1") == 0) return 0;
			return mount("tmpfs", st->dst, "tmpfs", MS_RDONLY, "nr_blocks=1,nr_inodes=2");
		}
		return mount(st->src, st->dst, NULL, MS_BIND, NULL);
	}
	case KILN_READONLY: {
		struct statfs sf;
		if (mount(st->dst, st->dst, NULL, MS_BIND | MS_REC, NULL) < 0) return errno == ENOENT ? 0 : -1;
		if (statfs(st->dst, &sf) < 0) return -1;
		unsigned long keep = (unsigned long)sf.f_flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC);
		return mount(st->dst, st->dst, NULL, keep | MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
	}
	case KILN_PIVOT:
		if (chdir(st->dst) < 0) return -1;
		if (syscall(SYS_pivot_root, ".", ".") < 0) return -1;
		if (umount2(".", MNT_DETACH) < 0) return -1;
		return chdir("/");
	case KILN_CHDIR:
		return chdir(st->dst);
	case KILN_BIND: {
		struct statfs sf;
		if (mount(st->src, st->dst, NULL, MS_BIND, NULL) < 0) return -1;
		if (statfs(st->dst, &sf) < 0) return -1;
		unsigned long keep = (unsigned long)sf.f_flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC);
		return mount(NULL, st->dst, NULL, keep | MS_NOSUID | MS_NODEV | st->flags | MS_BIND | MS_REMOUNT, NULL);
	}
	}
	errno = EINVAL;
	return -1;
}

static int child_main(void *arg) {
	struct kiln_spawn *s = arg;

	umask(0); /* steps give exact modes */
	for (int i = 0; i < s->n_cgroup_procs; i++)
		if (write(s->cgroup_procs[i], "0", 1) != 1) fail(s, KILN_FAIL_CGROUP);
	/* After joining: the cgroups just joined are the root of the new namespace. */
	if (unshare(CLONE_NEWCGROUP) < 0) fail(s, KILN_FAIL_CGROUPNS);
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) fail(s, KILN_FAIL_PRIVATE);
	for (int i = 0; i < s->n_steps; i++)
		if (run_step(&s->steps[i]) < 0) fail(s, i);

	if (s->hostname && sethostname(s->hostname, strlen(s->hostname)) < 0) fail(s, KILN_FAIL_HOSTNAME);
	if (s->loopback) {
		int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		struct ifreq ifr;
		memset(&ifr, 0, sizeof ifr);
		strcpy(ifr.ifr_name, "lo");
		if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &ifr) < 0) fail(s, KILN_FAIL_LOOPBACK);
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0) fail(s, KILN_FAIL_LOOPBACK);
		close(fd);
	}
	struct rlimit nofile = {s->nofile, s->nofile}, core = {0, 0};
	if (setrlimit(RLIMIT_NOFILE, &nofile) < 0 || setrlimit(RLIMIT_CORE, &core) < 0) fail(s, KILN_FAIL_RLIMIT);

	/* Descriptors: 0 the sandbox's /dev/null, 1..5 as the caller said; nothing else. */
	int src[6], tmp[6];
	src[0] = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (src[0] < 0) fail(s, KILN_FAIL_FDS);
	for (int i = 0; i < 5; i++) src[i + 1] = s->fds[i];
	for (int i = 0; i < 6; i++)
		if ((tmp[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 16)) < 0) fail(s, KILN_FAIL_FDS);
	for (int i = 0; i < 6; i++)
		if (dup2(tmp[i], i) < 0) fail(s, KILN_FAIL_FDS);
	if (syscall(SYS_close_range, 6, ~0U, 0) < 0) fail(s, KILN_FAIL_FDS);

	/* No capability in any set, then the ids (raw calls: see the top). */
	for (int c = 0; c <= s->last_cap; c++)
		if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL) fail(s, KILN_FAIL_CAPS);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL) fail(s, KILN_FAIL_CAPS);
	if (syscall(SYS_setgroups, 0, NULL) < 0) fail(s, KILN_FAIL_IDS);
	if (syscall(SYS_setresgid, s->gid, s->gid, s->gid) < 0) fail(s, KILN_FAIL_IDS);
	if (syscall(SYS_setresuid, s->uid, s->uid, s->uid) < 0) fail(s, KILN_FAIL_IDS);
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof data);
	if (syscall(SYS_capset, &hdr, data) < 0) fail(s, KILN_FAIL_CAPS);
	/* A change of credentials clears the parent-death signal: set it after. */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) fail(s, KILN_FAIL_PDEATHSIG);
	umask(022);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail(s, KILN_FAIL_NNP);
	struct sock_fprog prog = {s->filter_len, (struct sock_filter *)s->filter};
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) fail(s, KILN_FAIL_SECCOMP);

	char *argv[] = {"kiln-init", NULL};
	char *envp[] = {NULL};
	syscall(SYS_execveat, 3, "", argv, envp, AT_EMPTY_PATH);
	fail(s, KILN_FAIL_EXEC);
	return 0;
}

int kiln_spawn(struct kiln_spawn *s) {
	s->failed_step = -1;
	s->failed_errno = 0;
	s->pidfd = -1;
	void *stack = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (stack == MAP_FAILED) {
		s->failed_step = KILN_FAIL_CLONE;
		s->failed_errno = errno;
		return -1;
	}
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int pidfd = -1;
	int flags = s->clone_flags | CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD;
	int pid = clone(child_main, (char *)stack + STACK_SIZE, flags, s, &pidfd);
	int err = errno;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	munmap(stack, STACK_SIZE);
	if (pid < 0) {
		s->failed_step = KILN_FAIL_CLONE;
		s->failed_errno = err;
		return -1;
	}
	if (__atomic_load_n(&s->failed_step, __ATOMIC_SEQ_CST) != -1) {
		int st;
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
		}
		close(pidfd);
		return -1;
	}
	s->pidfd = pidfd;
	return pid;
}
