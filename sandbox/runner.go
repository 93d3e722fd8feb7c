package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Config configures a Runner.
type Config struct {
	// StateDir holds the Runner's state (container state, overlay mount points). It
	// is owned by one Runner at a time (locked) and swept of leftovers by New.
	StateDir string
	// Logger receives debug and sweep messages; slog.Default() if nil.
	Logger *slog.Logger
}

// Runner creates sandboxes. It is safe for concurrent use by many goroutines.
type Runner struct {
	log    *slog.Logger
	dir    string // StateDir, absolute
	ctrDir string // libcontainer state root
	cgName string // cgroup parent name, unique to StateDir
	seq    atomic.Uint64
	lock   *os.File
	closed atomic.Bool
}

// New creates a Runner that keeps its state in cfg.StateDir, after removing what a
// crashed earlier process left there (containers, cgroups, mounts).
func New(ctx context.Context, cfg Config) (*Runner, error) {
	if cfg.StateDir == "" {
		return nil, status.Error(codes.InvalidArgument, "sandbox: StateDir is required")
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
	r := &Runner{
		log:    log,
		dir:    dir,
		ctrDir: filepath.Join(dir, "containers"),
		cgName: cgroupName(dir),
	}
	if err := os.MkdirAll(r.ctrDir, 0o700); err != nil {
		return nil, status.Errorf(codes.Internal, "sandbox: state dir: %v", err)
	}
	return r, nil
}

// Close releases the Runner's lock; runs in flight must have returned.
func (r *Runner) Close() error {
	r.closed.Store(true)
	return nil
}

// Run runs spec.Args in a fresh sandbox and destroys it before returning. The error
// is non-nil only when the sandbox itself failed (bad Spec, set-up failure); the
// command's own failure is reported in Result.
func (r *Runner) Run(ctx context.Context, spec Spec) (Result, error) {
	if r.closed.Load() {
		return Result{}, status.Error(codes.FailedPrecondition, "sandbox: runner is closed")
	}
	s, err := normalize(spec)
	if err != nil {
		return Result{}, err
	}
	id := "k" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(r.seq.Add(1), 10)
	cfg, err := r.containerConfig(id, &s)
	if err != nil {
		return Result{}, err
	}
	res := Result{PolicyDigest: policyDigest(&s)}

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

	start := time.Now()
	ctr, err := libcontainer.Create(r.ctrDir, id, cfg)
	if err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: create container: %v", err)
	}
	defer func() {
		if err := ctr.Destroy(); err != nil {
			r.log.Warn("sandbox: destroy container", "id", id, "err", err)
		}
	}()
	env := s.Env
	if s.ReverseEnv {
		env = reversed(env)
	}
	proc := &libcontainer.Process{
		Args:   s.Args,
		Env:    env,
		UID:    s.UID,
		GID:    s.GID,
		Cwd:    s.Cwd,
		Stdin:  nil,
		Stdout: stdout,
		Stderr: stderr,
		Init:   true,
	}
	if err := ctr.Run(proc); err != nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: start: %v", err)
	}

	if s.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.Timeout)
		defer cancel()
	}
	waited := make(chan struct{})
	var timedOut atomic.Bool
	go func() {
		select {
		case <-ctx.Done():
			timedOut.Store(true)
			_ = ctr.Signal(syscall.SIGKILL)
		case <-waited:
		}
	}()
	ps, werr := proc.Wait()
	close(waited)
	res.Wall = time.Since(start)
	if ps == nil {
		return Result{}, status.Errorf(codes.Internal, "sandbox: wait: %v", werr)
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok {
		switch {
		case ws.Exited():
			res.ExitCode = ws.ExitStatus()
		case ws.Signaled():
			res.Signal = int(ws.Signal())
			res.ExitCode = 128 + res.Signal
		}
	}
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		res.User = time.Duration(ru.Utime.Nano())
		res.System = time.Duration(ru.Stime.Nano())
		res.MaxRSS = ru.Maxrss * 1024
	}
	res.TimedOut = timedOut.Load() && ctx.Err() != nil
	res.Stdout = stdout.result()
	res.Stderr = stderr.result()
	return res, nil
}

func reversed(in []string) []string {
	out := make([]string, len(in))
	for i, v := range in {
		out[len(in)-1-i] = v
	}
	return out
}

// cappedFile is an io.Writer to a host file that keeps at most limit bytes.
type cappedFile struct {
	f         *os.File
	path      string
	limit     int64
	n         int64
	truncated bool
}

func newCappedFile(o Output) (*cappedFile, error) {
	c := &cappedFile{path: o.Path, limit: o.Limit}
	if o.Path == "" {
		return c, nil
	}
	f, err := os.OpenFile(o.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, err
	}
	c.f = f
	return c, nil
}

func (c *cappedFile) Write(p []byte) (int, error) {
	n := len(p)
	if c.limit >= 0 && c.n+int64(len(p)) > c.limit {
		c.truncated = true
		p = p[:c.limit-c.n]
	}
	if c.f != nil && len(p) > 0 {
		if _, err := c.f.Write(p); err != nil {
			return 0, err
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
	if c.f == nil {
		return OutputResult{Truncated: c.truncated}
	}
	return OutputResult{Path: c.path, Size: c.n, Truncated: c.truncated}
}

var _ io.Writer = (*cappedFile)(nil)
var _ = errors.New
var _ = fmt.Sprint
