package server

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func writePolicy(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "authz.json")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestAuthzPolicy: the first rule matching the certificate's common name decides;
// negotiation is open to every client; unknown methods and unmatched clients are refused.
func TestAuthzPolicy(t *testing.T) {
	p, err := LoadAuthzPolicy(writePolicy(t, `{"rules": [
		{"subject": "ci-*", "allow": ["read", "write", "execute", "fetch"]},
		{"subject": "ci-untrusted", "allow": ["read"]},
		{"subject": "dev-*", "allow": ["read"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	const (
		find    = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
		upload  = "/google.bytestream.ByteStream/Write"
		acWrite = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"
		execute = "/build.bazel.remote.execution.v2.Execution/Execute"
		cancel  = "/google.longrunning.Operations/CancelOperation"
		fetch   = "/build.bazel.remote.asset.v1.Fetch/FetchBlob"
		caps    = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"
		refl    = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	)
	for _, c := range []struct {
		cn, method string
		want       bool
	}{
		{"ci-runner", find, true}, {"ci-runner", upload, true}, {"ci-runner", execute, true}, {"ci-runner", fetch, true},
		{"ci-untrusted", upload, true}, // the first matching rule ("ci-*") decides
		{"dev-alice", find, true}, {"dev-alice", upload, false}, {"dev-alice", acWrite, false},
		{"dev-alice", execute, false}, {"dev-alice", cancel, false}, {"dev-alice", fetch, false}, {"dev-alice", caps, true},
		{"mallory", find, false}, {"mallory", caps, true}, {"ci-runner", refl, false}, {"ci-runner", "/x.Y/Z", false},
	} {
		if got, _ := p.allowed(c.cn, c.method); got != c.want {
			t.Errorf("%s calling %s: allowed=%v, want %v", c.cn, c.method, got, c.want)
		}
	}
	if err := p.check(context.Background(), find); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a call without a client certificate: %v, want UNAUTHENTICATED", err)
	}
	for name, body := range map[string]string{
		"no rules":           `{"rules": []}`,
		"unknown permission": `{"rules": [{"subject": "*", "allow": ["admin"]}]}`,
		"bad pattern":        `{"rules": [{"subject": "[", "allow": ["read"]}]}`,
		"empty subject":      `{"rules": [{"subject": "", "allow": ["read"]}]}`,
		"unknown field":      `{"rules": [{"subject": "*", "allow": ["read"], "deny": ["write"]}]}`,
		"not JSON":           `rules: all`,
	} {
		if _, err := LoadAuthzPolicy(writePolicy(t, body)); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", name, err)
		}
	}
}
