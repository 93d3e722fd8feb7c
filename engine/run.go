package engine

import (
	"context"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/verify"
)

// LocalResult is the outcome of RunLocal.
type LocalResult struct {
	ActionDigest cache.Digest
	Execution    *executor.Execution
}

// RunLocal builds spec's action and runs it through the same path as the server:
// action-cache lookup (unless noCache), sandboxed execution, outputs into the CAS,
// link, action-cache write.
func (e *Engine) RunLocal(ctx context.Context, spec executor.LocalSpec, noCache bool, v *executor.Variation) (*LocalResult, error) {
	d, err := executor.BuildAction(ctx, e.CAS, spec)
	if err != nil {
		return nil, err
	}
	out := &LocalResult{ActionDigest: d}
	a, err := e.Executor.LoadAction(ctx, d)
	if err != nil {
		return nil, err
	}
	if !noCache && v == nil {
		if r, err := e.Executor.CachedResult(ctx, "", d); err == nil {
			out.Execution = &executor.Execution{Result: r, Cached: true, Action: a.Action, Command: a.Command}
			return out, nil
		}
	}
	ex, err := e.Executor.Execute(ctx, executor.Request{ActionDigest: d, NoCache: noCache || v != nil, Variation: v, Queued: time.Now()}, a)
	if err != nil {
		return nil, err
	}
	out.Execution = ex
	return out, nil
}

// Verify checks that action d, whose blobs are in the CAS, is deterministic: it runs
// it opts.Runs times in fresh sandboxes with variations, without the action cache,
// and compares every output (kiln verify). opts.Action and opts.Defaults are set here.
func (e *Engine) Verify(ctx context.Context, d cache.Digest, opts verify.Options) (*verify.Report, error) {
	a, err := e.Executor.LoadAction(ctx, d)
	if err != nil {
		return nil, err
	}
	def := executor.VerifyOptions(a, opts.Runs, opts.Variations)
	opts.Action, opts.Defaults = def.Action, def.Defaults
	if opts.Unavailable == nil {
		opts.Unavailable = map[string]string{}
	}
	for n, why := range def.Unavailable {
		opts.Unavailable[n] = why
	}
	return verify.Verify(ctx, e.CAS, executor.VerifyRunner{Executor: e.Executor, Action: a}, opts, nil)
}
