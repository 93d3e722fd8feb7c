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

	"github.com/opencontainers/cgroups"
	devices "github.com/opencontainers/cgroups/devices/config"
	"github.com/opencontainers/runc/libcontainer/configs"

	"github.com/kilnbuild/kiln/sandbox/internal/trampoline"
	"github.com/kilnbuild/kiln/sandbox/seccomp"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	// Registers the devices cgroup controller, needed for the device rules below.
	_ "github.com/opencontainers/cgroups/devices"
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

// sandboxDevices are the only device nodes in /dev, and the only devices the
// devices cgroup lets the command open.
var sandboxDevices = []*devices.Device{
	charDev("/dev/null", 1, 3),
	charDev("/dev/zero", 1, 5),
	charDev("/dev/full", 1, 7),
	charDev("/dev/random", 1, 8),
	charDev("/dev/urandom", 1, 9),
	charDev("/dev/tty", 5, 0),
}

func charDev(p string, major, minor int64) *devices.Device {
	return &devices.Device{
		Path:     p,
		FileMode: 0o666,
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
// runs as root and maps nothing; see docs/sandbox.md for rootless).
var namespaces = configs.Namespaces{
	{Type: configs.NEWNS}, {Type: configs.NEWUTS}, {Type: configs.NEWIPC},
	{Type: configs.NEWPID}, {Type: configs.NEWNET}, {Type: configs.NEWCGROUP},
}

// containerConfig turns a normalized Spec into a libcontainer configuration.
func (r *localRunner) containerConfig(id, root string, s *Spec) *configs.Config {
	umask := uint32(0o022)
	mounts := []*configs.Mount{
		{Source: "proc", Destination: "/proc", Device: "proc", Flags: mntNoSuidDevExec},
		{Source: "tmpfs", Destination: "/dev", Device: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_STRICTATIME, Data: "mode=755,size=64k"},
		{Source: "devpts", Destination: "/dev/pts", Device: "devpts", Flags: unix.MS_NOSUID | unix.MS_NOEXEC, Data: "newinstance,ptmxmode=0666,mode=0620"},
		{Source: "shm", Destination: "/dev/shm", Device: "tmpfs", Flags: mntNoSuidDevExec, Data: "mode=1777,size=" + strconv.FormatInt(s.Limits.TmpBytes, 10)},
		{Source: "tmpfs", Destination: "/tmp", Device: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_NODEV, Data: "mode=1777,size=" + strconv.FormatInt(s.Limits.TmpBytes, 10)},
	}
	var rules []*devices.Rule
	rules = append(rules, &devices.Rule{Type: devices.WildcardDevice, Major: devices.Wildcard, Minor: devices.Wildcard, Permissions: "rwm", Allow: false})
	for _, d := range sandboxDevices {
		rules = append(rules, &d.Rule)
	}
	res := &cgroups.Resources{
		Memory:     s.Limits.MemoryBytes,
		MemorySwap: s.Limits.MemoryBytes,
		PidsLimit:  &s.Limits.Pids,
		CpusetCpus: s.CPUs,
		Devices:    rules,
	}
	if s.Limits.CPUs > 0 {
		res.CpuPeriod = 100000
		res.CpuQuota = int64(s.Limits.CPUs * 100000)
	}
	cfg := &configs.Config{
		Rootfs:            root,
		Readonlyfs:        true,
		RootPropagation:   unix.MS_PRIVATE | unix.MS_REC,
		Umask:             &umask,
		Mounts:            mounts,
		Devices:           sandboxDevices,
		Hostname:          s.Hostname,
		Namespaces:        namespaces,
		Capabilities:      &configs.Capabilities{},
		Networks:          []*configs.Network{{Type: "loopback", Address: "127.0.0.1/8", Gateway: "localhost"}},
		MaskPaths:         maskedPaths,
		ReadonlyPaths:     readonlyPaths,
		NoNewPrivileges:   true,
		Seccomp:           seccomp.Config(),
		ParentDeathSignal: int(unix.SIGKILL),
		Rlimits: []configs.Rlimit{
			{Type: unix.RLIMIT_NOFILE, Hard: s.Limits.OpenFiles, Soft: s.Limits.OpenFiles},
			{Type: unix.RLIMIT_CORE, Hard: 0, Soft: 0},
		},
		Cgroups: &cgroups.Cgroup{
			Parent:    r.cgName,
			Name:      id,
			Resources: res,
		},
	}
	return cfg
}

// policyVersion names the layout of the policy description below; bump it when the
// description or the isolation it describes changes.
const policyVersion = "kiln-sandbox-policy/1"

// policy is the canonical description of the isolation a Spec gets. It holds no host
// path, host name or variation knob, so equal limits give equal digests everywhere.
type policy struct {
	Version       string         `json:"version"`
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

// policyDocument describes the isolation policy of cfg, the configuration built for s,
// as canonical JSON, and names it "sha256:<hex>". It reads the applied configuration,
// so it cannot drift from it.
func policyDocument(s *Spec, cfg *configs.Config) ([]byte, string) {
	p := policy{
		Version:       policyVersion,
		Seccomp:       seccomp.Version,
		SeccompDigest: seccomp.Digest(),
		Init:          initDigest,
		Capabilities:  []string{},
		NoNewPrivs:    cfg.NoNewPrivileges,
		Network:       "private namespace, loopback only",
		Masked:        cfg.MaskPaths,
		ReadOnly:      cfg.ReadonlyPaths,
		Limits: map[string]any{
			"memory_bytes": cfg.Cgroups.Resources.Memory,
			"memory_swap":  cfg.Cgroups.Resources.MemorySwap,
			"pids":         *cfg.Cgroups.Resources.PidsLimit,
			"cpu_quota":    cfg.Cgroups.Resources.CpuQuota,
			"cpu_period":   cfg.Cgroups.Resources.CpuPeriod,
		},
	}
	if cfg.Readonlyfs {
		p.RootFS = "read-only"
	}
	for _, rl := range cfg.Rlimits {
		p.Limits["rlimit_"+strconv.Itoa(rl.Type)] = [2]uint64{rl.Soft, rl.Hard}
	}
	for _, ns := range cfg.Namespaces {
		p.Namespaces = append(p.Namespaces, string(ns.Type))
	}
	for _, d := range cfg.Devices {
		p.Devices = append(p.Devices, d.Path)
	}
	for _, m := range cfg.Mounts {
		p.Mounts = append(p.Mounts, policyMount{Target: m.Destination, Type: m.Device, Mode: mountMode(m), Data: m.Data})
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

func mountMode(m *configs.Mount) string {
	mode := "rw"
	if m.Flags&unix.MS_RDONLY != 0 {
		mode = "ro"
	}
	for _, f := range []struct {
		bit  int
		name string
	}{{unix.MS_NOSUID, "nosuid"}, {unix.MS_NODEV, "nodev"}, {unix.MS_NOEXEC, "noexec"}} {
		if m.Flags&f.bit != 0 {
			mode += "," + f.name
		}
	}
	return mode
}

var initDigest = func() string {
	h := sha256.Sum256(trampoline.Binary)
	return "sha256:" + hex.EncodeToString(h[:])
}()
