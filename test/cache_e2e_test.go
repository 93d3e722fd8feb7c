// Package test holds kiln's end-to-end tests: the real binary with real clients.
package test

import (
	"context"
	"encoding/json"
	"os/exec"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestBazelRemoteCache builds examples/bazel-hello with Debian's Bazel 4.2.3 against
// `kiln serve` as its remote cache; after `bazel clean` every action is a cache hit.
func TestBazelRemoteCache(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t, "--allow-client-ac-writes", "--no-execution")
	bz := harness.NewBazel(t, "examples/bazel-hello")
	flags := []string{"build", "--remote_cache=grpc://" + srv.Addr, "--spawn_strategy=local", "//..."}
	out, err := bz.Run(t, flags...)
	if err != nil {
		t.Fatalf("first build: %v\n%s", err, out)
	}
	first := harness.Processes(out)
	ran := first["total"] - first["internal"]
	if ran < 5 || first["remote cache hit"] != 0 {
		t.Fatalf("first build from a clean cache: %v\n%s", first, out)
	}
	if out, err := bz.Run(t, "clean"); err != nil {
		t.Fatalf("clean: %v\n%s", err, out)
	}
	out, err = bz.Run(t, flags...)
	if err != nil {
		t.Fatalf("second build: %v\n%s", err, out)
	}
	second := harness.Processes(out)
	if second["remote cache hit"] != ran || second["total"]-second["internal"] != ran {
		t.Fatalf("second build: %v, want all %d non-internal processes as remote cache hits\n%s", second, ran, out)
	}
	hello, err := exec.Command(bz.Workspace + "/bazel-bin/app/hello").CombinedOutput()
	if err != nil || !strings.Contains(string(hello), "hello, kiln (greet 1.0.0)") {
		t.Fatalf("binary from cache: %v %q", err, hello)
	}
	if hits := srv.Metric(t, "kiln_action_cache_lookups_total", `result="hit"`); int(hits) != ran {
		t.Fatalf("server counted %v hits, want %d", hits, ran)
	}
}

// TestClientWritesNeedCacheOnly: a server that executes actions refuses to start with
// client action-cache writes enabled.
func TestClientWritesNeedCacheOnly(t *testing.T) {
	res := harness.Run(t, "serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--http-listen", "", "--allow-client-ac-writes")
	if res.Code == 0 || !strings.Contains(res.Stderr, "--no-execution") {
		t.Fatalf("serve with client writes and execution: exit %d %q", res.Code, res.Stderr)
	}
}

// TestBazelCacheWritesRefused: without --allow-client-ac-writes the server advertises
// update_enabled=false; Bazel then refuses to upload (a clear error), and with uploads
// off it builds, but nothing it ran locally is ever served back as a hit.
func TestBazelCacheWritesRefused(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t)
	bz := harness.NewBazel(t, "examples/bazel-hello")
	out, err := bz.Run(t, "build", "--remote_cache=grpc://"+srv.Addr, "//...")
	if err == nil || !strings.Contains(out, "not authorized to write local results") {
		t.Fatalf("Bazel with uploads on against a read-only cache: %v\n%s", err, out)
	}
	flags := []string{"build", "--remote_cache=grpc://" + srv.Addr, "--noremote_upload_local_results", "--spawn_strategy=local", "//..."}
	if out, err := bz.Run(t, flags...); err != nil {
		t.Fatalf("first build: %v\n%s", err, out)
	}
	bz.Run(t, "clean")
	out, err = bz.Run(t, flags...)
	if err != nil {
		t.Fatalf("second build: %v\n%s", err, out)
	}
	if p := harness.Processes(out); p["remote cache hit"] != 0 {
		t.Fatalf("results were served from a cache clients cannot write: %v", p)
	}
	if n := srv.Metric(t, "kiln_grpc_requests_total", "UpdateActionResult", `code="OK"`); n != 0 {
		t.Fatalf("%v client action-cache writes accepted", n)
	}
}

// TestClientWrittenResultsNeverExecuted: results a client uploaded to a cache-only
// server are not served when the same data dir is later served with execution.
func TestClientWrittenResultsNeverExecuted(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	bb := harness.RecipeToolchain(t, data, "busybox")
	out := t.TempDir()
	j := kilnExecNoCache(t, data, bb, out)
	hash, size, _ := strings.Cut(strings.TrimPrefix(j.Action, "sha256:"), "/")
	action := &repb.Digest{Hash: hash, SizeBytes: atoi(t, size)}
	evil := []byte("EVIL backdoor")
	srv := harness.StartServer(t, "--data", data, "--no-execution", "--allow-client-ac-writes")
	c := sdkClient(t, srv.Addr)
	ed, err := c.WriteBlob(context.Background(), evil)
	if err != nil {
		t.Fatal(err)
	}
	ac := repb.NewActionCacheClient(c.Connection())
	planted := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "o.txt", Digest: ed.ToProto()}}}
	if _, err := ac.UpdateActionResult(context.Background(), &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: planted}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.GetActionResult(context.Background(), &repb.GetActionResultRequest{ActionDigest: action}); err != nil {
		t.Fatalf("cache-only server does not serve its clients' results: %v", err)
	}
	srv.Stop(t)
	srv.Restart(t, "--default-toolchain", bb)
	c2 := sdkClient(t, srv.Addr)
	ac2 := repb.NewActionCacheClient(c2.Connection())
	if _, err := ac2.GetActionResult(context.Background(), &repb.GetActionResultRequest{ActionDigest: action}); status.Code(err) != codes.NotFound {
		t.Fatalf("executor served a client-written result: %v", err)
	}
	op, err := c2.ExecuteAndWait(context.Background(), &repb.ExecuteRequest{ActionDigest: action})
	if err != nil {
		t.Fatal(err)
	}
	resp := &repb.ExecuteResponse{}
	op.GetResponse().UnmarshalTo(resp)
	if resp.GetCachedResult() || len(resp.GetResult().GetOutputFiles()) != 1 || resp.GetResult().GetOutputFiles()[0].GetDigest().GetHash() == ed.Hash {
		t.Fatalf("Execute answered with the planted result: %v", resp)
	}
}

func kilnExecNoCache(t *testing.T, data, bb, out string) execJSON {
	t.Helper()
	res := harness.Run(t, "exec", "--data", data, "--toolchain", "docker://kiln/busybox@"+bb, "--output", "o.txt", "--out", out, "--no-cache", "--json", "--", "/bin/sh", "-c", "echo honest > o.txt")
	if res.Code != 0 {
		t.Fatal(res.Stderr)
	}
	var j execJSON
	if err := json.Unmarshal([]byte(res.Stdout), &j); err != nil {
		t.Fatal(err)
	}
	return j
}
