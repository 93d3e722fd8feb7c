/* The C half of package spawn: see spawn.c. */
#ifndef KILN_SPAWN_H
#define KILN_SPAWN_H

#include <stdint.h>

/* Steps of the file system set-up, run in order in the child. */
enum {
	KILN_MOUNT = 1,   /* mount(src, dst, fstype, flags, data) */
	KILN_MKNOD,       /* mknod(dst, mode, dev) */
	KILN_SYMLINK,     /* symlink(src, dst) */
	KILN_MKDIR,       /* mkdir(dst, mode) */
	KILN_MASK,        /* dst exists: a directory gets a read-only empty tmpfs, a file /dev/null */
	KILN_READONLY,    /* dst exists: bind it onto itself, read-only, keeping nosuid/nodev/noexec */
	KILN_PIVOT,       /* make dst the root; the old root is detached */
	KILN_CHDIR,       /* chdir(dst) */
	KILN_BIND,        /* bind src (not what is mounted below it) on dst, adding nosuid, nodev and flags (MS_RDONLY) */
};

struct kiln_step {
	int kind;
	const char *src, *dst, *fstype, *data;
	unsigned long flags;
	unsigned int mode;
	unsigned long long dev;
};

struct kiln_spawn {
	/* In. */
	int clone_flags;             /* CLONE_NEW* for clone; the cgroup namespace comes after joining */
	const int *cgroup_procs;     /* open cgroup.procs files to join, in order */
	int n_cgroup_procs;
	const struct kiln_step *steps;
	int n_steps;
	const char *hostname;
	int loopback;                /* bring lo up */
	unsigned long nofile;        /* RLIMIT_NOFILE, soft and hard; RLIMIT_CORE is 0 */
	int uid, gid;
	int last_cap;                /* /proc/sys/kernel/cap_last_cap */
	const void *filter;          /* struct sock_filter[filter_len], loaded last */
	unsigned short filter_len;
	/* Descriptors that become 1..5 in the child (0 is /dev/null of the new root,
	 * opened after the pivot): stdout, stderr, the init executable, and two more
	 * for it. The init executable (fds[2], i.e. fd 3) is what the child execs. */
	int fds[5];
	/* Out. */
	int pidfd;
	int failed_step;             /* -1: none; else the index of the step, or one of KILN_FAIL_* */
	int failed_errno;
};

/* Set-up stages outside steps[], as failed_step values. */
enum {
	KILN_FAIL_CLONE = -2,
	KILN_FAIL_CGROUP = -3,
	KILN_FAIL_CGROUPNS = -4,
	KILN_FAIL_PRIVATE = -5,
	KILN_FAIL_HOSTNAME = -6,
	KILN_FAIL_LOOPBACK = -7,
	KILN_FAIL_RLIMIT = -8,
	KILN_FAIL_FDS = -9,
	KILN_FAIL_CAPS = -10,
	KILN_FAIL_IDS = -11,
	KILN_FAIL_NNP = -12,
	KILN_FAIL_SECCOMP = -13,
	KILN_FAIL_EXEC = -14,
	KILN_FAIL_PDEATHSIG = -15,
};

/* kiln_spawn starts the sandbox's first process and returns its pid (or -1 with
 * failed_step and failed_errno set). It returns once that process has exec'd the
 * init executable or failed. */
int kiln_spawn(struct kiln_spawn *s);

#endif
