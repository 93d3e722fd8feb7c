package sandbox

import (
	"context"
	"os"
	"path/filepath"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnbuild/kiln/sandbox/internal/daemonbin"
)

// daemonEnv names the environment variable that turns the sandbox daemon off: with
// KILN_SANDBOX_DAEMON=0, New runs sandboxes from the calling process even when the
// binary embeds kiln-sandboxd (slower: see docs/sandbox.md).
const daemonEnv = "KILN_SANDBOX_DAEMON"

// Runner creates sandboxes. It is safe for concurrent use by many goroutines.
//
// When the binary embeds the sandbox daemon (kiln built by `make build`, with the
// build tag sandboxd), the sandboxes are created by kiln-sandboxd, a small child
// process that links only this package. Otherwise they are created from this
// process. Both behave the same; see docs/sandbox.md.
type Runner struct {
	impl interface {
		Run(ctx context.Context, spec Spec) (Result, error)
		Close() error
	}
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
	dir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "sandbox: state dir: %v", err)
	}
	exe := cfg.daemon
	if exe == nil {
		exe = daemonbin.Binary
	}
	if len(exe) > 0 && !cfg.inProcess && os.Getenv(daemonEnv) != "0" {
		d, err := newDaemonRunner(ctx, dir, cfg, exe)
		if err != nil {
			return nil, err
		}
		return &Runner{impl: d}, nil
	}
	l, err := newLocal(ctx, dir, cfg, nil)
	if err != nil {
		return nil, err
	}
	return &Runner{impl: l}, nil
}

// Run runs spec.Args in a fresh sandbox and destroys it before returning. The error
// is non-nil only when the sandbox itself failed (bad Spec: INVALID_ARGUMENT; a limit
// the host cannot give: RESOURCE_EXHAUSTED; set-up failure: INTERNAL; ctx ended
// before the command finished: CANCELED or DEADLINE_EXCEEDED; Runner closed:
// FAILED_PRECONDITION; the sandbox daemon died during the run: UNAVAILABLE). A
// command that fails, crashes, is killed at its timeout or by the OOM killer is a
// Result, not an error.
func (r *Runner) Run(ctx context.Context, spec Spec) (Result, error) {
	return r.impl.Run(ctx, spec)
}

// Close waits for running sandboxes, destroys the prepared ones, unmounts the root
// overlays and releases the state directory. Run fails after Close.
func (r *Runner) Close() error {
	return r.impl.Close()
}
