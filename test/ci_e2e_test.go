package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/test/harness"
)

// TestCIRebuildExample runs examples/ci-rebuild as a user would: Bazel builds the
// example through kiln, the binary's provenance and bundle are exported, a fresh data dir
// rebuilds it bit for bit, and the published summary verifies with the verifier's key.
func TestCIRebuildExample(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	harness.RequireRoot(t)
	harness.RequireCommand(t, "bazel")
	harness.RequireCommand(t, "debootstrap")
	out := t.TempDir()
	cmd := exec.Command(filepath.Join(harness.RepoRoot(), "examples", "ci-rebuild", "ci-rebuild.sh"), "--kiln", harness.KilnBin(t), "--out", out)
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("ci-rebuild.sh: %v\n%s", err, b)
	}
	if !strings.Contains(string(b), "PASSED") {
		t.Fatalf("no PASSED verdict:\n%s", b)
	}
	for _, f := range []string{"hello", "hello.intoto.json", "hello.cdx.json", "hello.bundle.tar.zst", "hello.vsa.json", "builder-keys.json", "verifier-keys.json"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Errorf("not published: %s", f)
		}
	}
	// The summary is checked independently of the script too, and is about the binary.
	if r := harness.Run(t, "attest", "verify-summary", filepath.Join(out, "hello.vsa.json"), "--key", filepath.Join(out, "verifier-keys.json"), "--subject", filepath.Join(out, "hello")); r.Code != 0 {
		t.Fatalf("verify-summary: %s%s", r.Stdout, r.Stderr)
	}
}
