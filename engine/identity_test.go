package engine

import (
	"context"
	"path/filepath"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/auth"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRequesterRecorded: the identity that asked for an execution is recorded in the
// action-cache entry and in the action's signed link; an executor key that is revoked
// signs nothing, and its execution fails and is not cached.
func TestRequesterRecorded(t *testing.T) {
	ctx := context.Background()
	e := newTestEnv(t, 1)
	signer, err := attest.Open(ctx, attest.Options{DataDir: filepath.Join(t.TempDir(), "data"), CAS: e.cas, SyncLog: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { signer.Close(ctx) })
	var revoked error
	e.exec.cfg.Attester = linkAttester{s: signer, version: "test", checkKey: func(string) error { return revoked }}
	const who = "oidc:https://token.actions.example#repo:acme/app:ref:refs/heads/main"
	d := e.action(t, &repb.Command{Arguments: []string{"write", "out", "built"}, OutputFiles: []string{"out"}}, e.put(t, &repb.Directory{}), nil)
	w, err := e.sched.Submit(ctx, Request{ActionDigest: d, Owner: who})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := w.Response(ctx)
	w.Close()
	if err != nil || resp.GetStatus().GetCode() != 0 {
		t.Fatalf("execute: %v %v", err, resp.GetStatus())
	}
	cached, err := e.ac.Get(ctx, cache.ActionKey{Action: d})
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := auth.Requester(cached); !ok || got != who {
		t.Fatalf("action cache entry records %q (%v), want %q", got, ok, who)
	}
	env, ok, err := attest.LinkFromResult(cached)
	if err != nil || !ok {
		t.Fatalf("no link in the cached result: %v", err)
	}
	raw, err := signer.Store().Envelope(ctx, env)
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
	d2 := e.action(t, &repb.Command{Arguments: []string{"write", "out", "after the revocation"}, OutputFiles: []string{"out"}}, e.put(t, &repb.Directory{}), nil)
	resp, err = e.run(t, d2)
	if st := resp.GetStatus(); err == nil && (st.GetCode() != int32(codes.FailedPrecondition) || st.GetMessage() == "") {
		t.Fatalf("execution with a revoked key: %v, want FAILED_PRECONDITION", st)
	} else if err != nil && status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("execution with a revoked key: %v", err)
	}
	if _, err := e.ac.Get(ctx, cache.ActionKey{Action: d2}); status.Code(err) != codes.NotFound {
		t.Fatalf("a result signed by no key was cached: %v", err)
	}
}
