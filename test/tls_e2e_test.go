package test

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	"github.com/kilnbuild/kiln/internal/testpki"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// TestSDKMTLS: the remote-apis-sdks client uses `kiln serve --tls-cert --tls-key
// --tls-client-ca` over TLS with a client certificate (uploads, reads, capabilities);
// without one, with one from another CA, or in plaintext, it gets nothing.
// (Debian's Bazel 4.2.3 cannot be the client here: its Netty finds no ALPN in
// Debian's JDK 17 and crashes on any grpcs:// address; see docs/serve.md.)
func TestSDKMTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	ca, other := testpki.NewCA(t, "kiln-ca"), testpki.NewCA(t, "other-ca")
	sCert, sKey := ca.Server(t, "kiln-server")
	cCert, cKey := ca.Client(t, "ci-runner")
	oCert, oKey := other.Client(t, "intruder")
	srv := harness.StartServer(t, "--no-execution", "--tls-cert", sCert, "--tls-key", sKey, "--tls-client-ca", ca.Cert)
	ctx := harness.Context(t, 2*time.Minute)
	dial := func(p client.DialParams) (*client.Client, error) {
		p.Service = srv.Addr
		return client.NewClient(ctx, "e2e", p)
	}
	c, err := dial(client.DialParams{TLSCACertFile: ca.Cert, TLSClientAuthCert: cCert, TLSClientAuthKey: cKey, NoAuth: true})
	if err != nil {
		t.Fatalf("connect with a client certificate: %v", err)
	}
	defer c.Close()
	blob := []byte("over mutual TLS")
	d := digest.NewFromBlob(blob)
	if _, _, err := c.UploadIfMissing(ctx, uploadinfo.EntryFromBlob(blob)); err != nil {
		t.Fatalf("upload over mTLS: %v", err)
	}
	if got, _, err := c.ReadBlob(ctx, d); err != nil || string(got) != string(blob) {
		t.Fatalf("read over mTLS: %q %v", got, err)
	}
	for name, p := range map[string]client.DialParams{
		"no client certificate":                {TLSCACertFile: ca.Cert, NoAuth: true},
		"a client certificate from another CA": {TLSCACertFile: ca.Cert, TLSClientAuthCert: oCert, TLSClientAuthKey: oKey, NoAuth: true},
		"plaintext":                            {NoSecurity: true},
	} {
		c, err := dial(p)
		if err == nil {
			_, err = c.MissingBlobs(ctx, []digest.Digest{d})
			c.Close()
		}
		if err == nil {
			t.Errorf("client with %s was served", name)
		}
	}
	if !strings.Contains(srv.Log(), "tls: certificate loaded") {
		t.Fatalf("server log does not say which certificate it serves:\n%s", srv.Log())
	}
}

// TestServeTLSFlags: incomplete TLS flags stop kiln serve at once with one line.
func TestServeTLSFlags(t *testing.T) {
	ca := testpki.NewCA(t, "kiln-ca")
	sCert, sKey := ca.Server(t, "kiln-server")
	for _, args := range [][]string{
		{"--tls-cert", sCert},
		{"--tls-client-ca", ca.Cert},
		{"--tls-cert", sCert, "--tls-key", ca.Cert},
		{"--tls-cert", sCert, "--tls-key", sKey, "--authz", ca.Cert}, // --authz needs client certificates
		{"--http-tls"}, // needs --tls-cert
	} {
		res := harness.Run(t, append([]string{"serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--http-listen", ""}, args...)...)
		if res.Code == 0 || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 || !strings.Contains(res.Stderr, "tls") && !strings.Contains(res.Stderr, "authz") {
			t.Errorf("serve %v: exit %d, stderr %q; want one line about TLS and a non-zero exit", args, res.Code, res.Stderr)
		}
	}
	// A server started with them answers the health service over mTLS.
	cCert, cKey := ca.Client(t, "probe")
	srv := harness.StartServer(t, "--no-execution", "--tls-cert", sCert, "--tls-key", sKey, "--tls-client-ca", ca.Cert)
	roots := x509.NewCertPool()
	pem, _ := os.ReadFile(ca.Cert)
	roots.AppendCertsFromPEM(pem)
	kp, err := tls.LoadX509KeyPair(cCert, cKey)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(srv.Addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{kp}})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := harness.Context(t, time.Minute)
	if r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health over mTLS: %v %v", r, err)
	}
}

// TestAuthzPolicyE2E: with --authz, a developer's certificate may read but not upload or
// execute, a CI certificate may do all, and a certificate no rule names gets nothing but
// negotiation, each with PERMISSION_DENIED.
func TestAuthzPolicyE2E(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	ca := testpki.NewCA(t, "kiln-ca")
	sCert, sKey := ca.Server(t, "kiln-server")
	policy := filepath.Join(t.TempDir(), "authz.json")
	os.WriteFile(policy, []byte(`{"rules": [
		{"subject": "ci-*", "allow": ["read", "write", "execute"]},
		{"subject": "dev-*", "allow": ["read"]}]}`), 0o644)
	srv := harness.StartServer(t, "--no-execution", "--tls-cert", sCert, "--tls-key", sKey, "--tls-client-ca", ca.Cert, "--authz", policy)
	ctx := harness.Context(t, 2*time.Minute)
	connect := func(cn string) *client.Client {
		cert, key := ca.Client(t, cn)
		c, err := client.NewClient(ctx, "e2e", client.DialParams{Service: srv.Addr, TLSCACertFile: ca.Cert, TLSClientAuthCert: cert, TLSClientAuthKey: key, NoAuth: true})
		if err != nil {
			t.Fatalf("%s: connect: %v", cn, err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	ci, dev, other := connect("ci-runner"), connect("dev-alice"), connect("mallory")
	blob := []byte("written by ci")
	d := digest.NewFromBlob(blob)
	if _, _, err := ci.UploadIfMissing(ctx, uploadinfo.EntryFromBlob(blob)); err != nil {
		t.Fatalf("ci upload: %v", err)
	}
	if got, _, err := dev.ReadBlob(ctx, d); err != nil || string(got) != string(blob) {
		t.Fatalf("dev read: %q %v", got, err)
	}
	devBlob := []byte("written by dev")
	if _, _, err := dev.UploadIfMissing(ctx, uploadinfo.EntryFromBlob(devBlob)); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "dev-alice") {
		t.Fatalf("dev upload: %v, want PERMISSION_DENIED naming the client", err)
	}
	if _, err := dev.WriteBlob(ctx, devBlob); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("dev ByteStream write: %v, want PERMISSION_DENIED", err)
	}
	if missing, err := ci.MissingBlobs(ctx, []digest.Digest{digest.NewFromBlob(devBlob)}); err != nil || len(missing) != 1 {
		t.Fatalf("a refused upload left a blob: missing=%v err=%v", missing, err)
	}
	if _, _, err := other.ReadBlob(ctx, d); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("read by a client no rule names: %v, want PERMISSION_DENIED", err)
	}
	if _, err := other.GetCapabilities(ctx); err != nil {
		t.Fatalf("capabilities for a client no rule names: %v (negotiation is open)", err)
	}
}

// TestServeHTTPTLS: with --http-tls, /metrics and /healthz answer over TLS to clients
// holding a certificate of the client CA, and to nobody in plaintext.
func TestServeHTTPTLS(t *testing.T) {
	ca := testpki.NewCA(t, "kiln-ca")
	sCert, sKey := ca.Server(t, "kiln-server")
	cCert, cKey := ca.Client(t, "prometheus")
	srv := harness.StartServer(t, "--no-execution", "--tls-cert", sCert, "--tls-key", sKey, "--tls-client-ca", ca.Cert, "--http-tls")
	roots := x509.NewCertPool()
	pem, _ := os.ReadFile(ca.Cert)
	roots.AppendCertsFromPEM(pem)
	get := func(url string, certs []tls.Certificate) (string, error) {
		c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: certs}}}
		resp, err := c.Get(url)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return string(b), fmt.Errorf("status %d", resp.StatusCode)
		}
		return string(b), err
	}
	kp, err := tls.LoadX509KeyPair(cCert, cKey)
	if err != nil {
		t.Fatal(err)
	}
	if body, err := get("https://"+srv.HTTP+"/healthz", []tls.Certificate{kp}); err != nil || strings.TrimSpace(body) != "ok" {
		t.Fatalf("healthz over mTLS: %q %v", body, err)
	}
	if body, err := get("https://"+srv.HTTP+"/metrics", []tls.Certificate{kp}); err != nil || !strings.Contains(body, "kiln_") {
		t.Fatalf("metrics over mTLS: %v", err)
	}
	if _, err := get("https://"+srv.HTTP+"/metrics", nil); err == nil {
		t.Fatal("metrics served to a client without a certificate")
	}
	if _, err := get("http://"+srv.HTTP+"/metrics", nil); err == nil {
		t.Fatal("metrics served in plaintext")
	}
}
