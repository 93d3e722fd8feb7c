/*
 * kiln-init: the first process of every kiln sandbox (PID 1 of its pid namespace).
 *
 * The sandbox's set-up (package spawn) execs it last. It reads the real command from
 * fd 4 (so nothing is added to or reordered in its environment, and the command can
 * be bound late), optionally turns address space randomisation off, forks, execs the
 * command in the child, reaps every orphan like an init, and reports the command's
 * raw wait status (or why it could not start) on fd 5. When the command exits, this
 * process exits and the kernel kills whatever is left in the pid namespace.
 *
 * Freestanding x86_64 code (no libc) so that it is a few KiB and starts in
 * microseconds. Build: see gen.sh. Protocol (fd 4, little endian):
 *   u64 length, then length bytes: "kiln-init/1\0" flags\0 cwd\0 argc\0 argv...\0
 *   envc\0 env...\0 (numbers in decimal; flags bit 0 = ADDR_NO_RANDOMIZE)
 * Reports (fd 5): 'c' errno(u32) chdir failed, 'x' errno(u32) execve failed,
 *   'p' errno(u32) protocol/set-up failure, 's' status(u32) the command's wait status,
 *   then 'u' user_us(u64) sys_us(u64) maxrss_kib(u64): the resource use of the
 *   command and every process this init reaped (not of the sandbox set-up before).
 *
 * The sandbox may start kiln-init long before it has a command for it: it blocks on
 * fd 4 until the host writes one, so the set-up is off the command's path. It dies
 * (SIGKILL, parent-death signal) when the host thread that started it ends.
 */
typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_mmap 9
#define SYS_rt_sigaction 13
#define SYS_rt_sigprocmask 14
#define SYS_fork 57
#define SYS_execve 59
#define SYS_exit_group 231
#define SYS_wait4 61
#define SYS_fcntl 72
#define SYS_chdir 80
#define SYS_personality 135
#define SYS_prctl 157
#define SYS_getrusage 98

#define ENOENT 2
#define EINTR 4
#define EACCES 13
#define ECHILD 10

#define CTRL_FD 4
#define STATUS_FD 5
#define SELF_FD 3

static inline i64 sys1(i64 n, i64 a) {
	i64 r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a) : "rcx", "r11", "memory");
	return r;
}
static inline i64 sys2(i64 n, i64 a, i64 b) {
	i64 r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b) : "rcx", "r11", "memory");
	return r;
}
static inline i64 sys3(i64 n, i64 a, i64 b, i64 c) {
	i64 r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}
static inline i64 sys4(i64 n, i64 a, i64 b, i64 c, i64 d) {
	i64 r;
	register i64 r10 __asm__("r10") = d;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
	return r;
}
static inline i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f) {
	i64 r;
	register i64 r10 __asm__("r10") = d;
	register i64 r8 __asm__("r8") = e;
	register i64 r9 __asm__("r9") = f;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9) : "rcx", "r11", "memory");
	return r;
}

static __attribute__((noreturn)) void die(i64 code) {
	for (;;) sys1(SYS_exit_group, code);
}

static void report(char kind, u32 v) {
	unsigned char b[5];
	b[0] = (unsigned char)kind;
	b[1] = v & 0xff; b[2] = (v >> 8) & 0xff; b[3] = (v >> 16) & 0xff; b[4] = (v >> 24) & 0xff;
	sys3(SYS_write, STATUS_FD, (i64)b, 5);
}

struct kusage {
	i64 utime_sec, utime_usec, stime_sec, stime_usec, maxrss;
	i64 rest[11];
};

static void report_usage(void) {
	struct kusage ru;
	if (sys2(SYS_getrusage, -1 /* RUSAGE_CHILDREN */, (i64)&ru) < 0) return;
	u64 v[3] = {
		(u64)(ru.utime_sec * 1000000 + ru.utime_usec),
		(u64)(ru.stime_sec * 1000000 + ru.stime_usec),
		(u64)ru.maxrss,
	};
	unsigned char b[25];
	b[0] = 'u';
	for (int i = 0; i < 3; i++)
		for (int k = 0; k < 8; k++) b[1 + 8 * i + k] = (v[i] >> (8 * k)) & 0xff;
	sys3(SYS_write, STATUS_FD, (i64)b, 25);
}

static __attribute__((noreturn)) void fail(char kind, i64 err, i64 code) {
	report(kind, (u32)(-err));
	die(code);
}

static int readfull(char *p, u64 n) {
	while (n > 0) {
		i64 r = sys3(SYS_read, CTRL_FD, (i64)p, (i64)n);
		if (r == -EINTR) continue;
		if (r <= 0) return -1;
		p += r; n -= (u64)r;
	}
	return 0;
}

static void *alloc(u64 n) {
	/* PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS */
	i64 r = sys6(SYS_mmap, 0, (i64)n, 3, 0x22, -1, 0);
	if (r < 0 && r > -4096) return 0;
	return (void *)r;
}

static u64 slen(const char *s) { u64 n = 0; while (s[n]) n++; return n; }

/* next returns the string at *pos and advances past its NUL, or 0 at the end. */
static char *next(char *buf, u64 len, u64 *pos) {
	if (*pos >= len) return 0;
	char *s = buf + *pos;
	u64 n = 0;
	while (*pos + n < len && s[n]) n++;
	if (*pos + n >= len) return 0;
	*pos += n + 1;
	return s;
}

static int atou(const char *s, u64 *v) {
	u64 r = 0;
	if (!*s) return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9') return -1;
		r = r * 10 + (u64)(*s - '0');
	}
	*v = r;
	return 0;
}

static int hasslash(const char *s) { for (; *s; s++) if (*s == '/') return 1; return 0; }

/* execpath runs argv like execvpe: a name without '/' is searched in PATH from envp. */
static i64 execpath(char **argv, char **envp) {
	const char *file = argv[0];
	if (hasslash(file)) return sys3(SYS_execve, (i64)file, (i64)argv, (i64)envp);
	const char *path = "/bin:/usr/bin";
	for (char **e = envp; *e; e++) {
		const char *s = *e;
		if (s[0] == 'P' && s[1] == 'A' && s[2] == 'T' && s[3] == 'H' && s[4] == '=') path = s + 5;
	}
	u64 flen = slen(file);
	static char buf[4096];
	i64 err = -ENOENT;
	int sawacces = 0;
	for (const char *p = path;; ) {
		const char *q = p;
		while (*q && *q != ':') q++;
		u64 dlen = (u64)(q - p);
		if (dlen + flen + 2 <= sizeof buf) {
			u64 i = 0;
			if (dlen == 0) buf[i++] = '.';
			for (u64 k = 0; k < dlen; k++) buf[i++] = p[k];
			buf[i++] = '/';
			for (u64 k = 0; k < flen; k++) buf[i++] = file[k];
			buf[i] = 0;
			err = sys3(SYS_execve, (i64)buf, (i64)argv, (i64)envp);
			if (err == -EACCES) sawacces = 1;
		}
		if (!*q) break;
		p = q + 1;
	}
	return sawacces ? -EACCES : err;
}

struct ksigaction { u64 handler; u64 flags; u64 restorer; u64 mask; };

void run(void) {
	sys1(SYS_close, SELF_FD);
	/*
	 * Die with the host thread that started the sandbox (kiln's or its sandbox
	 * daemon's). The set-up sets this signal too; setting it again here keeps it
	 * whatever that set-up did. Set before the command is read: a host that died
	 * before this point is seen as the end of fd 4.
	 */
	sys2(SYS_prctl, 1 /* PR_SET_PDEATHSIG */, 9 /* SIGKILL */);
	u64 len;
	if (readfull((char *)&len, 8) < 0 || len > (64ul << 20)) fail('p', -22, 125);
	char *buf = alloc(len + 1);
	if (!buf) fail('p', -12, 125);
	if (readfull(buf, len) < 0) fail('p', -5, 125);
	buf[len] = 0;
	sys1(SYS_close, CTRL_FD);

	u64 pos = 0, flags, argc, envc;
	char *magic = next(buf, len, &pos);
	char *sflags = next(buf, len, &pos);
	char *cwd = next(buf, len, &pos);
	char *sargc = next(buf, len, &pos);
	if (!magic || !sflags || !cwd || !sargc) fail('p', -22, 125);
	const char *want = "kiln-init/1";
	for (u64 i = 0;; i++) {
		if (magic[i] != want[i]) fail('p', -22, 125);
		if (!want[i]) break;
	}
	if (atou(sflags, &flags) < 0 || atou(sargc, &argc) < 0 || argc == 0 || argc > len) fail('p', -22, 125);
	char **argv = alloc((argc + 1) * sizeof(char *));
	if (!argv) fail('p', -12, 125);
	for (u64 i = 0; i < argc; i++) {
		argv[i] = next(buf, len, &pos);
		if (!argv[i]) fail('p', -22, 125);
	}
	argv[argc] = 0;
	char *senvc = next(buf, len, &pos);
	if (!senvc || atou(senvc, &envc) < 0 || envc > len) fail('p', -22, 125);
	char **envp = alloc((envc + 1) * sizeof(char *));
	if (!envp) fail('p', -12, 125);
	for (u64 i = 0; i < envc; i++) {
		envp[i] = next(buf, len, &pos);
		if (!envp[i]) fail('p', -22, 125);
	}
	envp[envc] = 0;

	/* Default signal dispositions and an empty mask, whatever the caller had. */
	struct ksigaction dfl = {0, 0, 0, 0};
	for (int s = 1; s <= 64; s++) {
		if (s == 9 || s == 19) continue;
		sys4(SYS_rt_sigaction, s, (i64)&dfl, 0, 8);
	}
	u64 empty = 0;
	sys4(SYS_rt_sigprocmask, 2 /* SIG_SETMASK */, (i64)&empty, 0, 8);

	if (flags & 1) {
		i64 cur = sys1(SYS_personality, 0xffffffff);
		if (cur < 0 || sys1(SYS_personality, cur | 0x0040000) < 0) fail('p', cur < 0 ? cur : -1, 125);
	}
	/* Not dumpable: the command (same uid) cannot open /proc/1/fd or ptrace us. */
	sys2(SYS_prctl, 4 /* PR_SET_DUMPABLE */, 0);

	i64 child = sys1(SYS_fork, 0);
	if (child < 0) fail('p', child, 125);
	if (child == 0) {
		sys3(SYS_fcntl, STATUS_FD, 2 /* F_SETFD */, 1 /* FD_CLOEXEC */);
		i64 r = sys1(SYS_chdir, (i64)cwd);
		if (r < 0) fail('c', r, 127);
		r = execpath(argv, envp);
		fail('x', r, r == -ENOENT ? 127 : 126);
	}
	for (;;) {
		int st = 0;
		i64 r = sys4(SYS_wait4, -1, (i64)&st, 0, 0);
		if (r == -EINTR) continue;
		if (r == -ECHILD) die(125);
		if (r == child) {
			report('s', (u32)st);
			report_usage();
			if ((st & 0x7f) == 0) die((st >> 8) & 0xff);
			die(128 + (st & 0x7f));
		}
	}
}

__asm__(
	".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %rbp, %rbp\n"
	"	and $-16, %rsp\n"
	"	call run\n"
	"	hlt\n");
