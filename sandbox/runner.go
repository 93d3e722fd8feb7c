package sandbox

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnbuild/kiln/sandbox/internal/spawn"
	"github.com/kilnbuild/kiln/sandbox/internal/trampoline"
	"github.com/kilnbuild/kiln/sandbox/seccomp"
)

// Config configures a Runner.
type Config struct {
	// StateDir holds the Runner's state: container state, root overlays and their
	// skeletons. One Runner owns it at a time (it is locked); New removes whatever a
	// crashed earlier owner left there and in its cgroups. Conventionally DATA/sandbox.
	StateDir string
	// Logger receives warnings about clean-up; slog.Default() if nil.
	Logger *slog.Logger
	// Prestart is how many sandboxes to keep prepared, per layout (toolchain, mount
	// points, host name, ids, CPU set, limits), ahead of the commands that will use
	// them. Each still runs one command and is destroyed after it; preparing ahead
	// takes most of a sandbox's set-up off the command's path. A long-lived engine
	// should set it near its concurrency; 0 prepares every sandbox on demand.
	Prestart int

	// daemon, when set, is the sandbox daemon binary to run instead of the one
	// embedded in this binary (tests build it themselves).
	daemon []byte
	// inProcess runs sandboxes from this process even if a daemon is available.
	inProcess bool
}

// localRunner runs sandboxes from this process (package spawn starts each): the
// in-process implementation behind Runner, and what the sandbox daemon serves.
type localRunner struct {
	log    *slog.Logger
	dir    string // StateDir, absolute
	cgName string // cgroup parent name, unique to StateDir
	cg     *cgroupParent
	filter []unix.SockFilter // the compiled seccomp profile
	lock   *os.File
	init   *os.File // sealed memfd holding kiln-init
	roots  *roots
	pool   *pool
	spawn  *spawner // threads that start sandbox processes

	seq     atomic.Uint64
	mu      sync.Mutex
	running sync.WaitGroup
	closed  bool
}

// newLocal creates a localRunner that keeps its state in dir (absolute), after
// removing what a crashed earlier process left there (containers, cgroups, mounts).
// lock is dir's lock file when the caller already holds it (the daemon inherits it
// from kiln); nil makes newLocal take it.
func newLocal(ctx context.Context, dir string, cfg Config, lock *os.File) (*localRunner, error) {
	if !seccomp.Enabled || !spawn.Enabled {
		return nil, status.Error(codes.FailedPrecondition, "sandbox: kiln was built without seccomp support (build with CGO_ENABLED=1 -tags seccomp)")
	}
	if len(trampoline.Binary) == 0 || !supportedArch {
		return nil, status.Error(codes.Unimplemented, "sandbox: only linux/amd64 is supported")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if lock == nil {
		var err error
		if lock, err = lockStateDir(dir); err != nil {
			return nil, err
		}
	}
	r := &localRunner{
		log:    log,
		dir:    dir,
		cgName: cgroupName(dir),
		lock:   lock,
		roots:  newRoots(filepath.Join(dir, "roots")),
		pool:   newPool(cfg.Prestart),
	}
	if err := r.sweep(ctx); err != nil {
		lock.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: sweeping leftovers in %s: %v", dir, err)
	}
	for _, d := range []string{filepath.Join(dir, "roots", "mnt"), filepath.Join(dir, "roots", "skel")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			lock.Close()
			return nil, status.Errorf(codes.Internal, "sandbox: state dir: %v", err)
		}
	}
	var err error
	if r.filter, err = seccomp.Compile(); err != nil {
		lock.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: %v", err)
	}
	if r.cg, err = newCgroupParent(r.cgName); err != nil {
		lock.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: cgroups: %v", err)
	}
	if r.init, err = trampoline.Memfd(); err != nil {
		lock.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: kiln-init: %v", err)
	}
	r.spawn = newSpawner(max(4, 2*runtime.GOMAXPROCS(0)))
	return r, nil
}

// lockStateDir creates dir and takes its lock, which says which process owns it.
func lockStateDir(dir string) (*os.File, error) {
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
	return lock, nil
}

// Close waits for running sandboxes, unmounts the root overlays and releases the
// state directory. Run fails after Close.
func (r *localRunner) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.running.Wait()
	r.pool.close(r)
	r.spawn.close()
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
// before the command finished: CANCELED or DEADLINE_EXCEEDED). A command that fails,
// crashes, is killed at its timeout or by the OOM killer is a Result, not an error.
func (r *localRunner) Run(ctx context.Context, spec Spec) (Result, error) {
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

	key := poolKey(&s)
	sb := r.pool.take(ctx, key)
	if sb != nil && !sb.alive() {
		// Its kiln-init died while it waited (killed from outside): discard it.
		sb.destroy(r.log)
		sb = nil
	}
	if sb == nil {
		if sb, err = r.prepare(&s, key, true); err != nil {
			return Result{}, err
		}
		tr.mark("prepare")
	} else {
		tr.mark("take")
	}
	if !s.OneOff {
		r.pool.refill(r, &s, key)
	}
	defer func() {
		tr.mark("run")
		sb.destroy(r.log)
		tr.mark("destroy")
	}()
	return r.execute(ctx, sb, &s, cmd, tr)
}

// sandbox is a started sandbox whose PID 1, kiln-init, waits for its command
// (execute). It runs exactly one command.
type sandbox struct {
	id      string
	key     string
	proc    *spawn.Process // nil once reaped
	status  unix.WaitStatus
	rusage  unix.Rusage
	cg      *sandboxCgroups
	p       pipes
	bound   bool   // the exec root and mounts are in place (else execute attaches them)
	release func() // of the root overlay
}

// prepare starts a sandbox for specs with s's key: namespaces, cgroups, root,
// seccomp and ids are set up, and kiln-init waits for its command. With binds, the
// exec root and mounts of s are bound too; otherwise execute attaches them.
func (r *localRunner) prepare(s *Spec, key string, binds bool) (_ *sandbox, retErr error) {
	root, release, err := r.roots.acquire(s.RootFS, mountPoints(s))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sandbox: root filesystem: %v", err)
	}
	sb := &sandbox{
		id:      "k" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(r.seq.Add(1), 10),
		key:     key,
		release: release,
		bound:   binds,
	}
	defer func() {
		if retErr != nil {
			sb.destroy(r.log)
		}
	}()
	if sb.cg, err = r.cg.create(sb.id, s); err != nil {
		return nil, status.Errorf(codes.ResourceExhausted, "sandbox: cgroups: %v", err)
	}
	if err := sb.p.open(); err != nil {
		return nil, status.Errorf(codes.Internal, "sandbox: pipes: %v", err)
	}
	flags := 0
	for _, ns := range namespaces {
		flags |= ns.flag
	}
	params := &spawn.Params{
		CloneFlags:  flags,
		CgroupProcs: sb.cg.procs,
		Steps:       setupSteps(root, s, binds),
		Hostname:    s.Hostname,
		Loopback:    true,
		NoFile:      s.Limits.OpenFiles,
		UID:         s.UID,
		GID:         s.GID,
		Filter:      r.filter,
		Stdout:      sb.p.stdoutW,
		Stderr:      sb.p.stderrW,
		Init:        r.init,
		Extra4:      sb.p.ctrlR,
		Extra5:      sb.p.statusW,
	}
	r.spawn.do(func() { sb.proc, err = spawn.Start(params) })
	sb.cg.closeProcs()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sandbox: start: %v", err)
	}
	sb.p.closeChildEnds()
	return sb, nil
}

// alive reports whether sb's kiln-init still runs.
func (sb *sandbox) alive() bool {
	if sb.proc == nil {
		return false
	}
	var info unix.Siginfo
	err := unix.Waitid(unix.P_PIDFD, sb.proc.Pidfd, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	return err == nil && info.Signo == 0
}

// kill sends SIGKILL to sb's kiln-init, which takes the whole pid namespace with it.
func (sb *sandbox) kill() {
	if sb.proc != nil {
		_ = unix.PidfdSendSignal(sb.proc.Pidfd, unix.SIGKILL, nil, 0)
	}
}

// wait reaps sb's kiln-init once it has exited (the kernel has then killed and
// reaped every other process of its pid namespace) and keeps its status.
func (sb *sandbox) wait() error {
	if sb.proc == nil {
		return nil
	}
	for {
		_, err := unix.Wait4(sb.proc.Pid, &sb.status, 0, &sb.rusage)
		if err == unix.EINTR {
			continue
		}
		unix.Close(sb.proc.Pidfd)
		sb.proc = nil
		return err
	}
}

// destroy kills whatever still runs in the sandbox and removes its cgroups.
func (sb *sandbox) destroy(log *slog.Logger) {
	if sb.proc != nil {
		sb.kill()
		_ = sb.wait()
	}
	if sb.cg != nil {
		if err := sb.cg.remove(); err != nil {
			log.Warn("sandbox: removing its cgroups", "id", sb.id, "err", err)
		}
		sb.cg = nil
	}
	sb.p.close()
	if sb.release != nil {
		sb.release()
		sb.release = nil
	}
}

// execute binds s's mounts into sb, hands kiln-init the command and waits for it.
func (r *localRunner) execute(ctx context.Context, sb *sandbox, s *Spec, cmd []byte, tr *trace) (Result, error) {
	var res Result
	res.Policy, res.PolicyDigest = policyDocument(s)
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
	if !sb.bound {
		if err := attachMounts(sb.proc.Pid, lateMounts(s)); err != nil {
			return Result{}, status.Errorf(codes.Internal, "sandbox: bind mounts: %v", err)
		}
		tr.mark("attach")
	}

	start := time.Now()
	var wg sync.WaitGroup
	var statusBytes []byte
	wg.Add(3)
	go func() {
		defer wg.Done()
		_, _ = sb.p.ctrlW.Write(cmd) // fails only if kiln-init died; the wait status says why
		sb.p.ctrlW.Close()
	}()
	go func() { defer wg.Done(); _, _ = io.Copy(stdout, sb.p.stdoutR) }()
	go func() { defer wg.Done(); _, _ = io.Copy(stderr, sb.p.stderrR) }()
	statusDone := make(chan struct{})
	go func() { statusBytes, _ = io.ReadAll(sb.p.statusR); close(statusDone) }()

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
			sb.kill() // kills PID 1, and with it the pid namespace
		case <-waited:
		}
	}()
	werr := sb.wait()
	tr.mark("wait")
	close(waited)
	res.Wall = time.Since(start)
	wg.Wait()
	<-statusDone
	if werr != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: wait: %v", werr)
	}
	rep, err := trampoline.ParseReport(statusBytes)
	if err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: %v", err)
	}
	ws := syscall.WaitStatus(sb.status)
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
		res.StartError = fmt.Sprintf("%s %s: %v", rep.Stage, startTarget(rep.Stage, s), rep.Errno)
	}
	if rep.HasUsage {
		res.User, res.System, res.MaxRSS = rep.User, rep.System, rep.MaxRSSKiB*1024
	} else {
		// kiln-init was killed before it could report: this includes its own use.
		ru := &sb.rusage
		res.User = time.Duration(ru.Utime.Nano())
		res.System = time.Duration(ru.Stime.Nano())
		res.MaxRSS = ru.Maxrss * 1024
	}
	res.TimedOut = killed.Load() && ctx.Err() == context.DeadlineExceeded && !rep.Exited
	if killed.Load() && !res.TimedOut && ctx.Err() != nil && !rep.Exited {
		// The caller cancelled: not the command's doing, so not a Result.
		return Result{}, status.FromContextError(ctx.Err()).Err()
	}
	res.OOMKilled = sb.cg.oomKilled()
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

// lateMounts are the bind mounts of s, attached after the container started.
func lateMounts(s *Spec) []Mount {
	var ms []Mount
	if s.ExecRoot != "" {
		ms = append(ms, Mount{Source: s.ExecRoot, Target: s.ExecRootPath, Writable: true})
	}
	return append(ms, s.Mounts...)
}

// sortedMountPoints is mountPoints in a canonical order.
func sortedMountPoints(s *Spec) []mountPoint {
	mps := mountPoints(s)
	sort.Slice(mps, func(i, j int) bool { return mps[i].Path < mps[j].Path })
	return mps
}

// mountPoints lists what the root skeleton must hold for s.
func mountPoints(s *Spec) []mountPoint {
	mps := []mountPoint{{Path: "/proc"}, {Path: "/dev"}, {Path: "/sys"}, {Path: "/tmp"}}
	if s.ExecRoot != "" {
		mps = append(mps, mountPoint{Path: s.ExecRootPath})
	}
	for _, m := range s.Mounts {
		mps = append(mps, mountPoint{Path: m.Target, File: m.sourceIsFile})
	}
	return mps
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
