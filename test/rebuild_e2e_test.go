package test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/internal/testpki"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// chainEnv is a data dir with the busybox toolchain and a two-step chain built by
// kiln exec: step 1 makes gen.txt, step 2 reads it and makes final.txt (the subject).
type chainEnv struct {
	data, bb   string
	subject    string // path of final.txt
	keys       string // `kiln attest pubkey --all --json` of data
	action2    string // step 2's action digest HASH/SIZE
	outputsDir string
}

type execJSON struct {
	Action   string            `json:"action"`
	ExitCode int               `json:"exit_code"`
	Outputs  map[string]string `json:"outputs"`
	Cached   bool              `json:"cached"`
}

func kilnExec(t *testing.T, data, bb, input, out string, output string, script string) execJSON {
	t.Helper()
	args := []string{"exec", "--data", data, "--toolchain", "docker://kiln/busybox@" + bb, "--output", output, "--out", out, "--json"}
	if input != "" {
		args = append(args, "--input", input)
	}
	res := harness.Run(t, append(args, "--", "/bin/sh", "-c", script)...)
	if res.Code != 0 {
		t.Fatalf("kiln exec %q: exit %d: %s", script, res.Code, res.Stderr)
	}
	var j execJSON
	if err := json.Unmarshal([]byte(res.Stdout), &j); err != nil {
		t.Fatalf("kiln exec --json: %v\n%s", err, res.Stdout)
	}
	return j
}

func newChain(t *testing.T, step2 string) *chainEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	c := &chainEnv{data: t.TempDir(), outputsDir: t.TempDir()}
	c.bb = harness.RecipeToolchain(t, c.data, "busybox")
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "words"), []byte("pear\napple\nfig\n"), 0o644)
	gen := filepath.Join(c.outputsDir, "step1")
	kilnExec(t, c.data, c.bb, src, gen, "gen.txt", "sort words > gen.txt")
	final := filepath.Join(c.outputsDir, "step2")
	j := kilnExec(t, c.data, c.bb, gen, final, "final.txt", step2)
	c.action2 = strings.TrimPrefix(j.Action, "sha256:")
	c.subject = filepath.Join(final, "final.txt")
	keys := harness.Run(t, "attest", "pubkey", "--data", c.data, "--all", "--json")
	if keys.Code != 0 {
		t.Fatal(keys.Stderr)
	}
	c.keys = filepath.Join(t.TempDir(), "keys.json")
	os.WriteFile(c.keys, []byte(keys.Stdout), 0o644)
	return c
}

// TestRebuildFromBundle: export a two-action chain as a tar bundle, rebuild it on a
// fresh data dir with only the public keys: PASSED, and the summary verifies.
func TestRebuildFromBundle(t *testing.T) {
	c := newChain(t, "tr a-z A-Z < gen.txt > final.txt")
	bundle := filepath.Join(t.TempDir(), "hello.bundle.tar")
	if res := harness.Run(t, "export", "--data", c.data, "--subject", c.subject, "--out", bundle); res.Code != 0 {
		t.Fatalf("export: %s", res.Stderr)
	}
	fresh := t.TempDir()
	vsa := filepath.Join(t.TempDir(), "vsa.json")
	prov := filepath.Join(t.TempDir(), "provenance.json")
	extractOne(t, bundle, "provenance.json", prov)
	res := harness.Run(t, "rebuild", prov, "--bundle", bundle, "--key", c.keys, "--data", fresh, "--out", vsa, "--json")
	if res.Code != 0 {
		t.Fatalf("rebuild: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
	}
	var out struct {
		Verdict string `json:"verdict"`
		Actions []struct {
			Action string `json:"action"`
		} `json:"actions"`
	}
	json.Unmarshal([]byte(res.Stdout), &out)
	if out.Verdict != "PASSED" || len(out.Actions) != 2 {
		t.Fatalf("rebuild result %+v", out)
	}
	// The summary is signed by the rebuilding data dir's key.
	rk := harness.Run(t, "attest", "pubkey", "--data", fresh, "--all", "--json")
	rkeys := filepath.Join(t.TempDir(), "rebuilder.json")
	os.WriteFile(rkeys, []byte(rk.Stdout), 0o644)
	if v := harness.Run(t, "attest", "verify-summary", vsa, "--key", rkeys, "--subject", c.subject); v.Code != 0 {
		t.Fatalf("verify-summary: %s%s", v.Stdout, v.Stderr)
	}
	if v := harness.Run(t, "attest", "verify-summary", vsa, "--key", c.keys); v.Code != 1 {
		t.Fatalf("a summary checked against another key passed: %s", v.Stdout)
	}
	// The same bundle compressed (.tar.zst): smaller, rebuilds the same; cut short, it
	// is refused before anything runs.
	zbundle := filepath.Join(t.TempDir(), "hello.bundle.tar.zst")
	if res := harness.Run(t, "export", "--data", c.data, "--subject", c.subject, "--out", zbundle); res.Code != 0 {
		t.Fatalf("export .tar.zst: %s", res.Stderr)
	}
	zb, err := os.ReadFile(zbundle)
	if err != nil {
		t.Fatal(err)
	}
	tb, _ := os.Stat(bundle)
	if !bytes.HasPrefix(zb, []byte{0x28, 0xb5, 0x2f, 0xfd}) || int64(len(zb)) >= tb.Size()*3/4 {
		t.Fatalf("compressed bundle: %d bytes (tar %d), zstd magic %v", len(zb), tb.Size(), bytes.HasPrefix(zb, []byte{0x28, 0xb5, 0x2f, 0xfd}))
	}
	if res := harness.Run(t, "rebuild", prov, "--bundle", zbundle, "--key", c.keys, "--data", t.TempDir(), "--out", vsa); res.Code != 0 || !strings.Contains(res.Stderr, "PASSED") {
		t.Fatalf("rebuild from .tar.zst: exit %d\n%s", res.Code, res.Stderr)
	}
	cut := filepath.Join(t.TempDir(), "cut.tar.zst")
	os.WriteFile(cut, zb[:len(zb)/2], 0o644)
	if res := harness.Run(t, "rebuild", prov, "--bundle", cut, "--key", c.keys, "--data", t.TempDir(), "--out", vsa); res.Code != 2 || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 {
		t.Fatalf("rebuild from a truncated .tar.zst: exit %d, stderr %q; want exit 2 and one line", res.Code, res.Stderr)
	}

	// A quarantined artifact can still be rebuilt: that is how it is cleared.
	sum := fileSHA256(t, c.subject)
	if r := harness.Run(t, "quarantine", "add", "--data", fresh, "sha256:"+sum, "--reason", "suspected"); r.Code != 0 {
		t.Fatal(r.Stderr)
	}
	res = harness.Run(t, "rebuild", prov, "--bundle", bundle, "--key", c.keys, "--data", fresh, "--out", vsa)
	if res.Code != 0 {
		t.Fatalf("rebuild of a quarantined artifact: exit %d\n%s", res.Code, res.Stderr)
	}
	if ls := harness.Run(t, "quarantine", "ls", "--data", fresh); !strings.Contains(ls.Stdout, "suspected") {
		t.Fatalf("the operator's quarantine reason was replaced: %s", ls.Stdout)
	}
}

// TestRebuildTamperedBundle: a changed byte anywhere the signatures cover stops the
// rebuild before any action runs, and nothing is quarantined.
func TestRebuildTamperedBundle(t *testing.T) {
	c := newChain(t, "tr a-z A-Z < gen.txt > final.txt")
	bundle := filepath.Join(t.TempDir(), "b")
	if res := harness.Run(t, "export", "--data", c.data, "--subject", c.subject, "--out", bundle); res.Code != 0 {
		t.Fatalf("export: %s", res.Stderr)
	}
	envs, _ := filepath.Glob(filepath.Join(bundle, "attest", "envelopes", "*", "*"))
	if len(envs) != 2 {
		t.Fatalf("%d envelopes in the bundle", len(envs))
	}
	// An envelope is kept twice (attest/envelopes and the CAS); a damaged copy is
	// ignored while the other matches its digest, so the attack changes both.
	env := filepath.Base(envs[0])
	envInCAS := filepath.Join(bundle, "store", "cas", env[:2], env)
	cases := []struct {
		name  string
		files []string
		edit  func([]byte) []byte
		want  string
	}{
		{"provenance payload", []string{filepath.Join(bundle, "provenance.json")}, flipInPayload, "provenance"},
		{"link envelope", []string{envs[0], envInCAS}, flipInPayload, "link"},
		{"input blob", []string{firstBlob(t, bundle)}, func(b []byte) []byte { b[0] ^= 1; return b }, "verification"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			copyDir := filepath.Join(t.TempDir(), "b")
			harness.CopyTree(bundle, copyDir)
			for _, f := range tc.files {
				target := filepath.Join(copyDir, strings.TrimPrefix(f, bundle))
				b, err := os.ReadFile(target)
				if err != nil {
					t.Fatal(err)
				}
				os.Chmod(target, 0o644)
				os.WriteFile(target, tc.edit(b), 0o644)
			}
			fresh := t.TempDir()
			res := harness.Run(t, "rebuild", filepath.Join(copyDir, "provenance.json"), "--bundle", copyDir, "--key", c.keys, "--data", fresh, "--out", filepath.Join(t.TempDir(), "vsa"))
			if res.Code != 1 {
				t.Fatalf("tampered %s: exit %d, want 1\n%s", tc.name, res.Code, res.Stderr)
			}
			if tc.want != "" && !strings.Contains(res.Stderr, tc.want) {
				t.Fatalf("tampered %s: %q does not say what failed", tc.name, res.Stderr)
			}
			if ls := harness.Run(t, "quarantine", "ls", "--data", fresh); strings.TrimSpace(ls.Stdout) != "" {
				t.Fatalf("a rebuild that never ran quarantined: %s", ls.Stdout)
			}
			// Nothing ran: the fresh data dir signed no link.
			if ls, _ := filepath.Glob(filepath.Join(fresh, "attest", "pending", "*", "*_*")); len(ls) > 0 {
				t.Fatalf("an action ran despite a failed verification")
			}
			if ls, _ := filepath.Glob(filepath.Join(fresh, "attest", "envelopes", "*", "*")); len(ls) > 0 {
				t.Fatalf("an action ran despite a failed verification")
			}
		})
	}
}

// TestRebuildBundleWithSymlink: a bundle directory with a symlink (here, the store's
// tmp dir pointing at a host directory) is refused before anything is read or written.
func TestRebuildBundleWithSymlink(t *testing.T) {
	c := newChain(t, "tr a-z A-Z < gen.txt > final.txt")
	bundle := filepath.Join(t.TempDir(), "b")
	if res := harness.Run(t, "export", "--data", c.data, "--subject", c.subject, "--out", bundle); res.Code != 0 {
		t.Fatalf("export: %s", res.Stderr)
	}
	victim := t.TempDir()
	os.WriteFile(filepath.Join(victim, "dead-1234.owner"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(victim, "dead-precious"), []byte("keep me"), 0o644)
	os.RemoveAll(filepath.Join(bundle, "store", "tmp"))
	if err := os.Symlink(victim, filepath.Join(bundle, "store", "tmp")); err != nil {
		t.Fatal(err)
	}
	res := harness.Run(t, "rebuild", filepath.Join(bundle, "provenance.json"), "--bundle", bundle, "--key", c.keys, "--data", t.TempDir(), "--out", filepath.Join(t.TempDir(), "vsa"))
	if res.Code != 2 || !strings.Contains(res.Stderr, "not a regular file") {
		t.Fatalf("bundle with a symlink: exit %d %s", res.Code, res.Stderr)
	}
	ents, _ := os.ReadDir(victim)
	if len(ents) != 2 {
		t.Fatalf("the host directory behind the symlink was changed: %v", ents)
	}
}

// TestRebuildFailureQuarantines: an artifact whose recorded product the rebuild does
// not reproduce (a nondeterministic step) is FAILED and quarantined, and kiln serve on
// that data dir then refuses to hand it out; a release restores it.
func TestRebuildFailureQuarantines(t *testing.T) {
	c := newChain(t, "cat gen.txt > final.txt; head -c 16 /dev/urandom | od -An -tx1 >> final.txt")
	prov := filepath.Join(t.TempDir(), "prov.json")
	if res := harness.Run(t, "attest", "provenance", "--data", c.data, "--subject", c.subject, "--out", prov); res.Code != 0 {
		t.Fatalf("provenance: %s", res.Stderr)
	}
	vsa := filepath.Join(t.TempDir(), "vsa.json")
	res := harness.Run(t, "rebuild", prov, "--key", c.keys, "--data", c.data, "--out", vsa)
	if res.Code != 1 || !strings.Contains(res.Stderr, "FAILED") || !strings.Contains(res.Stderr, "final.txt") {
		t.Fatalf("rebuild of a nondeterministic artifact: exit %d\n%s", res.Code, res.Stderr)
	}
	if v := harness.Run(t, "attest", "verify-summary", vsa, "--key", c.keys); v.Code != 1 || !strings.HasPrefix(v.Stdout, "FAILED") {
		t.Fatalf("the FAILED summary: exit %d %s %s", v.Code, v.Stdout, v.Stderr)
	}
	sum := fileSHA256(t, c.subject)
	ls := harness.Run(t, "quarantine", "ls", "--data", c.data)
	if !strings.Contains(ls.Stdout, "sha256:"+sum) {
		t.Fatalf("subject not quarantined: %q", ls.Stdout)
	}

	srv := harness.StartServer(t, "--data", c.data)
	ac := repb.NewActionCacheClient(sdkClient(t, srv.Addr).Connection())
	hash, size, _ := strings.Cut(c.action2, "/")
	d, _ := digest.New(hash, atoi(t, size))
	_, err := ac.GetActionResult(context.Background(), &repb.GetActionResultRequest{ActionDigest: d.ToProto()})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("kiln serve handed out the quarantined artifact's result: %v", err)
	}
	if r := harness.Run(t, "quarantine", "release", "--data", c.data, "sha256:"+sum); r.Code == 0 {
		t.Fatal("release without --reason accepted")
	}
	if r := harness.Run(t, "quarantine", "release", "--data", c.data, "sha256:"+sum, "--reason", "test: timestamps are expected"); r.Code != 0 {
		t.Fatalf("release: %s", r.Stderr)
	}
	if _, err := ac.GetActionResult(context.Background(), &repb.GetActionResultRequest{ActionDigest: d.ToProto()}); err != nil {
		t.Fatalf("released artifact still refused: %v", err)
	}
	audit := harness.Run(t, "quarantine", "audit", "--data", c.data)
	if !strings.Contains(audit.Stdout, "quarantine") || !strings.Contains(audit.Stdout, "release") || !strings.Contains(audit.Stdout, "timestamps are expected") {
		t.Fatalf("audit log: %q", audit.Stdout)
	}
}

// TestServeRefusesQuarantinedProduct: an execution whose output is quarantined fails.
func TestServeRefusesQuarantinedProduct(t *testing.T) {
	srv, bb := busyboxServer(t)
	out := t.TempDir()
	j := kilnExec(t, srv.Data, bb, "", out, "o.txt", "echo trusted-once > o.txt")
	sum := fileSHA256(t, filepath.Join(out, "o.txt"))
	if r := harness.Run(t, "quarantine", "add", "--data", srv.Data, "sha256:"+sum, "--reason", "test"); r.Code != 0 {
		t.Fatal(r.Stderr)
	}
	res := harness.Run(t, "exec", "--data", srv.Data, "--toolchain", "docker://kiln/busybox@"+bb, "--output", "o.txt", "--no-cache", "--", "/bin/sh", "-c", "echo trusted-once > o.txt")
	if res.Code == 0 || !strings.Contains(res.Stderr, "quarantined") {
		t.Fatalf("exec producing a quarantined artifact: exit %d %s", res.Code, res.Stderr)
	}
	_ = j
}

func flipInPayload(b []byte) []byte {
	var e map[string]any
	json.Unmarshal(b, &e)
	p, _ := e["payload"].(string)
	// Change one base64 character of the payload: still decodable, different bytes.
	i := len(p) / 2
	c := byte('A')
	if p[i] == 'A' {
		c = 'B'
	}
	e["payload"] = p[:i] + string(c) + p[i+1:]
	out, _ := json.Marshal(e)
	return out
}

func firstBlob(t *testing.T, bundle string) string {
	t.Helper()
	var found string
	filepath.Walk(filepath.Join(bundle, "store", "cas"), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && found == "" && info.Size() > 5 {
			// The source file (not an intermediate product, which the rebuild would
			// remake anyway; a damaged one is refused all the same).
			if b, _ := os.ReadFile(p); strings.HasPrefix(string(b), "pear") {
				found = p
			}
		}
		return nil
	})
	if found == "" {
		t.Fatal("no input blob in the bundle")
	}
	return found
}

func extractOne(t *testing.T, tarPath, name, dst string) {
	t.Helper()
	f, err := os.Open(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("%s not in %s: %v", name, tarPath, err)
		}
		if h.Name == name {
			b, _ := io.ReadAll(tr)
			os.WriteFile(dst, b, 0o644)
			return
		}
	}
}

func fileSHA256(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func atoi(t *testing.T, s string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestRebuildRemote: the actions re-run on another kiln server, reached over mutual
// TLS; its answers count only with a link signed by its key. With the wrong key, or
// without a client certificate, the rebuild stops without a verdict (and quarantines
// nothing).
func TestRebuildRemote(t *testing.T) {
	c := newChain(t, "tr a-z A-Z < gen.txt > final.txt")
	remoteData := t.TempDir()
	bb := harness.RecipeToolchain(t, remoteData, "busybox")
	if bb != c.bb {
		t.Fatalf("busybox recipe digests differ: %s %s", bb, c.bb)
	}
	ca := testpki.NewCA(t, "kiln-ca")
	sCert, sKey := ca.Server(t, "remote-kiln")
	cCert, cKey := ca.Client(t, "rebuilder")
	srv := harness.StartServer(t, "--data", remoteData, "--tls-cert", sCert, "--tls-key", sKey, "--tls-client-ca", ca.Cert)
	mtls := []string{"--remote-ca", ca.Cert, "--remote-client-cert", cCert, "--remote-client-key", cKey}
	rk := harness.Run(t, "attest", "pubkey", "--data", remoteData, "--all", "--json")
	remoteKeys := filepath.Join(t.TempDir(), "remote.json")
	os.WriteFile(remoteKeys, []byte(rk.Stdout), 0o644)
	prov := filepath.Join(t.TempDir(), "prov.json")
	if res := harness.Run(t, "attest", "provenance", "--data", c.data, "--subject", c.subject, "--out", prov); res.Code != 0 {
		t.Fatal(res.Stderr)
	}
	vsa := filepath.Join(t.TempDir(), "vsa.json")
	res := harness.Run(t, append([]string{"rebuild", prov, "--key", c.keys, "--data", c.data, "--remote", srv.Addr, "--remote-key", remoteKeys, "--out", vsa}, mtls...)...)
	if res.Code != 0 || !strings.Contains(res.Stderr, "PASSED") {
		t.Fatalf("remote rebuild: exit %d %s", res.Code, res.Stderr)
	}
	if n := srv.Metric(t, "kiln_executions_total", `outcome="ok"`); n != 2 {
		t.Fatalf("the remote ran %v actions, want 2", n)
	}
	if !strings.Contains(srv.Log(), `msg=execute`) || !strings.Contains(srv.Log(), `client="CN=rebuilder at 127.0.0.1:`) {
		t.Fatalf("the remote's log does not name the client certificate of each Execute:\n%s", srv.Log())
	}
	res = harness.Run(t, append([]string{"rebuild", prov, "--key", c.keys, "--data", c.data, "--remote", srv.Addr, "--remote-key", c.keys, "--out", vsa}, mtls...)...)
	if res.Code != 1 || !strings.Contains(res.Stderr, "trusted key") {
		t.Fatalf("remote rebuild with the wrong remote key: exit %d %s", res.Code, res.Stderr)
	}
	res = harness.Run(t, "rebuild", prov, "--key", c.keys, "--data", c.data, "--remote", srv.Addr, "--remote-key", remoteKeys, "--out", vsa, "--remote-ca", ca.Cert)
	if res.Code == 0 || strings.Contains(res.Stderr, "PASSED") {
		t.Fatalf("remote rebuild without a client certificate: exit %d %s", res.Code, res.Stderr)
	}
	t.Logf("without a client certificate: exit %d: %s", res.Code, res.Stderr)
	if ls := harness.Run(t, "quarantine", "ls", "--data", c.data); strings.TrimSpace(ls.Stdout) != "" {
		t.Fatalf("an unverifiable remote quarantined the artifact: %s", ls.Stdout)
	}
}
