package auth

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/reapi"
	"github.com/kilnbuild/kiln/internal/grpctest"
	"github.com/kilnbuild/kiln/internal/testoidc"
	"github.com/kilnbuild/kiln/internal/testpki"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
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

func loadPolicy(t *testing.T, body string) *Policy {
	t.Helper()
	p, err := LoadPolicy(writePolicy(t, body))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const (
	find    = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
	upload  = "/google.bytestream.ByteStream/Write"
	batchUp = "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
	acWrite = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"
	execute = "/build.bazel.remote.execution.v2.Execution/Execute"
	cancel  = "/google.longrunning.Operations/CancelOperation"
	fetch   = "/build.bazel.remote.asset.v1.Fetch/FetchBlob"
	caps    = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"
	refl    = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
)

// TestPolicyCertificateRules: the original policy format (rules on the certificate's
// common name) loads and decides as before: the first matching rule decides,
// negotiation is open, unknown methods and unmatched clients are refused.
func TestPolicyCertificateRules(t *testing.T) {
	p := loadPolicy(t, `{"rules": [
		{"subject": "ci-*", "allow": ["read", "write", "execute", "fetch"]},
		{"subject": "ci-untrusted", "allow": ["read"]},
		{"subject": "dev-*", "allow": ["read"]}]}`)
	cert := func(cn string) Caller { return Caller{Cert: Identity{Kind: Certificate, Name: cn, CommonName: cn}} }
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
		if got, _ := p.Decide(cert(c.cn), MethodPermission(c.method)); got != c.want {
			t.Errorf("%s calling %s: allowed=%v, want %v", c.cn, c.method, got, c.want)
		}
	}
	// A token never matches a certificate rule, whatever its subject.
	tok := Caller{Token: Identity{Kind: OIDC, Issuer: "https://i", Name: "ci-runner"}}
	if ok, _ := p.Decide(tok, PermRead); ok {
		t.Error("a token whose subject looks like a certificate name matched a subject rule")
	}
	a := New(Config{Policy: p})
	if _, _, err := a.Authenticate(context.Background(), find); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a call without a client certificate: %v, want UNAUTHENTICATED", err)
	}
	for name, body := range map[string]string{
		"no rules":              `{"rules": []}`,
		"unknown permission":    `{"rules": [{"subject": "*", "allow": ["admin"]}]}`,
		"bad pattern":           `{"rules": [{"subject": "[", "allow": ["read"]}]}`,
		"empty subject":         `{"rules": [{"subject": "", "allow": ["read"]}]}`,
		"unknown field":         `{"rules": [{"subject": "*", "allow": ["read"], "deny": ["write"]}]}`,
		"not JSON":              `rules: all`,
		"two kinds":             `{"rules": [{"subject": "*", "spiffe": "spiffe://x/*", "allow": ["read"]}]}`,
		"claims without issuer": `{"rules": [{"subject": "*", "claims": {"sub": "x"}, "allow": ["read"]}]}`,
		"spiffe not spiffe":     `{"rules": [{"spiffe": "https://x/*", "allow": ["read"]}]}`,
		"issuer not https":      `{"rules": [{"issuer": "http://issuer.example", "allow": ["read"]}]}`,
		"bad claim pattern":     `{"rules": [{"issuer": "https://i.example", "claims": {"sub": "["}, "allow": ["read"]}]}`,
		"empty claim pattern":   `{"rules": [{"issuer": "https://i.example", "claims": {"sub": ""}, "allow": ["read"]}]}`,
	} {
		if _, err := LoadPolicy(writePolicy(t, body)); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", name, err)
		}
	}
	pi := loadPolicy(t, `{"rules": [{"issuer": "https://typo.example", "allow": ["read"]}]}`)
	if err := pi.CheckIssuers(func(u string) bool { return u == "https://issuer.example" }); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a rule naming an issuer the server does not trust: %v, want INVALID_ARGUMENT", err)
	}
}

// testServer is the REAPI storage services over memory, behind an Authenticator, on
// loopback (internal/grpctest).
type testServer struct {
	addr  string
	store *cache.MemoryStore
}

func startServer(t *testing.T, a *Authenticator, tc *tls.Config) *testServer {
	t.Helper()
	opts := a.ServerOptions()
	if tc != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(tc)))
	}
	mem := cache.NewMemoryStore()
	conn := grpctest.Serve(t, func(g *grpc.Server) { reapi.New(mem, mem.ActionCache(), reapi.Options{}).Register(g) }, opts...)
	return &testServer{addr: conn.Target(), store: mem} // clients dial with their own credentials
}

// client makes calls with an optional bearer token.
type client struct {
	conn  *grpc.ClientConn
	token string
}

// dialCreds connects in plaintext with per-call credentials.
func dialCreds(t *testing.T, addr string, pc credentials.PerRPCCredentials) *client {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithPerRPCCredentials(pc))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &client{conn: conn}
}

func dial(t *testing.T, addr string, creds credentials.TransportCredentials, token string) *client {
	t.Helper()
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &client{conn: conn, token: token}
}

func (c *client) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_ = cancel // bounded by the timeout; the calls are short
	if c.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	}
	return ctx
}

func blobDigest(b []byte) *repb.Digest {
	s := sha256.Sum256(b)
	return &repb.Digest{Hash: hex.EncodeToString(s[:]), SizeBytes: int64(len(b))}
}

func (c *client) read() error {
	_, err := repb.NewContentAddressableStorageClient(c.conn).FindMissingBlobs(c.ctx(), &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{blobDigest([]byte("x"))}})
	return err
}

func (c *client) write(b []byte) error {
	resp, err := repb.NewContentAddressableStorageClient(c.conn).BatchUpdateBlobs(c.ctx(), &repb.BatchUpdateBlobsRequest{
		Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: blobDigest(b), Data: b}}})
	if err == nil && resp.GetResponses()[0].GetStatus().GetCode() != 0 {
		err = errors.New(resp.GetResponses()[0].GetStatus().GetMessage())
	}
	return err
}

func (c *client) negotiate() error {
	_, err := repb.NewCapabilitiesClient(c.conn).GetCapabilities(c.ctx(), &repb.GetCapabilitiesRequest{})
	return err
}

func wantCode(t *testing.T, what string, err error, code codes.Code, mention string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(err.Error(), mention) {
		t.Errorf("%s: %v, want %v mentioning %q", what, err, code, mention)
	}
}

// TestTokenPolicy: over real gRPC, a token for one repository may not write what the
// policy reserves for another (PERMISSION_DENIED, nothing written); a token no rule
// names gets nothing; no token is UNAUTHENTICATED except for negotiation; an invalid
// token is refused even there; a revoked identity is refused at its next call, and
// served again once the revocation is undone.
func TestTokenPolicy(t *testing.T) {
	is := testoidc.New(t)
	v, err := NewVerifier(VerifierConfig{Issuers: []Issuer{{URL: is.URL, Audience: aud}}})
	if err != nil {
		t.Fatal(err)
	}
	p := loadPolicy(t, `{"rules": [
		{"issuer": "`+is.URL+`", "claims": {"repository": "acme/release", "ref": "refs/heads/main"}, "allow": ["read", "write", "execute"]},
		{"issuer": "`+is.URL+`", "claims": {"repository": "acme/*"}, "allow": ["read", "execute"]}]}`)
	if err := p.CheckIssuers(v.Trusts); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	revoked := map[string]bool{}
	a := New(Config{Verifier: v, Policy: p, RequireIdentity: true, Revoked: func(id Identity) error {
		mu.Lock()
		defer mu.Unlock()
		if revoked[id.String()] {
			return errors.New("revoked")
		}
		return nil
	}})
	srv := startServer(t, a, nil)
	token := func(repo, ref string) string {
		c := is.Claims("repo:"+repo+":ref:"+ref, aud, 10*time.Minute)
		c["repository"], c["ref"] = repo, ref
		return is.Token(t, c)
	}
	release := dial(t, srv.addr, nil, token("acme/release", "refs/heads/main"))
	app := dial(t, srv.addr, nil, token("acme/app", "refs/heads/main"))
	branch := dial(t, srv.addr, nil, token("acme/release", "refs/heads/feature"))
	stranger := dial(t, srv.addr, nil, token("evil/acme", "refs/heads/main"))
	anonymous := dial(t, srv.addr, nil, "")
	expired := is.Claims("repo:acme/release:ref:refs/heads/main", aud, -5*time.Minute)
	expired["iat"] = time.Now().Add(-10 * time.Minute).Unix()
	stale := dial(t, srv.addr, nil, is.Token(t, expired))

	if err := release.write([]byte("release artifact")); err != nil {
		t.Fatalf("release token writes: %v", err)
	}
	if err := app.read(); err != nil {
		t.Fatalf("app token reads: %v", err)
	}
	planted := []byte("planted by another repository")
	wantCode(t, "app token writes", app.write(planted), codes.PermissionDenied, "repo:acme/app")
	wantCode(t, "release token from another branch writes", branch.write(planted), codes.PermissionDenied, "rule 2")
	if _, err := srv.store.Get(context.Background(), cache.Digest{Hash: blobDigest(planted).Hash, Size: int64(len(planted))}, 0); status.Code(err) != codes.NotFound {
		t.Fatalf("a refused write left the blob: %v", err)
	}
	wantCode(t, "token no rule names", stranger.read(), codes.PermissionDenied, "no rule")
	wantCode(t, "no token", anonymous.read(), codes.Unauthenticated, "Bearer")
	if err := anonymous.negotiate(); err != nil {
		t.Fatalf("negotiation without a token: %v", err)
	}
	wantCode(t, "expired token, negotiating", stale.negotiate(), codes.Unauthenticated, "expired")

	id := "oidc:" + is.URL + "#repo:acme/release:ref:refs/heads/main"
	mu.Lock()
	revoked[id] = true
	mu.Unlock()
	wantCode(t, "revoked identity", release.read(), codes.Unauthenticated, "revoked")
	if err := app.read(); err != nil {
		t.Fatalf("another identity after a revocation: %v", err)
	}
	mu.Lock()
	delete(revoked, id)
	mu.Unlock()
	if err := release.read(); err != nil {
		t.Fatalf("after the revocation is undone: %v", err)
	}
}

// TestAuthenticateHeaders: malformed authorization metadata is UNAUTHENTICATED; a token
// over plaintext from beyond loopback is refused unless allowed; without a policy, any
// verified identity may do everything, and Authenticate puts the Caller in the context.
func TestAuthenticateHeaders(t *testing.T) {
	is := testoidc.New(t)
	v, err := NewVerifier(VerifierConfig{Issuers: []Issuer{{URL: is.URL, Audience: aud}}})
	if err != nil {
		t.Fatal(err)
	}
	tok := is.Token(t, is.Claims("ci", aud, 10*time.Minute))
	call := func(a *Authenticator, from string, md ...string) (Caller, error) {
		ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(from), Port: 40000}})
		ctx = metadata.NewIncomingContext(ctx, metadata.Pairs(md...))
		ctx, c, err := a.Authenticate(ctx, find)
		if err == nil {
			if got, ok := CallerFrom(ctx); !ok || got.String() != c.String() {
				t.Errorf("CallerFrom: %+v %v, want %+v", got, ok, c)
			}
		}
		return c, err
	}
	a := New(Config{Verifier: v, RequireIdentity: true})
	c, err := call(a, "127.0.0.1", "authorization", "Bearer "+tok)
	if err != nil || c.Token.Name != "ci" || c.Key() != "oidc:"+is.URL+"#ci" {
		t.Fatalf("loopback token: %+v %v", c, err)
	}
	_, err = call(a, "10.1.2.3", "authorization", "Bearer "+tok)
	wantCode(t, "token over plaintext from beyond loopback", err, codes.Unauthenticated, "plaintext")
	if _, err := call(New(Config{Verifier: v, PlaintextTokens: true}), "10.1.2.3", "authorization", "Bearer "+tok); err != nil {
		t.Fatalf("token over plaintext with --oidc-allow-plaintext: %v", err)
	}
	_, err = call(a, "127.0.0.1", "authorization", "Basic Y2k6c2VjcmV0")
	wantCode(t, "basic auth", err, codes.Unauthenticated, "scheme")
	_, err = call(a, "127.0.0.1", "authorization", "Bearer "+tok, "authorization", "Bearer "+tok)
	wantCode(t, "two authorization headers", err, codes.Unauthenticated, "2 authorization")
	_, err = call(a, "127.0.0.1", "authorization", "Bearer ")
	wantCode(t, "empty token", err, codes.Unauthenticated, "empty")
	c, err = call(New(Config{}), "192.0.2.7")
	if err != nil || c.Key() != "peer:192.0.2.7" || c.String() != "anonymous" {
		t.Fatalf("no authentication configured: %+v %v", c, err)
	}
}

// TestSVIDPolicy: over mutual TLS, an X.509-SVID is named by its SPIFFE ID and matched by
// spiffe rules, a plain certificate by its common name; a certificate whose SPIFFE ID
// is malformed or not its only URI SAN is refused.
func TestSVIDPolicy(t *testing.T) {
	ca := testpki.NewCA(t, "kiln-ca")
	sCert, sKey := ca.Server(t, "kiln-server")
	kp, err := tls.LoadX509KeyPair(sCert, sKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(ca.Cert)
	pool.AppendCertsFromPEM(pem)
	p := loadPolicy(t, `{"rules": [
		{"spiffe": "spiffe://example.org/ci/*", "allow": ["read", "write"]},
		{"spiffe": "spiffe://example.org/*/*", "allow": ["read"]},
		{"subject": "legacy-*", "allow": ["read", "write"]}]}`)
	a := New(Config{Policy: p})
	srv := startServer(t, a, &tls.Config{Certificates: []tls.Certificate{kp}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert})
	connect := func(file, cn string, uris ...string) *client {
		cert, key := ca.SVID(t, file, cn, uris...)
		ck, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		return dial(t, srv.addr, credentials.NewTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{ck}}), "")
	}
	runner := connect("runner", "", "spiffe://example.org/ci/runner")
	dev := connect("dev", "legacy-dev", "spiffe://example.org/dev/alice") // an SVID's CN does not make it a legacy client
	legacy := connect("legacy", "legacy-box")
	otherTD := connect("other", "", "spiffe://evil.org/ci/runner")
	twoURIs := connect("two", "", "spiffe://example.org/ci/runner", "https://example.org/x")
	badID := connect("bad", "", "spiffe://Example.org/ci/runner")

	if err := runner.write([]byte("from the ci SVID")); err != nil {
		t.Fatalf("ci SVID writes: %v", err)
	}
	if err := dev.read(); err != nil {
		t.Fatalf("dev SVID reads: %v", err)
	}
	wantCode(t, "dev SVID writes", dev.write([]byte("dev")), codes.PermissionDenied, "spiffe://example.org/dev/alice")
	if err := legacy.write([]byte("legacy")); err != nil {
		t.Fatalf("certificate named by its common name writes: %v", err)
	}
	wantCode(t, "SVID of another trust domain", otherTD.read(), codes.PermissionDenied, "spiffe://evil.org/ci/runner")
	wantCode(t, "SVID with two URI SANs", twoURIs.read(), codes.Unauthenticated, "exactly one URI SAN")
	wantCode(t, "malformed SPIFFE ID", badID.read(), codes.Unauthenticated, "trust domain")
}

// TestParseSPIFFEID: what the SPIFFE ID specification allows, and what it does not.
func TestParseSPIFFEID(t *testing.T) {
	for _, ok := range []string{"spiffe://example.org", "spiffe://example.org/ns/ci/sa/runner", "spiffe://a-b_c.d/x.y-z_W"} {
		if _, err := ParseSPIFFEID(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"spiffe://", "spiffe:///x", "https://example.org/x", "spiffe://Example.org/x", "spiffe://example.org:443/x",
		"spiffe://user@example.org/x", "spiffe://example.org/x/", "spiffe://example.org//x", "spiffe://example.org/./x",
		"spiffe://example.org/../x", "spiffe://example.org/x?q=1", "spiffe://example.org/x#f", "spiffe://example.org/a b"} {
		if _, err := ParseSPIFFEID(bad); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}

// TestRecordWrites: a result a client writes records the caller's identity, replacing
// a record the client forged; an anonymous client's forged record is removed.
func TestRecordWrites(t *testing.T) {
	ctx := context.Background()
	mem := cache.NewMemoryStore()
	ac := RecordWrites(mem.ActionCache())
	key := func(s string) cache.ActionKey { return cache.ActionKey{Action: cache.DigestOf([]byte(s))} }
	forged := &repb.ActionResult{ExitCode: 0, ExecutionMetadata: &repb.ExecutedActionMetadata{Worker: "w"}}
	RecordRequester(forged.ExecutionMetadata, "oidc:https://i#someone-else")
	ci := WithCaller(ctx, Caller{Token: Identity{Kind: OIDC, Issuer: "https://i", Name: "ci"}})
	for _, c := range []struct {
		name string
		ctx  context.Context
		res  *repb.ActionResult
		want string // "" for no record
	}{
		{"identified writer", ci, &repb.ActionResult{}, "oidc:https://i#ci"},
		{"identified writer, forged record", ci, forged, "oidc:https://i#ci"},
		{"anonymous writer, forged record", ctx, forged, ""},
		{"anonymous writer", ctx, &repb.ActionResult{ExitCode: 3}, ""},
	} {
		if err := ac.Put(c.ctx, key(c.name), c.res); err != nil {
			t.Fatal(err)
		}
		got, err := mem.ActionCache().Get(ctx, key(c.name))
		if err != nil {
			t.Fatal(err)
		}
		who, ok := Requester(got)
		if who != c.want || ok != (c.want != "") {
			t.Errorf("%s: stored requester %q (%v), want %q", c.name, who, ok, c.want)
		}
	}
	if who, _ := Requester(forged); who != "oidc:https://i#someone-else" {
		t.Error("the caller's result was modified in place")
	}
}

// TestAuthenticateHTTP: an HTTP request (the web UI) is decided as a gRPC call is: a
// bearer token in its Authorization header from loopback, none (refused where an
// identity is needed), one over plaintext from beyond loopback (refused), one of a
// revoked identity (refused), one the policy does not let read (refused).
func TestAuthenticateHTTP(t *testing.T) {
	is := testoidc.New(t)
	v, err := NewVerifier(VerifierConfig{Issuers: []Issuer{{URL: is.URL, Audience: aud}}})
	if err != nil {
		t.Fatal(err)
	}
	p := loadPolicy(t, `{"rules": [{"issuer": "`+is.URL+`", "claims": {"sub": "viewer-*"}, "allow": ["read"]}]}`)
	revoked := ""
	a := New(Config{Verifier: v, Policy: p, RequireIdentity: true, Revoked: func(id Identity) error {
		if id.String() == revoked {
			return errors.New("revoked for the test")
		}
		return nil
	}})
	req := func(from, tok string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "/actions", nil)
		r.RemoteAddr = from + ":40000"
		if tok != "" {
			r.Header.Set("Authorization", "Bearer "+tok)
		}
		return r
	}
	viewer := is.Token(t, is.Claims("viewer-ann", aud, 10*time.Minute))
	if c, err := a.AuthenticateHTTP(req("127.0.0.1", viewer), PermRead); err != nil || c.Token.Name != "viewer-ann" {
		t.Fatalf("viewer's token from loopback: %+v %v", c, err)
	}
	_, err = a.AuthenticateHTTP(req("127.0.0.1", ""), PermRead)
	wantCode(t, "no token", err, codes.Unauthenticated, "no credentials")
	_, err = a.AuthenticateHTTP(req("192.0.2.1", viewer), PermRead)
	wantCode(t, "token over plaintext from beyond loopback", err, codes.Unauthenticated, "plaintext")
	_, err = a.AuthenticateHTTP(req("127.0.0.1", is.Token(t, is.Claims("builder-bob", aud, 10*time.Minute))), PermRead)
	wantCode(t, "token the policy does not let read", err, codes.PermissionDenied, "builder-bob")
	revoked = "oidc:" + is.URL + "#viewer-ann"
	_, err = a.AuthenticateHTTP(req("127.0.0.1", viewer), PermRead)
	wantCode(t, "revoked identity", err, codes.Unauthenticated, "revoked for the test")
}

// TestCallerIsTheClientOfLimits: the per-client limits of kiln serve (reapi.ClientID)
// count a caller by its identity: a token's before a certificate's, else its address
// (issue 19: per-client limits by certificate, token identity, or peer address).
func TestCallerIsTheClientOfLimits(t *testing.T) {
	for _, c := range []struct {
		caller Caller
		want   string
	}{
		{Caller{Token: Identity{Kind: OIDC, Issuer: "https://issuer.example", Name: "ci-job"}, Cert: Identity{Kind: Certificate, Name: "runner-1"}, Peer: "10.0.0.1:555"}, "oidc:https://issuer.example#ci-job"},
		{Caller{Cert: Identity{Kind: Certificate, Name: "runner-1"}, Peer: "10.0.0.1:555"}, "cert:runner-1"},
		{Caller{Peer: "10.0.0.1:555"}, "peer:10.0.0.1"},
	} {
		if got := reapi.ClientID(WithCaller(context.Background(), c.caller)); got != c.want {
			t.Errorf("caller %v counted as %q, want %q", c.caller, got, c.want)
		}
	}
}
