package sandbox

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"math"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"

	devices "github.com/opencontainers/cgroups/devices/config"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnbuild/kiln/sandbox/internal/spawn"
	"github.com/kilnbuild/kiln/sandbox/internal/trampoline"
	"github.com/kilnbuild/kiln/sandbox/seccomp"
)

// normalize validates spec and fills its defaults; the result is what runs and what
// the policy digest describes.
func normalize(spec Spec) (Spec, error) {
	s := spec
	bad := func(format string, a ...any) (Spec, error) {
		return Spec{}, status.Errorf(codes.InvalidArgument, "sandbox: "+format, a...)
	}
	if s.RootFS == "" {
		return bad("RootFS is required")
	}
	if !filepath.IsAbs(s.RootFS) {
		abs, err := filepath.Abs(s.RootFS)
		if err != nil {
			return bad("RootFS: %v", err)
		}
		s.RootFS = abs
	}
	if fi, err := statDir(s.RootFS); err != nil || !fi {
		return bad("RootFS %q is not a directory", s.RootFS)
	}
	if len(s.Args) == 0 || s.Args[0] == "" {
		return bad("Args is empty")
	}
	for _, a := range s.Args {
		if strings.IndexByte(a, 0) >= 0 {
			return bad("argument contains a NUL byte")
		}
	}
	for _, e := range s.Env {
		if i := strings.IndexByte(e, '='); i <= 0 {
			return bad("environment entry %q is not NAME=value", e)
		}
		if strings.IndexByte(e, 0) >= 0 {
			return bad("environment entry contains a NUL byte")
		}
	}
	if s.ExecRootPath == "" {
		s.ExecRootPath = DefaultExecRootPath
	}
	if !isCleanAbs(s.ExecRootPath) || s.ExecRootPath == "/" || reservedPath(s.ExecRootPath) {
		return bad("ExecRootPath %q must be a clean absolute path outside /proc, /dev, /sys, /tmp", s.ExecRootPath)
	}
	if s.ExecRoot != "" {
		abs, err := filepath.Abs(s.ExecRoot)
		if err != nil {
			return bad("ExecRoot: %v", err)
		}
		s.ExecRoot = abs
		if fi, err := statDir(s.ExecRoot); err != nil || !fi {
			return bad("ExecRoot %q is not a directory", s.ExecRoot)
		}
	}
	mounts := make([]Mount, 0, len(s.Mounts))
	for _, m := range s.Mounts {
		if m.Source == "" || !isCleanAbs(m.Target) || m.Target == "/" || reservedPath(m.Target) {
			return bad("mount %q -> %q: need a source and a clean absolute target outside /proc, /dev, /sys, /tmp", m.Source, m.Target)
		}
		abs, err := filepath.Abs(m.Source)
		if err != nil {
			return bad("mount source %q: %v", m.Source, err)
		}
		m.Source = abs
		var st unix.Stat_t
		if err := unix.Stat(abs, &st); err != nil {
			return bad("mount source %q: %v", m.Source, err)
		}
		m.sourceIsFile = st.Mode&unix.S_IFMT != unix.S_IFDIR
		mounts = append(mounts, m)
	}
	s.Mounts = mounts
	// Bind mounts are attached to mount points of the read-only root; one inside
	// another (or inside the exec root) would need a mount point in a host directory.
	var targets []string
	if s.ExecRoot != "" {
		targets = append(targets, s.ExecRootPath)
	}
	for _, m := range s.Mounts {
		targets = append(targets, m.Target)
	}
	for i, a := range targets {
		for j, b := range targets {
			if i != j && (a == b || strings.HasPrefix(a, b+"/")) {
				return bad("mount target %q is inside (or equal to) %q", a, b)
			}
		}
	}
	if s.Cwd == "" && s.ExecRoot == "" {
		s.Cwd = "/"
	} else if s.Cwd == "" {
		s.Cwd = s.ExecRootPath
	} else if !path.IsAbs(s.Cwd) {
		s.Cwd = path.Join(s.ExecRootPath, s.Cwd)
	}
	s.Cwd = path.Clean(s.Cwd)
	if s.Hostname == "" {
		s.Hostname = DefaultHostname
	}
	if s.UID == 0 {
		s.UID = DefaultUID
	}
	if s.GID == 0 {
		s.GID = DefaultGID
	}
	if s.UID < 0 || s.GID < 0 || s.UID > math.MaxInt32 || s.GID > math.MaxInt32 {
		return bad("uid or gid out of range")
	}
	if s.CPUs != "" && !cpusetRE.MatchString(s.CPUs) {
		return bad("CPUs %q is not a CPU list like 0-3,6", s.CPUs)
	}
	if s.Timeout < 0 {
		return bad("negative timeout")
	}
	for _, o := range []*Output{&s.Stdout, &s.Stderr} {
		if o.Limit == 0 {
			o.Limit = DefaultOutputLimit
		}
	}
	l := &s.Limits
	if l.MemoryBytes == 0 {
		l.MemoryBytes = DefaultMemoryBytes
	}
	if l.Pids == 0 {
		l.Pids = DefaultPids
	}
	if l.OpenFiles == 0 {
		l.OpenFiles = DefaultOpenFiles
	}
	if l.TmpBytes == 0 {
		l.TmpBytes = DefaultTmpBytes
	}
	var nofile unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &nofile); err == nil && l.OpenFiles > nofile.Max {
		return Spec{}, status.Errorf(codes.ResourceExhausted, "sandbox: open files limit %d is above this host's hard limit %d", l.OpenFiles, nofile.Max)
	}
	if l.MemoryBytes < 4<<20 || l.Pids < 1 || !(l.CPUs >= 0 && l.CPUs <= 1<<20) || l.TmpBytes < 4096 {
		return bad("limits out of range (memory >= 4 MiB, pids >= 1, cpus >= 0, tmp >= 4 KiB)")
	}
	return s, nil
}

// cpusetRE matches the cpuset list syntax: "0", "0-3", "0-3,6,8-9".
var cpusetRE = regexp.MustCompile(`^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$`)

func isCleanAbs(p string) bool { return path.IsAbs(p) && path.Clean(p) == p }

// reservedPath reports whether p is, or is under, a path the sandbox itself mounts.
func reservedPath(p string) bool {
	for _, r := range []string{"/proc", "/dev", "/sys", "/tmp"} {
		if p == r || strings.HasPrefix(p, r+"/") {
			return true
		}
	}
	return false
}

func statDir(p string) (bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return false, err
	}
	return st.Mode&unix.S_IFMT == unix.S_IFDIR, nil
}

// cgroupName is the cgroup parent of a Runner's containers, unique to its state
// directory so that a Runner sweeps only what an earlier Runner on the same directory
// left behind.
func cgroupName(stateDir string) string {
	h := sha256.Sum256([]byte(stateDir))
	return "kiln-sandbox-" + hex.EncodeToString(h[:6])
}

const (
	mntNoSuidDevExec = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
)

// device is a device node of the sandbox's /dev.
type device struct {
	Path  string
	Rule  devices.Rule
	major uint32
	minor uint32
}

// sandboxDevices are the only device nodes in /dev, and the only devices the
// devices cgroup lets the command open.
var sandboxDevices = []*device{
	charDev("/dev/null", 1, 3),
	charDev("/dev/zero", 1, 5),
	charDev("/dev/full", 1, 7),
	charDev("/dev/random", 1, 8),
	charDev("/dev/urandom", 1, 9),
	charDev("/dev/tty", 5, 0),
}

func charDev(p string, major, minor int64) *device {
	return &device{
		Path: p, major: uint32(major), minor: uint32(minor),
		Rule: devices.Rule{
			Type: devices.CharDevice, Major: major, Minor: minor,
			Permissions: "rwm", Allow: true,
		},
	}
}

// maskedPaths are hidden (bind-mounted over with /dev/null or an empty read-only
// tmpfs) where the kernel has them: they leak host information or offer kernel
// interfaces. There is no /sys at all (an empty directory): build actions do not
// need it, and each mount costs set-up and tear-down time.
var maskedPaths = []string{
	"/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
	"/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
	"/proc/timer_stats",
}

// readonlyPaths are remounted read-only inside /proc.
var readonlyPaths = []string{
	"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
}

// namespaces are the namespaces every sandbox gets (no user namespace: the Runner
// runs as root and maps nothing; see docs/sandbox.md for rootless). The cgroup
// namespace is made after the sandbox joined its cgroups.
var namespaces = []struct {
	name string
	flag int
}{
	{"NEWNS", unix.CLONE_NEWNS}, {"NEWUTS", unix.CLONE_NEWUTS}, {"NEWIPC", unix.CLONE_NEWIPC},
	{"NEWPID", unix.CLONE_NEWPID}, {"NEWNET", unix.CLONE_NEWNET}, {"NEWCGROUP", 0},
}

// fsMount is one of the file systems every sandbox mounts over its root.
type fsMount struct {
	Source, Target, Type string
	Flags                uintptr
	Data                 string
}

// sandboxMounts are the file systems mounted over the read-only root, in order.
func sandboxMounts(s *Spec) []fsMount {
	tmp := "mode=1777,size=" + strconv.FormatInt(s.Limits.TmpBytes, 10)
	return []fsMount{
		{"proc", "/proc", "proc", mntNoSuidDevExec, ""},
		{"tmpfs", "/dev", "tmpfs", unix.MS_NOSUID | unix.MS_STRICTATIME, "mode=755,size=64k"},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
		{"shm", "/dev/shm", "tmpfs", mntNoSuidDevExec, tmp},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, tmp},
	}
}

// devLinks are the symbolic links of /dev (target, link).
var devLinks = [][2]string{
	{"/proc/self/fd", "/dev/fd"},
	{"/proc/self/fd/0", "/dev/stdin"},
	{"/proc/self/fd/1", "/dev/stdout"},
	{"/proc/self/fd/2", "/dev/stderr"},
	{"pts/ptmx", "/dev/ptmx"},
}

// setupSteps plans the file system of a sandbox for s on the mounted root: the
// mounts over it, /dev, the bind mounts when binds is set (otherwise they are
// attached later, see attachMounts), the pivot, then /proc's read-only and masked
// paths. What the steps do is what policyDocument describes.
func setupSteps(root string, s *Spec, binds bool) []spawn.Step {
	var st []spawn.Step
	in := func(p string) string { return root + p }
	for _, m := range sandboxMounts(s) {
		if m.Target == "/dev/pts" || m.Target == "/dev/shm" {
			st = append(st, spawn.Step{Kind: spawn.Mkdir, Dst: in(m.Target), Mode: 0o755, Describe: "mkdir " + m.Target})
		}
		st = append(st, spawn.Step{Kind: spawn.Mount, Src: m.Source, Dst: in(m.Target), FSType: m.Type, Flags: m.Flags, Data: m.Data,
			Describe: "mount " + m.Type + " on " + m.Target})
	}
	for _, d := range sandboxDevices {
		st = append(st, spawn.Step{Kind: spawn.Mknod, Dst: in(d.Path), Mode: unix.S_IFCHR | 0o666, Dev: unix.Mkdev(d.major, d.minor),
			Describe: "mknod " + d.Path})
	}
	for _, l := range devLinks {
		st = append(st, spawn.Step{Kind: spawn.Symlink, Src: l[0], Dst: in(l[1]), Describe: "symlink " + l[1]})
	}
	if binds {
		for _, m := range lateMounts(s) {
			var flags uintptr
			if !m.Writable {
				flags = unix.MS_RDONLY
			}
			st = append(st, spawn.Step{Kind: spawn.Bind, Src: m.Source, Dst: in(m.Target), Flags: flags,
				Describe: "bind " + m.Source + " on " + m.Target})
		}
	}
	st = append(st, spawn.Step{Kind: spawn.Pivot, Dst: root, Describe: "pivot_root"})
	for _, p := range readonlyPaths {
		st = append(st, spawn.Step{Kind: spawn.ReadOnly, Dst: p, Describe: "read-only " + p})
	}
	for _, p := range maskedPaths {
		st = append(st, spawn.Step{Kind: spawn.Mask, Src: "/dev/null", Dst: p, Describe: "mask " + p})
	}
	return st
}

// policyVersion names the layout of the policy description below; bump it when the
// description or the isolation it describes changes. 2: sandboxes are set up by
// kiln's own spawn code (its digest is "setup") instead of libcontainer's init.
const policyVersion = "kiln-sandbox-policy/2"

// policy is the canonical description of the isolation a Spec gets. It holds no host
// path, host name or variation knob, so equal limits give equal digests everywhere.
type policy struct {
	Version       string         `json:"version"`
	Setup         string         `json:"setup"` // sha256 of the set-up code (sandbox/internal/spawn/spawn.c)
	Seccomp       string         `json:"seccomp"`
	SeccompDigest string         `json:"seccomp_digest"`
	Init          string         `json:"init"` // sha256 of kiln-init
	Namespaces    []string       `json:"namespaces"`
	Capabilities  []string       `json:"capabilities"`
	NoNewPrivs    bool           `json:"no_new_privs"`
	RootFS        string         `json:"rootfs"`
	Network       string         `json:"network"`
	Mounts        []policyMount  `json:"mounts"`
	Masked        []string       `json:"masked_paths"`
	ReadOnly      []string       `json:"readonly_paths"`
	Devices       []string       `json:"devices"`
	Limits        map[string]any `json:"limits"`
}

type policyMount struct {
	Target string `json:"target"`
	Type   string `json:"type"`
	Mode   string `json:"mode"`
	Data   string `json:"data,omitempty"`
}

// policyDocument describes the isolation policy a sandbox for s gets, as canonical
// JSON, and names it "sha256:<hex>". It reads the same tables setupSteps and the
// cgroups are made from, so it cannot drift from them.
func policyDocument(s *Spec) ([]byte, string) {
	p := policy{
		Version:       policyVersion,
		Setup:         setupDigest,
		Seccomp:       seccomp.Version,
		SeccompDigest: seccompDigest(),
		Init:          initDigest,
		Capabilities:  []string{},
		NoNewPrivs:    true,
		RootFS:        "read-only",
		Network:       "private namespace, loopback only",
		Masked:        maskedPaths,
		ReadOnly:      readonlyPaths,
		Limits: map[string]any{
			"memory_bytes": s.Limits.MemoryBytes,
			"memory_swap":  s.Limits.MemoryBytes,
			"pids":         s.Limits.Pids,
			"cpu_quota":    int64(0),
			"cpu_period":   uint64(0),
			"rlimit_" + strconv.Itoa(unix.RLIMIT_NOFILE): [2]uint64{s.Limits.OpenFiles, s.Limits.OpenFiles},
			"rlimit_" + strconv.Itoa(unix.RLIMIT_CORE):   [2]uint64{0, 0},
		},
	}
	if s.Limits.CPUs > 0 {
		p.Limits["cpu_quota"] = int64(s.Limits.CPUs * 100000)
		p.Limits["cpu_period"] = uint64(100000)
	}
	for _, ns := range namespaces {
		p.Namespaces = append(p.Namespaces, ns.name)
	}
	for _, d := range sandboxDevices {
		p.Devices = append(p.Devices, d.Path)
	}
	for _, m := range sandboxMounts(s) {
		p.Mounts = append(p.Mounts, policyMount{Target: m.Target, Type: m.Type, Mode: mountMode(m.Flags), Data: m.Data})
	}
	for i, m := range lateMounts(s) {
		target, mode := m.Target, "ro,nosuid,nodev"
		if i == 0 && s.ExecRoot != "" {
			target = "<exec root>" // the path is a variation knob, not policy
		}
		if m.Writable {
			mode = "rw,nosuid,nodev"
		}
		p.Mounts = append(p.Mounts, policyMount{Target: target, Type: "bind", Mode: mode})
	}
	b, err := json.Marshal(p) // struct fields in declaration order, map keys sorted
	if err != nil {
		panic(err) // plain data; cannot fail
	}
	h := sha256.Sum256(b)
	return b, "sha256:" + hex.EncodeToString(h[:])
}

func mountMode(flags uintptr) string {
	mode := "rw"
	if flags&unix.MS_RDONLY != 0 {
		mode = "ro"
	}
	for _, f := range []struct {
		bit  uintptr
		name string
	}{{unix.MS_NOSUID, "nosuid"}, {unix.MS_NODEV, "nodev"}, {unix.MS_NOEXEC, "noexec"}} {
		if flags&f.bit != 0 {
			mode += "," + f.name
		}
	}
	return mode
}

var initDigest = func() string {
	h := sha256.Sum256(trampoline.Binary)
	return "sha256:" + hex.EncodeToString(h[:])
}()

// seccompDigest is seccomp.Digest, computed once: the profile is constant.
var seccompDigest = sync.OnceValue(seccomp.Digest)

var setupDigest = func() string {
	h := sha256.Sum256(spawn.Source)
	return "sha256:" + hex.EncodeToString(h[:])
}()
