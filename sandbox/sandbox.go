// Package sandbox runs one command in an ephemeral, network-less, seccomp-restricted
// sandbox (namespaces, cgroups, a read-only root) and reports how it ended.
//
// A Runner is created once per process (New) and is safe for concurrent use: every
// Run creates its own container (namespaces, cgroups, mounts), runs the command, and
// destroys everything the command started before returning. The package knows nothing
// of REAPI; it runs a command.
//
// Each sandbox is started with one clone(2) by package spawn, which sets it up in the
// new process and execs kiln-init as its PID 1; nothing of the calling process is
// re-executed. The binary that links this package must call Init at the very top of
// main: kiln built by `make build` embeds kiln-sandboxd and runs its sandboxes from
// that small process (docs/sandbox.md, "The sandbox daemon"), which Init becomes.
package sandbox

import (
	"io"
	"time"
)

// Defaults applied by Run to zero fields of a Spec; they are part of the policy digest.
const (
	DefaultExecRootPath = "/kiln/execroot"
	DefaultHostname     = "kiln"
	DefaultUID          = 1000
	DefaultGID          = 1000

	DefaultMemoryBytes = 4 << 30   // 4 GiB, includes /tmp (tmpfs pages are charged to the cgroup)
	DefaultPids        = 1024      // processes and threads
	DefaultOpenFiles   = 8192      // RLIMIT_NOFILE
	DefaultTmpBytes    = 512 << 20 // 512 MiB
	DefaultOutputLimit = 64 << 20  // 64 MiB per stdout/stderr
)

// Spec describes one command to run in a fresh sandbox.
type Spec struct {
	// RootFS is a host directory used as the read-only root filesystem (the toolchain).
	// It is never written: mount points come from an overlay layer owned by the Runner.
	RootFS string
	// ExecRoot is a host directory mounted read-write at ExecRootPath. Optional.
	ExecRoot string
	// ExecRootPath is where ExecRoot appears inside; DefaultExecRootPath if empty.
	// Changing it is one of the reproducibility variations.
	ExecRootPath string
	// Mounts are further bind mounts (read-only unless Writable).
	Mounts []Mount
	// Cwd is the working directory inside; relative paths are relative to
	// ExecRootPath; empty means ExecRootPath (or / without an ExecRoot).
	Cwd string
	// Args is the command; Args[0] is a path inside the sandbox, or a name looked up
	// in the PATH of Env.
	Args []string
	// Env is the complete environment of the command, "NAME=value" entries passed
	// exactly as given (order and duplicates preserved, nothing added).
	Env []string
	// Stdout and Stderr are files on the host that receive the command's output.
	Stdout, Stderr Output
	// Timeout bounds the wall time of the command (0: only ctx bounds it).
	Timeout time.Duration
	// Limits are the cgroup and rlimit bounds.
	Limits Limits

	// Hostname inside the sandbox; DefaultHostname if empty.
	Hostname string
	// UID and GID the command runs as; DefaultUID/DefaultGID if 0 (never root).
	UID, GID int
	// CPUs restricts the command to a CPU set in cpuset syntax ("0", "0-1,3");
	// empty means every CPU of the host.
	CPUs string
	// DisableASLR runs the command with address space randomisation off
	// (personality ADDR_NO_RANDOMIZE), a reproducibility variation.
	DisableASLR bool
	// ReverseEnv passes Env in reverse order, a reproducibility variation.
	ReverseEnv bool
	// OneOff says this layout is unlikely to run again soon (a reproducibility
	// variation): no sandboxes are prepared ahead for it.
	OneOff bool
}

// Mount is a bind mount of a host path into the sandbox.
type Mount struct {
	Source   string // host path (file or directory)
	Target   string // absolute path inside the sandbox
	Writable bool   // read-only unless set

	sourceIsFile bool // set by normalize
}

// Output is a host file (or writer) that receives one output stream, with a byte cap.
type Output struct {
	// Path of the host file, created or truncated; empty discards the stream
	// unless Writer is set.
	Path string
	// Writer, when set instead of Path, receives the stream as it comes (for the
	// CLI); it is written from one goroutine.
	Writer io.Writer
	// Limit is the most bytes kept; the rest is read and dropped. 0 means
	// DefaultOutputLimit, negative means no limit.
	Limit int64
}

// Limits bound the resources of one sandbox; zero fields take the defaults.
type Limits struct {
	MemoryBytes int64   // memory cgroup limit (RSS + page cache + tmpfs); no swap
	Pids        int64   // pids cgroup limit (processes and threads)
	CPUs        float64 // CPU quota in CPUs (1.5 = 150 ms per 100 ms); 0 means unlimited
	OpenFiles   uint64  // RLIMIT_NOFILE, soft and hard
	TmpBytes    int64   // size of the private /tmp (tmpfs)
}

// Result is how a command ended. A command that fails is a Result with a non-zero
// ExitCode or a Signal, not an error.
type Result struct {
	ExitCode  int  `json:"exit_code"` // exit status, or 128+signal when a signal ended it
	Signal    int  `json:"signal"`    // signal that ended the command, 0 if it exited
	TimedOut  bool `json:"timed_out"`
	OOMKilled bool `json:"oom_killed"`

	Wall   time.Duration `json:"wall_ns"`
	User   time.Duration `json:"user_ns"`
	System time.Duration `json:"system_ns"`
	MaxRSS int64         `json:"max_rss_bytes"` // largest resident set of any process of the command

	Stdout OutputResult `json:"stdout"`
	Stderr OutputResult `json:"stderr"`

	// StartError says why the command could not be started ("exec /bin/cc: no such
	// file or directory", "chdir /x: ..."); ExitCode is then 127 or 126. Empty when
	// the command ran.
	StartError string `json:"start_error,omitempty"`

	// PolicyDigest names the isolation policy (seccomp profile version, namespaces,
	// mounts layout, limits) as "sha256:<hex>"; equal for equal Spec limits on any host.
	PolicyDigest string `json:"policy_digest"`
	// Policy is the document PolicyDigest hashes (canonical JSON), for whoever records it.
	Policy []byte `json:"-"`
}

// OutputResult says where one output stream went and whether it was cut.
type OutputResult struct {
	Path      string `json:"path,omitempty"`
	Size      int64  `json:"size"`      // bytes kept (written to Path or Writer)
	Truncated bool   `json:"truncated"` // the command wrote more than the limit
}
