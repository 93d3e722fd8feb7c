package cache_test

import (
	"context"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestNamespacePartitions(t *testing.T) {
	ctx := context.Background()
	ac := cache.NewMemoryStore().ActionCache()
	client := cache.WithNamespace(ac, "\x00client")
	k := cache.ActionKey{Instance: "ci", Action: cache.DigestOf([]byte("a"))}
	if err := client.Put(ctx, k, &repb.ActionResult{ExitCode: 7}); err != nil {
		t.Fatal(err)
	}
	if r, err := client.Get(ctx, k); err != nil || r.GetExitCode() != 7 {
		t.Fatalf("namespace read-back: %v %v", r, err)
	}
	if _, err := ac.Get(ctx, k); status.Code(err) != codes.NotFound {
		t.Fatalf("a namespaced entry is visible outside its namespace: %v", err)
	}
}
