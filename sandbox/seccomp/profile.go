// Package seccomp holds kiln's versioned seccomp profile for build actions: an
// allowlist of x86_64 system calls, with argument filters where a call is only
// partly safe, compiled by libseccomp (Compile) and loaded by every sandbox.
//
// Anything not allowed fails with EPERM; system calls newer than the profile fail
// with ENOSYS (kiln's prologue to libseccomp's program), so that libc falls back to
// older calls. Only the native x86_64 ABI is allowed: 32-bit (int 0x80) and x32
// system calls kill the process, so they cannot be used to get around the argument
// filters.
package seccomp

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"github.com/opencontainers/runc/libcontainer/configs"
	"golang.org/x/sys/unix"
)

// Version names the profile. Bump it with every change to the rules below; it is part
// of the sandbox policy digest that attestations record.
const Version = "kiln-seccomp/1"

// allowed are the system calls every build action may make without argument checks:
// what compilers, linkers, shells, interpreters (Go, Java, Python) and their tests use.
var allowed = []string{
	// files and directories
	"access", "chdir", "chmod", "chown", "close", "close_range", "copy_file_range", "creat",
	"dup", "dup2", "dup3", "faccessat", "faccessat2", "fadvise64", "fallocate", "fchdir",
	"fchmod", "fchmodat", "fchmodat2", "fchown", "fchownat", "fcntl", "fdatasync", "flock",
	"fstat", "fstatfs", "fsync", "ftruncate", "futimesat", "getcwd", "getdents", "getdents64",
	"lchown", "link", "linkat", "lseek", "lstat", "mkdir", "mkdirat", "newfstatat", "open",
	"openat", "openat2", "pread64", "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2",
	"read", "readahead", "readlink", "readlinkat", "readv", "rename", "renameat", "renameat2",
	"rmdir", "sendfile", "splice", "stat", "statfs", "statx", "symlink", "symlinkat", "sync",
	"sync_file_range", "syncfs", "tee", "truncate", "umask", "unlink", "unlinkat", "utime",
	"utimensat", "utimes", "vmsplice", "write", "writev",
	// extended attributes
	"fgetxattr", "flistxattr", "fremovexattr", "fsetxattr", "getxattr", "lgetxattr",
	"listxattr", "llistxattr", "lremovexattr", "lsetxattr", "removexattr", "setxattr",
	// file notification, polling, events
	"epoll_create", "epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "epoll_wait",
	"eventfd", "eventfd2", "inotify_add_watch", "inotify_init", "inotify_init1",
	"inotify_rm_watch", "poll", "ppoll", "pselect6", "select", "signalfd", "signalfd4",
	"timerfd_create", "timerfd_gettime", "timerfd_settime", "ioctl", "pipe", "pipe2",
	// asynchronous I/O (the old interface; io_uring is denied)
	"io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_setup", "io_submit",
	// memory
	"brk", "get_mempolicy", "madvise", "mbind", "membarrier", "memfd_create", "mincore",
	"mlock", "mlock2", "mlockall", "mmap", "mprotect", "mremap", "msync", "munlock",
	"munlockall", "munmap", "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages",
	"set_mempolicy", "set_mempolicy_home_node", "map_shadow_stack",
	// processes, threads, signals (clone and personality are filtered below)
	"arch_prctl", "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork",
	"futex", "futex_requeue", "futex_wait", "futex_waitv", "futex_wake", "get_robust_list",
	"get_thread_area", "getcpu", "getegid", "geteuid", "getgid", "getgroups", "getitimer",
	"getpgid", "getpgrp", "getpid", "getppid", "getpriority", "getresgid", "getresuid",
	"getrlimit", "getrusage", "getsid", "gettid", "getuid", "ioprio_get", "ioprio_set", "kill",
	"pause", "pidfd_open", "pidfd_send_signal", "prctl", "prlimit64", "process_mrelease",
	"restart_syscall", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask",
	"rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
	"rt_tgsigqueueinfo", "sched_get_priority_max", "sched_get_priority_min",
	"sched_getaffinity", "sched_getattr", "sched_getparam", "sched_getscheduler",
	"sched_rr_get_interval", "sched_setaffinity", "sched_setattr", "sched_setparam",
	"sched_setscheduler", "sched_yield", "seccomp", "set_robust_list", "set_thread_area",
	"set_tid_address", "setfsgid", "setfsuid", "setgid", "setgroups", "setitimer", "setpgid",
	"setpriority", "setregid", "setresgid", "setresuid", "setreuid", "setrlimit", "setsid",
	"setuid", "sigaltstack", "tgkill", "tkill", "vfork", "wait4", "waitid",
	"landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
	// time (reading and sleeping only)
	"alarm", "clock_getres", "clock_gettime", "clock_nanosleep", "gettimeofday", "nanosleep",
	"time", "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime",
	"timer_settime", "times",
	// System V and POSIX IPC (private to the sandbox's ipc namespace)
	"mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedsend", "mq_unlink",
	"msgctl", "msgget", "msgrcv", "msgsnd", "semctl", "semget", "semop", "semtimedop",
	"shmat", "shmctl", "shmdt", "shmget",
	// sockets (socket and socketpair are filtered below; the network namespace holds
	// only the sandbox's own loopback)
	"accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
	"listen", "recvfrom", "recvmmsg", "recvmsg", "sendmmsg", "sendmsg", "sendto",
	"setsockopt", "shutdown",
	// system information
	"cachestat", "getrandom", "sysinfo", "uname",
}

// denied are refused with EPERM. Everything not allowed is refused anyway; listing
// these makes the intent explicit, and the hostile tests prove each one.
var denied = []string{
	// debugging and reading other processes
	"ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp",
	// mounts and filesystem views
	"mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
	"fsconfig", "fsmount", "fspick", "mount_setattr", "name_to_handle_at",
	"open_by_handle_at", "quotactl", "quotactl_fd", "fanotify_init", "fanotify_mark",
	// namespaces
	"unshare", "setns",
	// kernel keyring
	"keyctl", "add_key", "request_key",
	// kernel programs and tracing
	"bpf", "perf_event_open", "lookup_dcookie", "syslog",
	// kernel and machine state
	"kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
	"reboot", "swapon", "swapoff", "acct", "vhangup", "iopl", "ioperm", "modify_ldt",
	"uselib", "ustat", "sysfs", "nfsservctl",
	// clocks
	"clock_settime", "clock_adjtime", "settimeofday", "adjtimex",
	// risky kernel interfaces
	"userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "memfd_secret",
	// host identity
	"sethostname", "setdomainname",
}

// Namespace flags refused in clone; unshare and setns are refused whole.
const nsFlags = unix.CLONE_NEWNS | unix.CLONE_NEWCGROUP | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC |
	unix.CLONE_NEWUSER | unix.CLONE_NEWPID | unix.CLONE_NEWNET

// addrNoRandomize is personality's ADDR_NO_RANDOMIZE flag (the ASLR-off variation).
const addrNoRandomize = 0x0040000

// conditional are allowed only with the arguments they name; other calls fail EPERM.
var conditional = []*configs.Syscall{
	// Threads and processes, but no new namespaces. clone3 passes its flags in
	// memory that seccomp cannot read: it gets ENOSYS (below) so libc uses clone.
	allowIf("clone", arg(0, configs.MaskEqualTo, nsFlags, 0)),
	// Query the persona, or set Linux with or without address randomisation.
	allowIf("personality", arg(0, configs.EqualTo, 0, 0)),
	allowIf("personality", arg(0, configs.EqualTo, addrNoRandomize, 0)),
	allowIf("personality", arg(0, configs.EqualTo, 0xffffffff, 0)),
	// Sockets: unix of any type; IPv4 and IPv6 stream and datagram (no raw); netlink
	// route only (getifaddrs; changes need CAP_NET_ADMIN, which is never granted).
	// Packet, key, alg, vsock and every other family fail.
	allowIf("socket", arg(0, configs.EqualTo, unix.AF_UNIX, 0)),
	allowIf("socket", arg(0, configs.EqualTo, unix.AF_INET, 0), arg(1, configs.MaskEqualTo, 0xf, unix.SOCK_STREAM)),
	allowIf("socket", arg(0, configs.EqualTo, unix.AF_INET, 0), arg(1, configs.MaskEqualTo, 0xf, unix.SOCK_DGRAM)),
	allowIf("socket", arg(0, configs.EqualTo, unix.AF_INET6, 0), arg(1, configs.MaskEqualTo, 0xf, unix.SOCK_STREAM)),
	allowIf("socket", arg(0, configs.EqualTo, unix.AF_INET6, 0), arg(1, configs.MaskEqualTo, 0xf, unix.SOCK_DGRAM)),
	allowIf("socket", arg(0, configs.EqualTo, unix.AF_NETLINK, 0), arg(2, configs.EqualTo, unix.NETLINK_ROUTE, 0)),
	allowIf("socketpair", arg(0, configs.EqualTo, unix.AF_UNIX, 0)),
	// mknod of regular files, FIFOs and sockets only, never devices.
	allowIf("mknod", arg(1, configs.MaskEqualTo, unix.S_IFMT, 0)),
	allowIf("mknod", arg(1, configs.MaskEqualTo, unix.S_IFMT, unix.S_IFREG)),
	allowIf("mknod", arg(1, configs.MaskEqualTo, unix.S_IFMT, unix.S_IFIFO)),
	allowIf("mknod", arg(1, configs.MaskEqualTo, unix.S_IFMT, unix.S_IFSOCK)),
	allowIf("mknodat", arg(2, configs.MaskEqualTo, unix.S_IFMT, 0)),
	allowIf("mknodat", arg(2, configs.MaskEqualTo, unix.S_IFMT, unix.S_IFREG)),
	allowIf("mknodat", arg(2, configs.MaskEqualTo, unix.S_IFMT, unix.S_IFIFO)),
	allowIf("mknodat", arg(2, configs.MaskEqualTo, unix.S_IFMT, unix.S_IFSOCK)),
}

// enosys are refused with ENOSYS so that callers fall back to an older call.
var enosys = []string{"clone3"}

func arg(i uint, op configs.Operator, v, v2 uint64) *configs.Arg {
	return &configs.Arg{Index: i, Op: op, Value: v, ValueTwo: v2}
}

func allowIf(name string, args ...*configs.Arg) *configs.Syscall {
	return &configs.Syscall{Name: name, Action: configs.Allow, Args: args}
}

// Config returns the profile as a seccomp configuration (runc's configuration types,
// a fresh copy).
func Config() *configs.Seccomp {
	eperm, enosysRet := uint(unix.EPERM), uint(unix.ENOSYS)
	c := &configs.Seccomp{
		DefaultAction:   configs.Errno,
		DefaultErrnoRet: &eperm,
	}
	for _, name := range allowed {
		c.Syscalls = append(c.Syscalls, &configs.Syscall{Name: name, Action: configs.Allow})
	}
	for _, s := range conditional {
		cp := *s
		cp.Args = nil
		for _, a := range s.Args {
			ac := *a
			cp.Args = append(cp.Args, &ac)
		}
		c.Syscalls = append(c.Syscalls, &cp)
	}
	for _, name := range enosys {
		c.Syscalls = append(c.Syscalls, &configs.Syscall{Name: name, Action: configs.Errno, ErrnoRet: &enosysRet})
	}
	// Denied calls need no rule: the default action refuses them with EPERM.
	return c
}

// Digest is the sha256 of the profile's canonical JSON form, "sha256:<hex>".
func Digest() string {
	b, err := json.Marshal(struct {
		Version string
		Config  *configs.Seccomp
		Denied  []string
	}{Version, Config(), denied})
	if err != nil {
		panic(err) // plain data; cannot fail
	}
	h := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(h[:])
}
