package test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/audit"
	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/revoke"
	"github.com/kilnbuild/kiln/internal/testoidc"
	"github.com/kilnbuild/kiln/internal/testpki"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestBazelOIDC: Bazel 4.2.3 builds the example through a kiln serve that trusts an OIDC
// issuer (a real HTTP server in this test) with --remote_header=Authorization=Bearer:
//   - without the header it is refused with UNAUTHENTICATED; with a token of another
//     repository, which the policy lets only read, with PERMISSION_DENIED;
//   - with the token every action runs remotely; each Execute has its audit line and each
//     link names the identity;
//   - `kiln revoke --identity` refuses the next build without a restart; undo lifts it;
//   - after a key rotation and a change to one source, `kiln revoke --key` of the first
//     key quarantines the artifacts it signed (the first binary, the library, the
//     genrule outputs) and not those of the second key (the second binary): a build
//     that needs them again fails; undo releases them.
func TestBazelOIDC(t *testing.T) {
	is := testoidc.New(t)
	const audience = "kiln-e2e"
	policy := filepath.Join(t.TempDir(), "authz.json")
	os.WriteFile(policy, []byte(`{"rules": [
		{"issuer": "`+is.URL+`", "claims": {"repository": "acme/hello", "ref": "refs/heads/main"}, "allow": ["read", "write", "execute"]},
		{"issuer": "`+is.URL+`", "allow": ["read"]}]}`), 0o644)
	r := newRemoteBuild(t, "--oidc-issuer", is.URL, "--oidc-audience", audience, "--oidc-max-ttl", "1h", "--authz", policy)
	data := r.srv.Data
	token := func(repo string) string {
		c := is.Claims("repo:"+repo+":ref:refs/heads/main", audience, 30*time.Minute)
		c["repository"], c["ref"] = repo, "refs/heads/main"
		return is.Token(t, c)
	}
	identity := "oidc:" + is.URL + "#repo:acme/hello:ref:refs/heads/main"
	header := "--remote_header=Authorization=Bearer " + token("acme/hello")
	build := func(extra ...string) (string, error) {
		args := []string{"build", "--remote_executor=grpc://" + r.srv.Addr, "--remote_default_exec_properties=container-image=" + r.image, "--jobs=8"}
		return r.bz.Run(t, append(append(args, extra...), "//...")...)
	}
	clean := func() {
		t.Helper()
		if out, err := r.bz.Run(t, "clean"); err != nil {
			t.Fatalf("bazel clean: %v\n%s", err, out)
		}
	}
	kiln := func(args ...string) string {
		t.Helper()
		res := harness.Run(t, append(args, "--data", data)...)
		if res.Code != 0 {
			t.Fatalf("kiln %v: exit %d: %s", args, res.Code, res.Stderr)
		}
		return res.Stdout
	}

	if out, err := build(); err == nil || !strings.Contains(out, "UNAUTHENTICATED") {
		t.Fatalf("build without a token: %v, want UNAUTHENTICATED\n%s", err, out)
	}
	// Bazel 4.2.3 reports a refused upload as "errors during bulk transfer": the server
	// says which code it gave, and a direct call shows the message.
	readOnly := token("acme/other")
	if out, err := build("--remote_header=Authorization=Bearer " + readOnly); err == nil || r.srv.Metric(t, "kiln_grpc_requests_total", `code="PermissionDenied"`) == 0 {
		t.Fatalf("build with a read-only token: %v, want PERMISSION_DENIED\n%s", err, out)
	}
	if err := uploadWithToken(t, r.srv.Addr, readOnly); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "repo:acme/other") {
		t.Fatalf("upload with a read-only token: %v, want PERMISSION_DENIED naming the identity", err)
	}
	out, err := build(header)
	if err != nil {
		t.Fatalf("build with the token: %v\n%s\n%s", err, out, r.srv.Log())
	}
	p := harness.Processes(out)
	ran := p["total"] - p["internal"]
	if p["remote"] != ran || ran < 5 {
		t.Fatalf("process summary %v: every non-internal action must run remotely\n%s", p, out)
	}
	var execs []audit.Record
	if err := json.Unmarshal([]byte(kiln("audit", "--event", "execute", "--json")), &execs); err != nil {
		t.Fatal(err)
	}
	if len(execs) != ran {
		t.Fatalf("%d execute lines in the audit log for %d remote actions: %+v", len(execs), ran, execs)
	}
	for _, e := range execs {
		if e.Identity != identity || e.Operation == "" || e.Action == "" || !strings.HasPrefix(e.Peer, "127.0.0.1:") {
			t.Fatalf("audit line %+v: want identity %s, an operation, an action and the peer", e, identity)
		}
	}
	envs, _ := filepath.Glob(filepath.Join(data, "attest", "envelopes", "*", "*"))
	pend, _ := filepath.Glob(filepath.Join(data, "attest", "pending", "*", "*_*"))
	if len(envs)+len(pend) == 0 {
		t.Fatal("no link envelopes")
	}
	for _, f := range append(envs, pend...) {
		raw, _ := os.ReadFile(f)
		payload, err := attest.EnvelopePayload(raw)
		if err != nil {
			t.Fatal(err)
		}
		link, err := attest.DecodeLink(payload)
		if err != nil || link.Environment[attest.EnvRequestedBy] != identity {
			t.Fatalf("link %s: environment %v (%v), want %s = %s", f, link.Environment, err, attest.EnvRequestedBy, identity)
		}
	}

	// Revoking the identity refuses its next call; the server is not restarted.
	kiln("revoke", "--identity", identity, "--reason", "e2e: runner compromised")
	clean()
	if out, err := build(header); err == nil || !strings.Contains(out, "UNAUTHENTICATED") {
		t.Fatalf("build with a revoked identity: %v, want UNAUTHENTICATED\n%s", err, out)
	}
	if err := uploadWithToken(t, r.srv.Addr, token("acme/hello")); status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "e2e: runner compromised") {
		t.Fatalf("call with a revoked identity: %v, want UNAUTHENTICATED with the revocation's reason", err)
	}
	kiln("revoke", "undo", identity, "--reason", "e2e: runner replaced")
	calls := r.srv.Metric(t, "kiln_grpc_requests_total")
	start := time.Now()
	if out, err := build(header); err != nil || harness.Processes(out)["remote cache hit"] != ran {
		t.Fatalf("build after the revocation was undone: %v, want %d remote cache hits\n%s", err, ran, out)
	}
	// For the benchmark's share of an all-hit rebuild (docs/serve.md): every call here
	// went through token verification.
	t.Logf("all-hit rebuild with a bearer token: %.0f gRPC calls in %v", r.srv.Metric(t, "kiln_grpc_requests_total")-calls, time.Since(start).Round(time.Millisecond))

	// Key revocation: build 1's artifacts were signed by key 1; rotate, change the
	// binary's source, build again (its compile and link run with key 2).
	hello := filepath.Join(r.bz.Workspace, "bazel-bin/app/hello")
	lib, _ := filepath.Glob(filepath.Join(r.bz.Workspace, "bazel-bin/lib/*.a"))
	if len(lib) == 0 {
		t.Fatal("no library archive in bazel-bin/lib")
	}
	words := filepath.Join(r.bz.Workspace, "bazel-bin/app/words.sorted")
	hello1, lib1, words1 := sha256File(t, hello), sha256File(t, lib[0]), sha256File(t, words)
	var ring keys.Export
	json.Unmarshal([]byte(kiln("attest", "pubkey", "--all", "--json")), &ring)
	key1 := ring.ActiveKeyID
	kiln("attest", "key", "rotate")
	src := filepath.Join(r.bz.Workspace, "app/main.c")
	b, _ := os.ReadFile(src)
	os.WriteFile(src, append(b, []byte("\nint kiln_e2e_second_build = 2;\n")...), 0o644)
	if out, err := build(header); err != nil {
		t.Fatalf("build after the rotation: %v\n%s", err, out)
	}
	hello2 := sha256File(t, hello)
	if hello2 == hello1 {
		t.Fatal("the changed source built the same binary")
	}
	var res revoke.KeyResult
	if err := json.Unmarshal([]byte(kiln("revoke", "--key", key1[:16], "--reason", "e2e: key leaked", "--json")), &res); err != nil {
		t.Fatal(err)
	}
	quarantined := map[string]bool{}
	for _, d := range res.Quarantined {
		quarantined[d] = true
	}
	for name, d := range map[string]string{"first binary": hello1, "library": lib1, "genrule output": words1} {
		if !quarantined[d] {
			t.Errorf("%s %s (signed by the revoked key) is not quarantined: %v", name, d, res.Quarantined)
		}
	}
	if quarantined[hello2] {
		t.Errorf("the second binary (signed by the new key) was quarantined")
	}
	var ls []quarantine.Entry
	json.Unmarshal([]byte(kiln("quarantine", "ls", "--json")), &ls)
	if len(ls) != len(res.Quarantined) || res.Links < 5 {
		t.Fatalf("quarantine ls has %d entries, the revocation quarantined %d from %d links", len(ls), len(res.Quarantined), res.Links)
	}
	// A build that needs the quarantined artifacts again gets no cached result for them,
	// and re-executing reproduces them, which kiln refuses to hand out.
	clean()
	if out, err := build(header); err == nil || !strings.Contains(out, "quarantined") {
		t.Fatalf("build needing artifacts of the revoked key: %v, want a refusal naming the quarantine\n%s", err, out)
	}
	kiln("revoke", "undo", key1, "--reason", "e2e: false alarm")
	if out, err := build(header); err != nil {
		t.Fatalf("build after the key revocation was undone: %v\n%s", err, out)
	}
	if got := sha256File(t, hello); got != hello2 {
		t.Fatalf("binary after undo %s, want %s", got, hello2)
	}
}

// uploadWithToken uploads a blob with a bearer token, in plaintext.
func uploadWithToken(t *testing.T, addr, tok string) error {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := metadata.AppendToOutgoingContext(harness.Context(t, time.Minute), "authorization", "Bearer "+tok)
	b := []byte("uploaded with a token " + tok[len(tok)-8:])
	s := sha256.Sum256(b)
	_, err = repb.NewContentAddressableStorageClient(conn).BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
		Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: &repb.Digest{Hash: hex.EncodeToString(s[:]), SizeBytes: int64(len(b))}, Data: b}}})
	return err
}

func sha256File(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// TestSVIDAndTokenOverTLS: kiln serve with mTLS and an OIDC issuer: an X.509-SVID is
// matched by its SPIFFE ID; over TLS a token (sent from a file, as a worker or `kiln
// rebuild --remote-token-file` does) decides for a certificate no rule names; `kiln
// revoke` shuts an SVID out at its next call.
func TestSVIDAndTokenOverTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	is := testoidc.New(t)
	ca := testpki.NewCA(t, "kiln-ca")
	sCert, sKey := ca.Server(t, "kiln-server")
	policy := filepath.Join(t.TempDir(), "authz.json")
	os.WriteFile(policy, []byte(`{"rules": [
		{"spiffe": "spiffe://example.org/ci/*", "allow": ["read", "write"]},
		{"issuer": "`+is.URL+`", "claims": {"repository": "acme/release"}, "allow": ["read", "write"]},
		{"issuer": "`+is.URL+`", "allow": ["read"]}]}`), 0o644)
	srv := harness.StartServer(t, "--no-execution", "--allow-client-ac-writes", "--tls-cert", sCert, "--tls-key", sKey, "--tls-client-ca", ca.Cert,
		"--oidc-issuer", is.URL, "--oidc-audience", "kiln-e2e", "--authz", policy)
	ctx := harness.Context(t, 2*time.Minute)
	connect := func(file, cn string, tokenFile string, uris ...string) *client.Client {
		cert, key := ca.SVID(t, file, cn, uris...)
		p := client.DialParams{Service: srv.Addr, TLSCACertFile: ca.Cert, TLSClientAuthCert: cert, TLSClientAuthKey: key, NoAuth: true}
		if tokenFile != "" {
			tf, err := auth.NewTokenFile(tokenFile, false)
			if err != nil {
				t.Fatal(err)
			}
			p.DialOpts = append(p.DialOpts, grpc.WithPerRPCCredentials(tf))
		}
		c, err := client.NewClient(ctx, "e2e", p)
		if err != nil {
			t.Fatalf("%s: connect: %v", file, err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	tokenFile := func(repo string) string {
		c := is.Claims("repo:"+repo+":ref:refs/heads/main", "kiln-e2e", 10*time.Minute)
		c["repository"] = repo
		f := filepath.Join(t.TempDir(), "token")
		os.WriteFile(f, []byte(is.Token(t, c)), 0o600)
		return f
	}
	runner := connect("runner", "", "", "spiffe://example.org/ci/runner")
	dev := connect("dev", "", "", "spiffe://example.org/dev/alice")
	release := connect("release", "build-box", tokenFile("acme/release"))
	app := connect("app", "build-box", tokenFile("acme/app"))
	upload := func(c *client.Client, s string) error {
		_, _, err := c.UploadIfMissing(ctx, uploadinfo.EntryFromBlob([]byte(s)))
		return err
	}
	if err := upload(runner, "from the ci SVID"); err != nil {
		t.Fatalf("ci SVID uploads: %v", err)
	}
	if err := upload(dev, "from the dev SVID"); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "spiffe://example.org/dev/alice") {
		t.Fatalf("dev SVID uploads: %v, want PERMISSION_DENIED naming its SPIFFE ID", err)
	}
	if err := upload(release, "from the release job"); err != nil {
		t.Fatalf("release token over TLS uploads: %v", err)
	}
	if err := upload(app, "from the app job"); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "repo:acme/app") {
		t.Fatalf("app token over TLS uploads: %v, want PERMISSION_DENIED naming the token's identity", err)
	}
	// A result the release job writes records its identity, whatever it claims.
	out := []byte("built by the release job")
	if _, _, err := release.UploadIfMissing(ctx, uploadinfo.EntryFromBlob(out)); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(out)
	ad := sha256.Sum256([]byte("an action of the release job"))
	actionDigest := &repb.Digest{Hash: hex.EncodeToString(ad[:]), SizeBytes: 28}
	claimed := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "out", Digest: &repb.Digest{Hash: hex.EncodeToString(sum[:]), SizeBytes: int64(len(out))}}},
		ExecutionMetadata: &repb.ExecutedActionMetadata{}}
	auth.RecordRequester(claimed.ExecutionMetadata, "spiffe://example.org/ci/someone-else")
	if _, err := release.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: actionDigest, ActionResult: claimed}); err != nil {
		t.Fatalf("release job writes a result: %v", err)
	}
	got, err := runner.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: actionDigest})
	if err != nil {
		t.Fatal(err)
	}
	if who, _ := auth.Requester(got); who != "oidc:"+is.URL+"#repo:acme/release:ref:refs/heads/main" {
		t.Fatalf("client-written result records %q, want the release job's identity", who)
	}
	if res := harness.Run(t, "revoke", "--data", srv.Data, "--identity", "spiffe://example.org/ci/*", "--reason", "e2e: node drained"); res.Code != 0 {
		t.Fatalf("kiln revoke: %s", res.Stderr)
	}
	if _, err := runner.GetCapabilities(ctx); status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "node drained") {
		t.Fatalf("revoked SVID: %v, want UNAUTHENTICATED with the reason", err)
	}
}

// TestServeOIDCFlags: inconsistent OIDC flags stop kiln serve at once with one line,
// before it listens: unpaired issuers and audiences, OIDC options without an issuer, an
// http issuer beyond loopback, tokens on a plaintext listener beyond loopback, a policy
// naming an issuer the server does not trust or certificates without a client CA.
func TestServeOIDCFlags(t *testing.T) {
	const is = "http://127.0.0.1:1" // nothing listens there: the server must stop before fetching
	policy := func(body string) string {
		p := filepath.Join(t.TempDir(), "authz.json")
		os.WriteFile(p, []byte(body), 0o644)
		return p
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--oidc-issuer", is}, "pairs"},
		{[]string{"--oidc-issuer", is, "--oidc-audience", "a", "--oidc-audience", "b"}, "pairs"},
		{[]string{"--oidc-max-ttl", "1h"}, "need --oidc-issuer"},
		{[]string{"--oidc-issuer", "http://issuer.example", "--oidc-audience", "a"}, "not https"}, // refused before any lookup
		{[]string{"--oidc-issuer", is, "--oidc-audience", "a", "--listen", "0.0.0.0:0"}, "--oidc-allow-plaintext"},
		{[]string{"--oidc-issuer", is, "--oidc-audience", "a", "--authz", policy(`{"rules": [{"issuer": "http://127.0.0.2:1", "allow": ["read"]}]}`)}, "not an --oidc-issuer"},
		{[]string{"--oidc-issuer", is, "--oidc-audience", "a", "--authz", policy(`{"rules": [{"subject": "ci-*", "allow": ["read"]}]}`)}, "--tls-client-ca"},
		{[]string{"--authz", policy(`{"rules": [{"issuer": "` + is + `", "allow": ["read"]}]}`)}, "--authz needs"},
	} {
		args := append([]string{"serve", "--data", t.TempDir(), "--http-listen", ""}, c.args...)
		if !slices.Contains(c.args, "--listen") {
			args = append(args, "--listen", "127.0.0.1:0")
		}
		res := harness.Run(t, args...)
		if res.Code == 0 || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 || !strings.Contains(res.Stderr, c.want) {
			t.Errorf("serve %v: exit %d, stderr %q; want one line mentioning %q", c.args, res.Code, res.Stderr, c.want)
		}
	}
}

// TestRevokeCLI: kiln revoke's usage errors are one line and exit 2; a revocation is
// listed, and undo lifts it; a key that the data dir does not know is NOT_FOUND.
func TestRevokeCLI(t *testing.T) {
	data := t.TempDir()
	for _, args := range [][]string{
		{"revoke", "--reason", "x"},
		{"revoke", "--identity", "cert:a", "--key", "abcdef0123", "--reason", "x"},
		{"revoke", "--identity", "cert:a", "--since", "1h", "--reason", "x"},
		{"revoke", "--key", "abcdef0123", "--since", "yesterday", "--reason", "x"},
	} {
		res := harness.Run(t, append(args, "--data", data)...)
		if res.Code != 2 || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 {
			t.Errorf("kiln %v: exit %d, stderr %q; want exit 2 and one line", args, res.Code, res.Stderr)
		}
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"revoke", "--identity", "ci-runner", "--reason", "x"}, "cert:CN"},
		{[]string{"revoke", "--identity", "cert:a"}, "reason"},
		{[]string{"revoke", "--key", "abcdef0123", "--reason", "x"}, "no executor keyring"},
		{[]string{"revoke", "undo", "rv-00000000", "--reason", "x"}, "no revocation"},
	} {
		res := harness.Run(t, append(c.args, "--data", data)...)
		if res.Code == 0 || !strings.Contains(res.Stderr, c.want) {
			t.Errorf("kiln %v: exit %d, stderr %q; want an error mentioning %q", c.args, res.Code, res.Stderr, c.want)
		}
	}
	if res := harness.Run(t, "revoke", "--data", data, "--identity", "cert:ci-*", "--reason", "lost laptop"); res.Code != 0 || !strings.Contains(res.Stdout, "revoked cert:ci-*") {
		t.Fatalf("revoke: %d %s %s", res.Code, res.Stdout, res.Stderr)
	}
	var ls []revoke.Entry
	res := harness.Run(t, "revoke", "ls", "--data", data, "--json")
	if err := json.Unmarshal([]byte(res.Stdout), &ls); err != nil || len(ls) != 1 || ls[0].Identity != "cert:ci-*" || ls[0].Reason != "lost laptop" {
		t.Fatalf("revoke ls: %v %s", err, res.Stdout)
	}
	if res := harness.Run(t, "revoke", "undo", ls[0].ID, "--data", data, "--reason", "found it"); res.Code != 0 {
		t.Fatalf("undo: %s", res.Stderr)
	}
	if res := harness.Run(t, "revoke", "ls", "--data", data, "--json"); strings.TrimSpace(res.Stdout) != "[]" {
		t.Fatalf("revoke ls after undo: %s", res.Stdout)
	}
	var rs []audit.Record
	json.Unmarshal([]byte(harness.Run(t, "audit", "--data", data, "--json").Stdout), &rs)
	if len(rs) != 2 || rs[0].Event != audit.EventRevoke || rs[1].Event != audit.EventUnrevoke || rs[1].Reason != "found it" {
		t.Fatalf("audit: %+v", rs)
	}
}
