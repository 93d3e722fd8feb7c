package test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
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
	out, tmp := t.TempDir(), t.TempDir()
	cmd := exec.Command(filepath.Join(harness.RepoRoot(), "examples", "ci-rebuild", "ci-rebuild.sh"), "--kiln", harness.KilnBin(t), "--out", out)
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("ci-rebuild.sh: %v\n%s", err, b)
	}
	// The job's data dirs, workspace and Bazel output root (about 2 GB) are gone.
	if left, _ := os.ReadDir(tmp); len(left) != 0 {
		t.Errorf("ci-rebuild.sh left %d entries in TMPDIR, %s first", len(left), left[0].Name())
	}
	if !strings.Contains(string(b), "PASSED") {
		t.Fatalf("no PASSED verdict:\n%s", b)
	}
	for _, f := range []string{"hello", "hello.intoto.json", "hello.cdx.json", "hello.bundle.tar.zst", "hello.vsa.json", "builder-keys.json", "verifier-keys.json",
		"hello.vsa-2.json", "verifier-2-keys.json", "production-policy.yaml", "hello.decision.json", "gate-keys.json"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Errorf("not published: %s", f)
		}
	}
	// The summary is checked independently of the script too, and is about the binary.
	if r := harness.Run(t, "attest", "verify-summary", filepath.Join(out, "hello.vsa.json"), "--key", filepath.Join(out, "verifier-keys.json"), "--subject", filepath.Join(out, "hello")); r.Code != 0 {
		t.Fatalf("verify-summary: %s%s", r.Stdout, r.Stderr)
	}
	checkDecision(t, out)
}

// checkDecision: the gate allowed production, and its published decision is signed by
// the gate's key and names the policy by digest, the binary, and every attestation
// it considered (provenance, links, SBOM, both summaries).
func checkDecision(t *testing.T, out string) {
	t.Helper()
	env, err := os.ReadFile(filepath.Join(out, "hello.decision.json"))
	if err != nil {
		t.Fatal(err)
	}
	kb, err := os.ReadFile(filepath.Join(out, "gate-keys.json"))
	if err != nil {
		t.Fatal(err)
	}
	trust, err := keys.ParseTrust(kb)
	if err != nil {
		t.Fatal(err)
	}
	e, err := attest.ParseEnvelope(env)
	if err != nil {
		t.Fatal(err)
	}
	_, payload, err := attest.VerifyEnvelope(context.Background(), e, trust)
	if err != nil {
		t.Fatalf("decision signature: %v", err)
	}
	var st struct {
		PredicateType string `json:"predicateType"`
		Subject       []struct {
			Digest map[string]string `json:"digest"`
		} `json:"subject"`
		Predicate struct {
			Decision string `json:"decision"`
			Stage    string `json:"stage"`
			Policy   struct {
				Digest map[string]string `json:"digest"`
			} `json:"policy"`
			Attestations []struct {
				Kind     string `json:"kind"`
				Verified bool   `json:"verified"`
			} `json:"attestations"`
		} `json:"predicate"`
	}
	if err := json.Unmarshal(payload, &st); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, a := range st.Predicate.Attestations {
		if a.Verified {
			kinds[a.Kind]++
		}
	}
	if st.PredicateType != "https://kiln.build/gate-decision/v1" || st.Predicate.Decision != "ALLOW" || st.Predicate.Stage != "production" ||
		st.Predicate.Policy.Digest["sha256"] != fileSHA256(t, filepath.Join(out, "production-policy.yaml")) ||
		len(st.Subject) != 1 || st.Subject[0].Digest["sha256"] != fileSHA256(t, filepath.Join(out, "hello")) ||
		kinds["provenance"] != 1 || kinds["vsa"] != 2 || kinds["sbom"] != 1 || kinds["link"] == 0 {
		t.Fatalf("decision: %s", payload)
	}
}
