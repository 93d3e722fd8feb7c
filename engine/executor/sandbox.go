package executor

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/kilnbuild/kiln/sandbox"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SandboxRunner runs Jobs in package sandbox's containers.
type SandboxRunner struct{ R *sandbox.Runner }

// Run implements Sandbox.
func (s SandboxRunner) Run(ctx context.Context, j Job) (JobResult, error) {
	spec := sandbox.Spec{
		RootFS: j.RootFS, ExecRoot: j.ExecRoot, Cwd: j.Cwd, Args: j.Args, Env: j.Env,
		Stdout: sandbox.Output{Path: j.Stdout}, Stderr: sandbox.Output{Path: j.Stderr},
		Timeout: j.Timeout,
	}
	if v := j.Variation; v != nil {
		spec.Hostname, spec.UID, spec.GID = v.Hostname, v.UID, v.GID
		spec.ExecRootPath, spec.CPUs = v.ExecRootPath, v.CPUs
		spec.DisableASLR, spec.ReverseEnv = !v.ASLR, v.ReverseEnv
		// Variations are checks: do not keep sandboxes prepared for their layouts.
		spec.OneOff = true
		if err := chownExecRoot(j.ExecRoot, v.UID, v.GID); err != nil { // the varied user must own what the default one would
			return JobResult{}, err
		}
	}
	res, err := s.R.Run(ctx, spec)
	if err != nil {
		return JobResult{}, err
	}
	if res.StartError != "" {
		// The client sees why its command did not start where it looks: stderr.
		if f, err := os.OpenFile(j.Stderr, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644); err == nil {
			f.WriteString("kiln: " + res.StartError + "\n")
			f.Close()
		}
	}
	jr := JobResult{
		ExitCode: res.ExitCode, TimedOut: res.TimedOut, OOMKilled: res.OOMKilled,
		StdoutTruncated: res.Stdout.Truncated, StderrTruncated: res.Stderr.Truncated,
		PolicyDigest: res.PolicyDigest, Policy: res.Policy, Wall: res.Wall, User: res.User, Sys: res.System, MaxRSS: res.MaxRSS,
	}
	if res.Signal != 0 {
		jr.Signal = unix.SignalName(unix.Signal(res.Signal))
	}
	return jr, nil
}

// chownExecRoot hands what the executor made for the default sandbox user (the exec
// root's directories and symlinks) to a variation's uid/gid, so the varied user may
// write where the default one may. Inputs are root-owned and stay so.
func chownExecRoot(root string, uid, gid int) error {
	if uid == 0 {
		uid = sandbox.DefaultUID
	}
	if gid == 0 {
		gid = sandbox.DefaultGID
	}
	if root == "" || (uid == sandbox.DefaultUID && gid == sandbox.DefaultGID) {
		return nil
	}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != sandbox.DefaultUID {
			return nil
		}
		return os.Lchown(p, uid, gid)
	})
	if err != nil {
		return status.Errorf(codes.Internal, "hand the exec root to uid %d: %v", uid, err)
	}
	return nil
}
