package executor

import (
	"context"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/engine/verify"
	"github.com/kilnbuild/kiln/sandbox"
)

// Determinism checks (package verify) as the executor runs them: kiln verify
// (engine.Engine.Verify) and, in kiln serve, actions with kiln-verify=N or sampled by
// --verify-rate (package scheduler).

// VerifyOptions are the options every check of a runs with: kiln's fixed sandbox as
// the baseline, and what cannot vary for this action.
func VerifyOptions(a *Action, runs int, variations []string) verify.Options {
	o := verify.Options{Action: "sha256:" + a.Digest.String(), Runs: runs, Variations: variations,
		Defaults: verify.Setting{Hostname: sandbox.DefaultHostname, UID: sandbox.DefaultUID, GID: sandbox.DefaultGID,
			ExecRootPath: sandbox.DefaultExecRootPath, ASLR: true},
		Unavailable: map[string]string{}}
	if len(a.Command.GetEnvironmentVariables()) < 2 {
		o.Unavailable[verify.EnvOrder] = "the command has fewer than two environment variables"
	}
	return o
}

// VerifyRunner runs a loaded action for package verify: each run in a fresh sandbox,
// neither reading nor writing the action cache.
type VerifyRunner struct {
	Executor *Executor
	Instance string
	Action   *Action
}

// Run implements verify.Runner.
func (r VerifyRunner) Run(ctx context.Context, s verify.Setting) (*repb.ActionResult, error) {
	ex, err := r.Executor.Execute(ctx, Request{Instance: r.Instance, ActionDigest: r.Action.Digest, NoCache: true,
		Variation: variationOf(s), Queued: time.Now()}, r.Action)
	if err != nil {
		return nil, err
	}
	if ex.Status != nil { // timed out: no comparable result
		return nil, ex.Status
	}
	return ex.Result, nil
}

// variationOf maps a verify setting onto the sandbox. It is never nil, so no
// verification run is attested as a build (Execute links only runs without a
// Variation); the baseline's values are kiln's defaults, so it runs exactly as a
// normal execution does.
func variationOf(s verify.Setting) *Variation {
	return &Variation{Hostname: s.Hostname, UID: s.UID, GID: s.GID, ExecRootPath: s.ExecRootPath, CPUs: s.CPUs,
		ASLR: s.ASLR, ReverseEnv: s.ReverseEnv, Name: s.Name}
}
