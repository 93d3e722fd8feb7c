package engine

import (
	"context"
	"os"

	"github.com/kilnbuild/kiln/sandbox"
	"golang.org/x/sys/unix"
)

// sandboxRunner runs Jobs in package sandbox's containers.
type sandboxRunner struct{ r *sandbox.Runner }

// Run implements Sandbox.
func (s sandboxRunner) Run(ctx context.Context, j Job) (JobResult, error) {
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
	res, err := s.r.Run(ctx, spec)
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
