package sandbox_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/sandbox"
)

// hostFixture is what the host offers that a contained action must not reach.
type hostFixture struct {
	tcpPort   int
	tcpConns  atomic.Int64
	udpPort   int
	udpMu     sync.Mutex
	udpGot    []string
	abstract  string
	secret    string // a planted secret file, as in the kiln data dir
	secretDir string
	victim    *exec.Cmd // a host process the action tries to signal
	resolver  string    // the host's DNS server
}

func newHostFixture(t *testing.T) *hostFixture {
	t.Helper()
	f := &hostFixture{}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	f.tcpPort = ln.Addr().(*net.TCPAddr).Port
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.tcpConns.Add(1)
			c.Write([]byte("host-secret"))
			c.Close()
		}
	}()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	f.udpPort = pc.LocalAddr().(*net.UDPAddr).Port
	go func() {
		buf := make([]byte, 512)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			f.udpMu.Lock()
			f.udpGot = append(f.udpGot, string(buf[:n]))
			f.udpMu.Unlock()
		}
	}()
	f.abstract = fmt.Sprintf("kiln-sandbox-test-%d", os.Getpid())
	ul, err := net.Listen("unix", "@"+f.abstract)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ul.Close() })
	go func() {
		for {
			c, err := ul.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	f.secretDir = filepath.Join(t.TempDir(), "data", "keys")
	if err := os.MkdirAll(f.secretDir, 0o755); err != nil {
		t.Fatal(err)
	}
	f.secret = filepath.Join(f.secretDir, "executor.key")
	if err := os.WriteFile(f.secret, []byte("PRIVATE KEY"), 0o644); err != nil {
		t.Fatal(err)
	}
	f.victim = exec.Command("/bin/sleep", "600")
	if err := f.victim.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.victim.Process.Kill(); f.victim.Wait() })
	f.resolver = "10.255.255.53"
	if b, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		sc := bufio.NewScanner(strings.NewReader(string(b)))
		for sc.Scan() {
			if fs := strings.Fields(sc.Text()); len(fs) == 2 && fs[0] == "nameserver" && net.ParseIP(fs[1]).To4() != nil {
				f.resolver = fs[1]
				break
			}
		}
	}
	return f
}

func (f *hostFixture) udpReceived(marker string) int {
	f.udpMu.Lock()
	defer f.udpMu.Unlock()
	n := 0
	for _, m := range f.udpGot {
		if m == marker {
			n++
		}
	}
	return n
}

// hostile is one escape or abuse attempt.
type hostile struct {
	name  string
	args  []string                        // the attempt, run in the sandbox
	tweak func(*testing.T, *sandbox.Spec) // optional Spec changes (limits, exec root)
	// check asserts the attempt was contained.
	check func(t *testing.T, o outcome)
	// control, when set, runs on the host first and must show that the attempt is
	// real: it works there (or at least reaches the kernel past the permission check).
	control func(t *testing.T)
}

var (
	isolateMnt = []string{"--isolate=mnt"}
	isolateUTS = []string{"--isolate=uts"}
	isolateNet = []string{"--isolate=net"}
)

func probe(args ...string) []string { return append([]string{"/bin/probe"}, args...) }

// wantLine checks the probe's first output line.
func wantLine(want string) func(*testing.T, outcome) {
	return func(t *testing.T, o outcome) {
		t.Helper()
		if got := firstLine(o.stdout); got != want {
			t.Fatalf("sandbox: got %q, want %q (stderr %q, result %+v)", got, want, o.stderr, o.res)
		}
	}
}

// controlIs runs the probe on the host (optionally isolated) and wants its line.
func controlIs(want string, args ...string) func(*testing.T) {
	return func(t *testing.T) {
		t.Helper()
		if got := hostProbe(t, nil, args...); got != want {
			t.Fatalf("control on the host: got %q, want %q: the attempt would not work even unsandboxed", got, want)
		}
	}
}

// controlNotEPERM wants the host run to get past the permission check: success or
// an error other than EPERM (the call is then refused in the sandbox by policy only).
func controlNotEPERM(args ...string) func(*testing.T) {
	return func(t *testing.T) {
		t.Helper()
		if got := hostProbe(t, nil, args...); got == "errno=1" || got == "" {
			t.Fatalf("control on the host: got %q, want success or an errno other than EPERM", got)
		}
	}
}

func TestHostile(t *testing.T) {
	// Prepared sandboxes are what a long-lived engine uses: test through them (the
	// parallel subtests also use freshly prepared ones when the pool runs dry).
	r := newRunnerWith(t, sandbox.Config{Prestart: 4})
	f := newHostFixture(t)
	hostName, _ := os.Hostname()
	hostTmp := t.TempDir()
	port := strconv.Itoa(f.tcpPort)
	uport := strconv.Itoa(f.udpPort)

	cases := []hostile{
		// --- network ---
		{name: "tcp to the host's 127.0.0.1", args: probe("tcp-connect", "127.0.0.1", port),
			control: func(t *testing.T) {
				before := f.tcpConns.Load()
				controlIs("ok", "tcp-connect", "127.0.0.1", port)(t)
				if f.tcpConns.Load() == before {
					t.Fatal("control: the host listener saw no connection")
				}
			},
			check: func(t *testing.T, o outcome) {
				before := f.tcpConns.Load()
				wantLine("errno=111")(t, o) // ECONNREFUSED: the sandbox's loopback is its own
				if f.tcpConns.Load() != before {
					t.Fatal("the host listener accepted a connection from the sandbox")
				}
			}},
		{name: "udp to the host's 127.0.0.1", args: probe("udp-send", "127.0.0.1", uport, "from-sandbox"),
			control: func(t *testing.T) {
				controlIs("ok", "udp-send", "127.0.0.1", uport, "from-control")(t)
				for i := 0; i < 100 && f.udpReceived("from-control") == 0; i++ {
					time.Sleep(10 * time.Millisecond)
				}
				if f.udpReceived("from-control") == 0 {
					t.Fatal("control: the host listener got no datagram")
				}
			},
			check: func(t *testing.T, o outcome) {
				time.Sleep(50 * time.Millisecond)
				if n := f.udpReceived("from-sandbox"); n != 0 {
					t.Fatalf("the host received %d datagrams from the sandbox", n)
				}
			}},
		{name: "a server on the sandbox's own loopback works", args: probe("tcp-self"), check: wantLine("ok")},
		{name: "unix abstract socket of the host", args: probe("abstract-connect", f.abstract),
			control: controlIs("ok", "abstract-connect", f.abstract), check: wantLine("errno=111")},
		{name: "no interface but lo", args: []string{"/bin/sh", "-c", "ip -o link | cut -d: -f2 | tr -d ' '"},
			control: func(t *testing.T) {
				out, _ := exec.Command(filepath.Join(env.rootfs, "bin", "busybox"), "ip", "-o", "link").Output()
				if strings.Count(string(out), "\n") < 2 {
					t.Fatalf("control: the host has only %q", out)
				}
			},
			check: func(t *testing.T, o outcome) {
				if got := strings.TrimSpace(o.stdout); got != "lo" {
					t.Fatalf("interfaces %q, want lo only", got)
				}
			}},
		{name: "no route out", args: []string{"/bin/sh", "-c", "ip route; ip -6 route; echo end"},
			check: func(t *testing.T, o outcome) {
				if got := strings.TrimSpace(o.stdout); got != "end" {
					t.Fatalf("routes in the sandbox: %q", got)
				}
			}},
		{name: "no route to the internet", args: probe("udp-connect", "1.1.1.1", "53"),
			control: controlIs("ok", "udp-connect", "1.1.1.1", "53"), check: wantLine("errno=101")},
		{name: "DNS: the host's resolver is unreachable", args: probe("udp-connect", f.resolver, "53"),
			control: controlIs("ok", "udp-connect", f.resolver, "53"), check: wantLine("errno=101")},
		{name: "DNS: name lookup fails", args: []string{"/bin/sh", "-c", "nslookup example.com " + f.resolver + " >/dev/null 2>&1; echo rc=$?"},
			check: wantLine("rc=1")},
		{name: "raw IP socket", args: probe("socket", "2", "3", "1"), control: controlIs("ok", "socket", "2", "3", "1"), check: wantLine("errno=1")},
		{name: "raw IPv6 socket", args: probe("socket", "10", "3", "58"), control: controlIs("ok", "socket", "10", "3", "58"), check: wantLine("errno=1")},
		{name: "packet socket", args: probe("socket", "17", "3", "0"), control: controlIs("ok", "socket", "17", "3", "0"), check: wantLine("errno=1")},
		{name: "AF_KEY socket", args: probe("socket", "15", "3", "2"), control: controlNotEPERM("socket", "15", "3", "2"), check: wantLine("errno=1")},
		{name: "AF_ALG socket", args: probe("socket", "38", "5", "0"), control: controlNotEPERM("socket", "38", "5", "0"), check: wantLine("errno=1")},
		{name: "AF_VSOCK socket", args: probe("socket", "40", "1", "0"), control: controlIs("ok", "socket", "40", "1", "0"), check: wantLine("errno=1")},
		{name: "netlink audit socket", args: probe("socket", "16", "3", "9"), control: controlIs("ok", "socket", "16", "3", "9"), check: wantLine("errno=1")},
		{name: "netlink route change", args: probe("netlink-addaddr"),
			control: controlIs("ok", append(isolateNet, "netlink-addaddr")...), check: wantLine("errno=1")},

		// --- host files and processes ---
		{name: "the kiln data dir and its keys", args: probe("read", f.secret),
			control: controlIs("ok", "read", f.secret), check: wantLine("errno=2")},
		{name: "the host's /etc/shadow", args: probe("read", "/etc/shadow"),
			control: controlIs("ok", "read", "/etc/shadow"), check: wantLine("errno=2")},
		{name: "/proc of a host process", args: probe("read", fmt.Sprintf("/proc/%d/environ", os.Getpid())),
			control: controlIs("ok", "read", fmt.Sprintf("/proc/%d/environ", os.Getpid())), check: wantLine("errno=2")},
		{name: "signal a host process", args: probe("kill", strconv.Itoa(f.victim.Process.Pid), "9"),
			control: controlIs("ok", "kill", strconv.Itoa(f.victim.Process.Pid), "0"),
			check: func(t *testing.T, o outcome) {
				wantLine("errno=3")(t, o)
				if err := f.victim.Process.Signal(syscall.Signal(0)); err != nil {
					t.Fatalf("the host process died: %v", err)
				}
			}},
		{name: "absolute symlink in the exec root to a host file", args: probe("read", "leak"),
			tweak: func(t *testing.T, s *sandbox.Spec) {
				s.ExecRoot = execRoot(t)
				os.Symlink(f.secret, filepath.Join(s.ExecRoot, "leak"))
			},
			control: controlIs("ok", "read", f.secret), check: wantLine("errno=2")},
		{name: "relative symlink climbing out of the exec root", args: probe("read", "leak"),
			tweak: func(t *testing.T, s *sandbox.Spec) {
				s.ExecRoot = execRoot(t)
				rel, _ := filepath.Rel(s.ExecRoot, f.secret)
				os.Symlink(rel, filepath.Join(s.ExecRoot, "leak"))
				if _, err := os.ReadFile(filepath.Join(s.ExecRoot, "leak")); err != nil {
					t.Fatalf("control: the symlink does not reach the secret on the host: %v", err)
				}
			},
			check: wantLine("errno=2")},
		{name: "write the root filesystem", args: probe("write", "/bin/evil", "x"),
			control: func(t *testing.T) {
				p := filepath.Join(env.rootfs, "etc", "control-write")
				defer os.Remove(p)
				controlIs("ok", "write", p, "x")(t)
			},
			check: func(t *testing.T, o outcome) {
				wantLine("errno=30")(t, o) // EROFS
				if _, err := os.Lstat(filepath.Join(env.rootfs, "bin", "evil")); err == nil {
					t.Fatal("the sandbox wrote into the toolchain directory")
				}
			}},
		{name: "write /proc/sys", args: probe("write", "/proc/sys/kernel/hostname", "evil"),
			control: controlIs("ok", append(isolateUTS, "write", "/proc/sys/kernel/hostname", "evil")...), check: wantLine("errno=30")},
		{name: "write /sys", args: probe("write", "/sys/class/net/lo/mtu", "65536"),
			control: controlIs("ok", "write", "/sys/class/net/lo/mtu", "65536"), check: wantLine("errno=2")}, // no sysfs at all
		{name: "create a file in /sys", args: probe("write", "/sys/evil", "x"), check: wantLine("errno=30")},
		{name: "reach kiln-init's status pipe through /proc/1/fd", args: probe("write", "/proc/1/fd/5", "s0000"),
			check: wantLine("errno=13")},
		{name: "cgroup view is private", args: []string{"/bin/cat", "/proc/self/cgroup"},
			check: func(t *testing.T, o outcome) {
				for _, line := range strings.Split(strings.TrimSpace(o.stdout), "\n") {
					if !strings.HasSuffix(line, ":/") {
						t.Fatalf("cgroup path visible: %q", line)
					}
				}
			}},
		{name: "minimal /dev", args: []string{"/bin/ls", "/dev"},
			check: func(t *testing.T, o outcome) {
				got := strings.Join(strings.Fields(o.stdout), " ")
				if want := "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"; got != want {
					t.Fatalf("/dev holds %q, want %q", got, want)
				}
			}},
		{name: "no capabilities, no_new_privs, seccomp on", args: []string{"/bin/grep", "-E", "^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):", "/proc/self/status"},
			check: func(t *testing.T, o outcome) {
				want := "CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2"
				if got := strings.TrimSpace(o.stdout); got != want {
					t.Fatalf("got %q", got)
				}
			}},

		// --- mounts and namespaces ---
		{name: "mount", args: probe("mount-tmpfs", "/tmp"), control: controlIs("ok", append(isolateMnt, "mount-tmpfs", hostTmp)...), check: wantLine("errno=1")},
		{name: "umount", args: probe("umount", "/proc"), control: controlIs("ok", append(isolateMnt, "umount", "/proc")...), check: wantLine("errno=1")},
		{name: "pivot_root", args: probe("pivot-root", "/tmp"), control: controlNotEPERM(append(isolateMnt, "pivot-root", "/tmp")...), check: wantLine("errno=1")},
		{name: "chroot", args: probe("chroot", "/tmp"), control: controlIs("ok", append(isolateMnt, "chroot", "/tmp")...), check: wantLine("errno=1")},
		{name: "unshare a user namespace", args: probe("unshare", "0x10000000"), control: controlIs("ok", "unshare", "0x10000000"), check: wantLine("errno=1")},
		{name: "unshare a mount namespace", args: probe("unshare", "0x20000"), control: controlIs("ok", "unshare", "0x20000"), check: wantLine("errno=1")},
		{name: "setns", args: probe("setns", "/proc/self/ns/net"), control: controlIs("ok", "setns", "/proc/self/ns/net"), check: wantLine("errno=1")},
		{name: "clone a network namespace", args: probe("clone-flags", "0x40000000"), control: controlIs("ok", "clone-flags", "0x40000000"), check: wantLine("errno=1")},
		{name: "clone a user namespace", args: probe("clone-flags", "0x10000000"), control: controlIs("ok", "clone-flags", "0x10000000"), check: wantLine("errno=1")},
		{name: "clone3 (flags unreadable by seccomp)", args: probe("clone3"), control: controlIs("ok", "clone3"), check: wantLine("errno=38")},
		{name: "plain fork still works", args: probe("fork"), check: wantLine("ok")},

		// --- the seccomp profile's edges ---
		{name: "a system call newer than the profile gets ENOSYS", args: probe("syscall", "1000"),
			control: controlIs("errno=38", "syscall", "1000"), check: wantLine("errno=38")},
		{name: "a known system call the profile does not allow gets EPERM", args: probe("syscall", strconv.Itoa(int(syscall.SYS_ACCT))),
			control: controlNotEPERM("syscall", strconv.Itoa(int(syscall.SYS_ACCT))), check: wantLine("errno=1")},
		{name: "the 32-bit ABI kills the process", args: probe("int80"),
			control: controlIs("ok", "int80"),
			check: func(t *testing.T, o outcome) {
				if o.res.Signal != int(syscall.SIGSYS) || o.stdout != "" {
					t.Fatalf("result %+v stdout %q, want killed by SIGSYS before printing", o.res, o.stdout)
				}
			}},
		{name: "the x32 ABI kills the process", args: probe("syscall", strconv.Itoa(0x40000000|int(syscall.SYS_GETPID))),
			check: func(t *testing.T, o outcome) {
				if o.res.Signal != int(syscall.SIGSYS) || o.stdout != "" {
					t.Fatalf("result %+v stdout %q, want killed by SIGSYS before printing", o.res, o.stdout)
				}
			}},

		// --- other processes, kernel interfaces ---
		{name: "ptrace a child", args: probe("ptrace-child"), control: controlIs("ok", "ptrace-child"), check: wantLine("errno=1")},
		{name: "ptrace kiln-init", args: probe("ptrace-pid", "1"), check: wantLine("errno=1")},
		{name: "process_vm_readv", args: probe("vm-read-child"), control: controlIs("ok", "vm-read-child"), check: wantLine("errno=1")},
		{name: "keyctl", args: probe("keyctl"), control: controlIs("ok", "keyctl"), check: wantLine("errno=1")},
		{name: "add_key", args: probe("add-key"), control: controlIs("ok", "add-key"), check: wantLine("errno=1")},
		{name: "bpf", args: probe("bpf-map"), control: controlIs("ok", "bpf-map"), check: wantLine("errno=1")},
		{name: "perf_event_open", args: probe("perf"), control: controlIs("ok", "perf"), check: wantLine("errno=1")},
		{name: "userfaultfd", args: probe("userfaultfd"), control: controlIs("ok", "userfaultfd"), check: wantLine("errno=1")},
		{name: "io_uring_setup", args: probe("io-uring"), control: controlIs("ok", "io-uring"), check: wantLine("errno=1")},
		{name: "mknod a character device", args: probe("mknod-dev", "/tmp/null"),
			control: controlIs("ok", append(isolateMnt, "mknod-dev", filepath.Join(hostTmp, "null"))...), check: wantLine("errno=1")},
		{name: "mknod a block device", args: probe("mknod-block", "/tmp/sda"),
			control: controlIs("ok", append(isolateMnt, "mknod-block", filepath.Join(hostTmp, "sda"))...), check: wantLine("errno=1")},
		{name: "mknod a FIFO still works", args: probe("mknod-fifo", "/tmp/fifo"), check: wantLine("ok")},
		{name: "setuid binary in the rootfs", args: []string{"/bin/suid-probe", "euid"},
			control: func(t *testing.T) {
				cmd := exec.Command(filepath.Join(env.rootfs, "bin", "suid-probe"), "euid")
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: sandbox.DefaultUID, Gid: sandbox.DefaultGID}}
				out, err := cmd.Output()
				if err != nil || strings.TrimSpace(string(out)) != "0" {
					t.Fatalf("control: setuid binary run by uid %d on the host gave euid %q (%v)", sandbox.DefaultUID, out, err)
				}
			},
			check: wantLine(strconv.Itoa(sandbox.DefaultUID))},
		{name: "clock_settime", args: probe("settime"), control: controlIs("errno=22", "settime"), check: wantLine("errno=1")},
		{name: "settimeofday", args: probe("settimeofday-null"), control: controlIs("ok", "settimeofday-null"), check: wantLine("errno=1")},
		{name: "adjtimex", args: probe("adjtimex-read"), control: controlIs("ok", "adjtimex-read"), check: wantLine("errno=1")},
		{name: "sethostname", args: probe("sethostname", "evil"),
			control: controlIs("ok", append(isolateUTS, "sethostname", "evil")...),
			check: func(t *testing.T, o outcome) {
				wantLine("errno=1")(t, o)
				if h, _ := os.Hostname(); h != hostName {
					t.Fatalf("host name changed to %q", h)
				}
			}},
		{name: "setdomainname", args: probe("setdomainname", "evil"), control: controlIs("ok", append(isolateUTS, "setdomainname", "evil")...), check: wantLine("errno=1")},
		{name: "personality PER_LINUX32", args: probe("personality", "0x8"), control: controlIs("ok", "personality", "0x8"), check: wantLine("errno=1")},
		{name: "personality ADDR_NO_RANDOMIZE is allowed", args: probe("personality", "0x40000"), check: wantLine("ok")},
		{name: "reboot", args: probe("reboot-badmagic"), control: controlIs("errno=22", "reboot-badmagic"), check: wantLine("errno=1")},
		{name: "kexec_load", args: probe("kexec-bad"), control: controlNotEPERM("kexec-bad"), check: wantLine("errno=1")},
		{name: "init_module", args: probe("init-module-null"), control: controlNotEPERM("init-module-null"), check: wantLine("errno=1")},
		{name: "delete_module", args: probe("delete-module", "nope"), control: controlNotEPERM("delete-module", "nope"), check: wantLine("errno=1")},
		{name: "swapon", args: probe("swapon", "/nonexistent"), control: controlIs("errno=2", "swapon", "/nonexistent"), check: wantLine("errno=1")},
		{name: "iopl", args: probe("iopl"), control: controlNotEPERM("iopl"), check: wantLine("errno=1")},
		{name: "open_by_handle_at", args: probe("open-by-handle"), control: controlNotEPERM("open-by-handle"), check: wantLine("errno=1")},

		// --- resources ---
		{name: "fork bomb hits the pids limit", args: probe("forkbomb"),
			tweak: func(t *testing.T, s *sandbox.Spec) { s.Limits.Pids = 32 },
			check: func(t *testing.T, o outcome) {
				var n, e int
				if _, err := fmt.Sscanf(firstLine(o.stdout), "forks=%d errno=%d", &n, &e); err != nil {
					t.Fatalf("output %q: %v", o.stdout, err)
				}
				if n == 0 || n >= 32 || e != int(syscall.EAGAIN) {
					t.Fatalf("forks=%d errno=%d, want 0 < forks < 32 and EAGAIN", n, e)
				}
			}},
		{name: "memory hog is OOM-killed and reported", args: probe("memhog", "1024"),
			tweak: func(t *testing.T, s *sandbox.Spec) { s.Limits.MemoryBytes = 32 << 20 },
			check: func(t *testing.T, o outcome) {
				if !strings.Contains(o.stdout, "mb=16") {
					t.Fatalf("the hog did not get going: %q", o.stdout)
				}
				if !o.res.OOMKilled || o.res.Signal != int(syscall.SIGKILL) || o.res.ExitCode != 137 {
					t.Fatalf("result %+v, want OOM-killed by SIGKILL", o.res)
				}
			}},
		{name: "filling /tmp is bounded", args: probe("filltmp", "/tmp/fill"),
			tweak: func(t *testing.T, s *sandbox.Spec) { s.Limits.TmpBytes = 1 << 20 },
			check: func(t *testing.T, o outcome) {
				var n, e int
				if _, err := fmt.Sscanf(firstLine(o.stdout), "bytes=%d errno=%d", &n, &e); err != nil {
					t.Fatalf("output %q: %v", o.stdout, err)
				}
				if n > 1<<20 || n < 1<<19 || e != int(syscall.ENOSPC) {
					t.Fatalf("wrote %d bytes, errno %d; want at most 1 MiB then ENOSPC", n, e)
				}
			}},
		{name: "unbounded stdout is capped", args: []string{"/bin/sh", "-c", "yes | head -c 8388608"},
			tweak: func(t *testing.T, s *sandbox.Spec) { s.Stdout.Limit = 1 << 20 },
			check: func(t *testing.T, o outcome) {
				st, err := os.Stat(o.res.Stdout.Path)
				if err != nil || st.Size() != 1<<20 || o.res.Stdout.Size != 1<<20 || !o.res.Stdout.Truncated || o.res.ExitCode != 0 {
					t.Fatalf("stdout %+v (file %v), exit %d; want exactly 1 MiB, truncated, exit 0", o.res.Stdout, st, o.res.ExitCode)
				}
			}},
		{name: "infinite loop is killed at the timeout", args: probe("spin"),
			tweak: func(t *testing.T, s *sandbox.Spec) { s.Timeout = 300 * time.Millisecond },
			check: func(t *testing.T, o outcome) {
				if !o.res.TimedOut || o.res.Signal != int(syscall.SIGKILL) {
					t.Fatalf("result %+v, want timed out and killed", o.res)
				}
			}},
	}

	if d := sandbox.DaemonPid(r); d != 0 {
		// The sandbox daemon is a host process too, and the closest one: it holds the
		// sockets and descriptors of every sandbox.
		dp := strconv.Itoa(d)
		cases = append(cases,
			hostile{name: "/proc of the sandbox daemon", args: probe("read", "/proc/"+dp+"/environ"),
				control: controlIs("ok", "read", "/proc/"+dp+"/environ"), check: wantLine("errno=2")},
			hostile{name: "the sandbox daemon's executable", args: probe("read", "/proc/"+dp+"/exe"),
				control: controlIs("ok", "read", "/proc/"+dp+"/exe"), check: wantLine("errno=2")},
			hostile{name: "signal the sandbox daemon", args: probe("kill", dp, "9"),
				control: controlIs("ok", "kill", dp, "0"),
				check: func(t *testing.T, o outcome) {
					wantLine("errno=3")(t, o)
					if err := syscall.Kill(d, 0); err != nil {
						t.Fatalf("the sandbox daemon died: %v", err)
					}
				}},
		)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			if c.control != nil {
				c.control(t)
			}
			var tweak func(*sandbox.Spec)
			if c.tweak != nil {
				tweak = func(s *sandbox.Spec) { c.tweak(t, s) }
			}
			o := run(t, r, tweak, c.args...)
			c.check(t, o)
		})
	}
}

// TestDaemonDoesNotSurvive starts a detached daemon that writes a heartbeat into the
// exec root; once Run returns, the heartbeat must stop.
func TestDaemonDoesNotSurvive(t *testing.T) {
	r := newRunner(t)
	er := execRoot(t)
	o := run(t, r, func(s *sandbox.Spec) { s.ExecRoot = er }, probe("daemon", sandbox.DefaultExecRootPath+"/beat")...)
	wantLine("ok")(t, o)
	beat := filepath.Join(er, "beat")
	st1, err := os.Stat(beat)
	if err != nil || st1.Size() == 0 {
		t.Fatalf("the daemon never ran: %v", err)
	}
	time.Sleep(300 * time.Millisecond)
	st2, err := os.Stat(beat)
	if err != nil {
		t.Fatal(err)
	}
	if st2.Size() != st1.Size() {
		t.Fatalf("the daemon is still writing after Run returned: %d -> %d bytes", st1.Size(), st2.Size())
	}
}

// TestActionsDoNotSeeEachOther runs two sandboxes at once: the second must not see
// the first's /tmp, shared memory or processes.
func TestActionsDoNotSeeEachOther(t *testing.T) {
	r := newRunner(t)
	erA := execRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := r.Run(ctx, sandbox.Spec{
			RootFS: env.rootfs, ExecRoot: erA, Env: []string{"PATH=/bin"},
			Args: []string{"/bin/sh", "-c", "echo a > /tmp/marker; echo a > /dev/shm/marker; touch started; exec sleep 600"},
		})
		done <- err
	}()
	for i := 0; ; i++ {
		if _, err := os.Stat(filepath.Join(erA, "started")); err == nil {
			break
		}
		if i > 500 {
			t.Fatal("the first sandbox did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	o := run(t, r, nil, "/bin/sh", "-c", "cat /tmp/marker /dev/shm/marker 2>/dev/null; ps -o comm | grep -c sleep")
	if got := strings.TrimSpace(o.stdout); got != "0" {
		t.Fatalf("the second sandbox saw the first: %q", got)
	}
	cancel()
	if err := <-done; err == nil {
		t.Fatal("cancelled Run returned no error")
	}
}
