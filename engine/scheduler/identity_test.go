package scheduler

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/executor/executortest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRequesterRecorded: the identity that asked for an execution (the operation's
// owner) is recorded in the action-cache entry and in the action's signed link; an
// executor key that is revoked signs nothing, and its execution fails and is not
// cached.
func TestRequesterRecorded(t *testing.T) {
	ctx := context.Background()
	var signer *attest.Signer
	var revoked error
	env := executortest.NewEnv(t, func(c *executor.ExecutorConfig) {
		var err error
		if signer, err = attest.Open(ctx, attest.Options{DataDir: filepath.Join(t.TempDir(), "data"), CAS: c.CAS, SyncLog: true}); err != nil {
			t.Fatal(err)
		}
		c.Attester = executor.LinkAttester{Signer: signer, Version: "test", CheckKey: func(string) error { return revoked }}
	})
	t.Cleanup(func() { signer.Close(ctx) })
	s := NewScheduler(env.Exec, SchedulerConfig{Concurrency: 1, MaxQueue: 4, CancelGrace: time.Minute})
	run := func(d cache.Digest, owner string) (*repb.ExecuteResponse, error) {
		w, err := s.Submit(ctx, execution.Request{ActionDigest: d, Owner: owner})
		if err != nil {
			return nil, err
		}
		defer w.Close()
		return execution.Response(ctx, w)
	}
	const who = "oidc:https://token.actions.example#repo:acme/app:ref:refs/heads/main"
	d := env.Action(t, &repb.Command{Arguments: []string{"write", "out", "built"}, OutputFiles: []string{"out"}}, env.Put(t, &repb.Directory{}), nil)
	if resp, err := run(d, who); err != nil || resp.GetStatus().GetCode() != 0 {
		t.Fatalf("execute: %v %v", err, resp.GetStatus())
	}
	cached, err := env.AC.Get(ctx, cache.ActionKey{Action: d})
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := auth.Requester(cached); !ok || got != who {
		t.Fatalf("action cache entry records %q (%v), want %q", got, ok, who)
	}
	envd, ok, err := attest.LinkFromResult(cached)
	if err != nil || !ok {
		t.Fatalf("no link in the cached result: %v", err)
	}
	raw, err := signer.Store().Envelope(ctx, envd)
	if err != nil {
		t.Fatal(err)
	}
	payload, err := attest.EnvelopePayload(raw)
	if err != nil {
		t.Fatal(err)
	}
	link, err := attest.DecodeLink(payload)
	if err != nil || link.Environment[attest.EnvRequestedBy] != who {
		t.Fatalf("link environment %v (%v), want %s = %q", link.Environment, err, attest.EnvRequestedBy, who)
	}

	revoked = status.Error(codes.FailedPrecondition, "executor key revoked")
	d2 := env.Action(t, &repb.Command{Arguments: []string{"write", "out", "after the revocation"}, OutputFiles: []string{"out"}}, env.Put(t, &repb.Directory{}), nil)
	resp, err := run(d2, who)
	if err == nil && resp.GetStatus().GetCode() != int32(codes.FailedPrecondition) || err != nil && status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("execution with a revoked key: %v %v, want FAILED_PRECONDITION", err, resp.GetStatus())
	}
	if _, err := env.AC.Get(ctx, cache.ActionKey{Action: d2}); status.Code(err) != codes.NotFound {
		t.Fatalf("a result signed by no key was cached: %v", err)
	}
}
