package sandbox

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnbuild/kiln/sandbox/internal/trampoline"
)

// Config configures a Runner.
type Config struct {
	// StateDir holds the Runner's state: container state, root overlays and their
	// skeletons. One Runner owns it at a time (it is locked); New removes whatever a
	// crashed earlier owner left there and in its cgroups. Conventionally DATA/sandbox.
	StateDir string
	// Logger receives warnings about clean-up; slog.Default() if nil.
	Logger *slog.Logger
}

// Runner creates sandboxes. It is safe for concurrent use by many goroutines.
type Runner struct {
	log    *slog.Logger
	dir    string // StateDir, absolute
	ctrDir string // libcontainer state root
	cgName string // cgroup parent name, unique to StateDir
	lock   *os.File
	init   *os.File // sealed memfd holding kiln-init
	roots  *roots

	seq     atomic.Uint64
	mu      sync.Mutex
	running sync.WaitGroup
	closed  bool
}

// New creates a Runner that keeps its state in cfg.StateDir, after removing what a
// crashed earlier process left there (containers, cgroups, mounts).
func New(ctx context.Context, cfg Config) (*Runner, error) {
	if cfg.StateDir == "" {
		return nil, status.Error(codes.InvalidArgument, "sandbox: Config.StateDir is required")
	}
	if os.Geteuid() != 0 {
		return nil, status.Error(codes.FailedPrecondition, "sandbox: the Runner must run as root (rootless sandboxes are not supported yet; see docs/sandbox.md)")
	}
	if len(trampoline.Binary) == 0 || !supportedArch {
		return nil, status.Error(codes.Unimplemented, "sandbox: only linux/amd64 is supported")
	}
	dir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "sandbox: state dir: %v", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, status.Errorf(codes.Internal, "sandbox: state dir: %v", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sandbox: state dir lock: %v", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, status.Errorf(codes.FailedPrecondition, "sandbox: state dir %s is in use by another process", dir)
	}
	r := &Runner{
		log:    log,
		dir:    dir,
		ctrDir: filepath.Join(dir, "containers"),
		cgName: cgroupName(dir),
		lock:   lock,
		roots:  newRoots(filepath.Join(dir, "roots")),
	}
	if err := r.sweep(ctx); err != nil {
		lock.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: sweeping leftovers in %s: %v", dir, err)
	}
	for _, d := range []string{r.ctrDir, filepath.Join(dir, "roots", "mnt"), filepath.Join(dir, "roots", "skel")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			lock.Close()
			return nil, status.Errorf(codes.Internal, "sandbox: state dir: %v", err)
		}
	}
	// Sandboxes run as an unprivileged uid: they must be able to traverse to the root
	// overlays (the directories themselves are not readable to them: 0711).
	for _, d := range []string{dir, filepath.Join(dir, "roots"), filepath.Join(dir, "roots", "mnt")} {
		if err := os.Chmod(d, 0o711); err != nil {
			lock.Close()
			return nil, status.Errorf(codes.Internal, "sandbox: state dir: %v", err)
		}
	}
	if r.init, err = trampoline.Memfd(); err != nil {
		lock.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: kiln-init: %v", err)
	}
	return r, nil
}

// Close waits for running sandboxes, unmounts the root overlays and releases the
// state directory. Run fails after Close.
func (r *Runner) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.running.Wait()
	err := r.roots.closeAll()
	if e := removeCgroupParent(r.cgName); e != nil && err == nil {
		err = e
	}
	r.init.Close()
	r.lock.Close()
	if err != nil {
		return status.Errorf(codes.Internal, "sandbox: close: %v", err)
	}
	return nil
}

// Run runs spec.Args in a fresh sandbox and destroys it before returning. The error
// is non-nil only when the sandbox itself failed (bad Spec: INVALID_ARGUMENT; a limit
// the host cannot give: RESOURCE_EXHAUSTED; set-up failure: INTERNAL; ctx ended
// before the start: CANCELED or DEADLINE_EXCEEDED). A command that fails, crashes, is
// killed at its timeout or by the OOM killer is a Result, not an error.
func (r *Runner) Run(ctx context.Context, spec Spec) (Result, error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return Result{}, status.Error(codes.FailedPrecondition, "sandbox: runner is closed")
	}
	r.running.Add(1)
	r.mu.Unlock()
	defer r.running.Done()

	s, err := normalize(spec)
	if err != nil {
		return Result{}, err
	}
	if err := ctx.Err(); err != nil {
		return Result{}, status.FromContextError(err).Err()
	}
	cmd, err := trampoline.Command{Cwd: s.Cwd, Args: s.Args, Env: envFor(&s), DisableASLR: s.DisableASLR}.Encode()
	if err != nil {
		return Result{}, status.Errorf(codes.InvalidArgument, "sandbox: %v", err)
	}
	tr := newTrace()
	defer tr.done()

	root, release, err := r.roots.acquire(s.RootFS, mountPoints(&s))
	if err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: root filesystem: %v", err)
	}
	defer release()
	tr.mark("root")

	id := "k" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(r.seq.Add(1), 10)
	cfg := r.containerConfig(id, root, &s)
	res := Result{PolicyDigest: policyDigest(&s, cfg)}

	stdout, err := newCappedFile(s.Stdout)
	if err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: stdout: %v", err)
	}
	defer stdout.Close()
	stderr, err := newCappedFile(s.Stderr)
	if err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: stderr: %v", err)
	}
	defer stderr.Close()

	var p pipes
	defer p.close()
	if err := p.open(); err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: pipes: %v", err)
	}
	tr.mark("prepare")

	start := time.Now()
	ctr, err := libcontainer.Create(r.ctrDir, id, cfg)
	if err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: create container: %v", err)
	}
	defer func() {
		tr.mark("wait")
		if err := ctr.Destroy(); err != nil {
			r.log.Warn("sandbox: destroy container", "id", id, "err", err)
		}
		tr.mark("destroy")
	}()
	tr.mark("create")
	proc := &libcontainer.Process{
		Args:       []string{"/proc/self/fd/" + strconv.Itoa(trampoline.SelfFD)},
		Env:        []string{"HOME=/"},
		UID:        s.UID,
		GID:        s.GID,
		Cwd:        "/",
		Stdout:     p.stdoutW,
		Stderr:     p.stderrW,
		ExtraFiles: []*os.File{r.init, p.ctrlR, p.statusW},
		Init:       true,
	}
	if err := ctr.Run(proc); err != nil {
		return Result{}, startError(err)
	}
	tr.mark("start")
	p.closeChildEnds()

	var wg sync.WaitGroup
	var statusBytes []byte
	wg.Add(3)
	go func() {
		defer wg.Done()
		_, _ = p.ctrlW.Write(cmd) // fails only if kiln-init died; the wait status says why
		p.ctrlW.Close()
	}()
	go func() { defer wg.Done(); _, _ = io.Copy(stdout, p.stdoutR) }()
	go func() { defer wg.Done(); _, _ = io.Copy(stderr, p.stderrR) }()
	statusDone := make(chan struct{})
	go func() { statusBytes, _ = io.ReadAll(p.statusR); close(statusDone) }()

	if s.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.Timeout)
		defer cancel()
	}
	waited := make(chan struct{})
	var killed atomic.Bool
	go func() {
		select {
		case <-ctx.Done():
			killed.Store(true)
			_ = ctr.Signal(unix.SIGKILL) // kills PID 1, and with it the pid namespace
		case <-waited:
		}
	}()
	ps, werr := proc.Wait()
	close(waited)
	res.Wall = time.Since(start)
	wg.Wait()
	<-statusDone
	if ps == nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: wait: %v", werr)
	}
	rep, err := trampoline.ParseReport(statusBytes)
	if err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: %v", err)
	}
	ws, _ := ps.Sys().(syscall.WaitStatus)
	if rep.Exited {
		ws = rep.Status
	}
	switch {
	case ws.Exited():
		res.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		res.Signal = int(ws.Signal())
		res.ExitCode = 128 + res.Signal
	}
	switch rep.Stage {
	case "":
	case "setup":
		return Result{}, status.Errorf(codes.Internal, "sandbox: kiln-init: %v", rep.Errno)
	default:
		res.StartError = fmt.Sprintf("%s %s: %v", rep.Stage, startTarget(rep.Stage, &s), rep.Errno)
	}
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		res.User = time.Duration(ru.Utime.Nano())
		res.System = time.Duration(ru.Stime.Nano())
		res.MaxRSS = ru.Maxrss * 1024
	}
	res.TimedOut = killed.Load() && ctx.Err() == context.DeadlineExceeded && !rep.Exited
	if killed.Load() && !res.TimedOut && ctx.Err() != nil && !rep.Exited {
		// The caller cancelled: not the command's doing, so not a Result.
		return Result{}, status.FromContextError(ctx.Err()).Err()
	}
	res.OOMKilled = oomKilled(ctr)
	res.Stdout = stdout.result()
	res.Stderr = stderr.result()
	return res, nil
}

func startTarget(stage string, s *Spec) string {
	if stage == "chdir" {
		return s.Cwd
	}
	return s.Args[0]
}

// startError classifies a libcontainer start failure.
func startError(err error) error {
	msg := err.Error()
	if strings.Contains(msg, "OOM") {
		return status.Errorf(codes.ResourceExhausted, "sandbox: start: %v", err)
	}
	return status.Errorf(codes.Internal, "sandbox: start: %v", err)
}

// envFor returns the environment to pass, after the order variation.
func envFor(s *Spec) []string {
	if !s.ReverseEnv {
		return s.Env
	}
	out := make([]string, len(s.Env))
	for i, v := range s.Env {
		out[len(s.Env)-1-i] = v
	}
	return out
}

// mountPoints lists what the root skeleton must hold for s.
func mountPoints(s *Spec) []mountPoint {
	mps := []mountPoint{{path: "/proc"}, {path: "/dev"}, {path: "/sys"}, {path: "/tmp"}}
	if s.ExecRoot != "" {
		mps = append(mps, mountPoint{path: s.ExecRootPath})
	}
	for _, m := range s.Mounts {
		mps = append(mps, mountPoint{path: m.Target, file: m.sourceIsFile})
	}
	return mps
}

// oomKilled reports whether the kernel's OOM killer killed a process of ctr.
func oomKilled(ctr *libcontainer.Container) bool {
	st, err := ctr.State()
	if err != nil {
		return false
	}
	p := st.CgroupPaths["memory"]
	if p == "" {
		return false
	}
	b, err := os.ReadFile(filepath.Join(p, "memory.oom_control"))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n > 0
		}
	}
	return false
}

// pipes connects the host to kiln-init and the command's output.
type pipes struct {
	ctrlR, ctrlW     *os.File // command, host -> kiln-init
	statusR, statusW *os.File // reports, kiln-init -> host
	stdoutR, stdoutW *os.File
	stderrR, stderrW *os.File
}

func (p *pipes) open() error {
	var err error
	for _, pr := range []struct{ r, w **os.File }{
		{&p.ctrlR, &p.ctrlW}, {&p.statusR, &p.statusW}, {&p.stdoutR, &p.stdoutW}, {&p.stderrR, &p.stderrW},
	} {
		if *pr.r, *pr.w, err = os.Pipe(); err != nil {
			return err
		}
	}
	return nil
}

func (p *pipes) closeChildEnds() {
	for _, f := range []**os.File{&p.ctrlR, &p.statusW, &p.stdoutW, &p.stderrW} {
		if *f != nil {
			(*f).Close()
			*f = nil
		}
	}
}

func (p *pipes) close() {
	for _, f := range []**os.File{&p.ctrlR, &p.ctrlW, &p.statusR, &p.statusW, &p.stdoutR, &p.stdoutW, &p.stderrR, &p.stderrW} {
		if *f != nil {
			(*f).Close()
			*f = nil
		}
	}
}

// cappedFile is an io.Writer to a host file (or writer) that keeps at most limit
// bytes and drops the rest, so that the command never blocks on a full pipe.
type cappedFile struct {
	f         *os.File
	w         io.Writer // f, or Output.Writer
	path      string
	limit     int64 // < 0: none
	n         int64
	truncated bool
	err       error
}

func newCappedFile(o Output) (*cappedFile, error) {
	c := &cappedFile{path: o.Path, limit: o.Limit}
	if o.Path == "" {
		c.w = o.Writer
		return c, nil
	}
	f, err := os.OpenFile(o.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, err
	}
	c.f, c.w = f, f
	return c, nil
}

func (c *cappedFile) Write(p []byte) (int, error) {
	n := len(p)
	if c.limit >= 0 && c.n+int64(len(p)) > c.limit {
		c.truncated = true
		p = p[:c.limit-c.n]
	}
	if len(p) == 0 {
		return n, nil
	}
	if c.w != nil && c.err == nil {
		if _, err := c.w.Write(p); err != nil {
			c.err = err // keep draining the pipe; the result says what was kept
			return n, nil
		}
	}
	c.n += int64(len(p))
	return n, nil
}

func (c *cappedFile) Close() error {
	if c.f == nil {
		return nil
	}
	return c.f.Close()
}

func (c *cappedFile) result() OutputResult {
	if c.w == nil {
		return OutputResult{Truncated: c.truncated}
	}
	return OutputResult{Path: c.path, Size: c.n, Truncated: c.truncated || c.err != nil}
}

var _ io.Writer = (*cappedFile)(nil)
