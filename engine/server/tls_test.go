package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/internal/logtest"
	"github.com/kilnbuild/kiln/internal/testpki"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// TestServerTLS: with a client CA, only clients holding a certificate that CA signed
// get an answer; certificates replaced on disk are served from the next handshake; a
// broken replacement keeps the last good one in use.
func TestServerTLS(t *testing.T) {
	ca, other := testpki.NewCA(t, "kiln-ca"), testpki.NewCA(t, "other-ca")
	sCert, sKey := ca.Server(t, "server-1")
	cCert, cKey := ca.Client(t, "bazel")
	oCert, oKey := other.Client(t, "intruder")
	dir := t.TempDir()
	files := TLSFiles{Cert: filepath.Join(dir, "s.pem"), Key: filepath.Join(dir, "s.key"), ClientCA: ca.Cert}
	replace(t, sCert, files.Cert)
	replace(t, sKey, files.Key)

	var logs logtest.Buffer
	tc, err := ServerTLS(files, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)))
	healthpb.RegisterHealthServer(g, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	defer g.Stop()
	addr := lis.Addr().String()

	roots := x509.NewCertPool()
	pem, _ := os.ReadFile(ca.Cert)
	roots.AppendCertsFromPEM(pem)
	check := func(cert, key string) error {
		cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
		if cert != "" {
			kp, err := tls.LoadX509KeyPair(cert, key)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{kp}
		}
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}
	if err := check(cCert, cKey); err != nil {
		t.Fatalf("client with a certificate of the client CA: %v", err)
	}
	if err := check("", ""); status.Code(err) != codes.Unavailable {
		t.Fatalf("client without a certificate: %v, want refused (UNAVAILABLE)", err)
	}
	if err := check(oCert, oKey); status.Code(err) != codes.Unavailable {
		t.Fatalf("client with a certificate of another CA: %v, want refused (UNAVAILABLE)", err)
	}

	served := func() string {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, NextProtos: []string{"h2"}, Certificates: mustPair(t, cCert, cKey)})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if got := served(); got != "server-1" {
		t.Fatalf("served %q", got)
	}
	s2Cert, s2Key := ca.Server(t, "server-2")
	replace(t, s2Key, files.Key)
	replace(t, s2Cert, files.Cert)
	if got := served(); got != "server-2" {
		t.Fatalf("after rotation on disk, served %q, want server-2", got)
	}
	if err := os.WriteFile(files.Key, []byte("half written"), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if got := served(); got != "server-2" {
			t.Fatalf("with a broken key file, served %q, want the last good certificate (server-2)", got)
		}
	}
	if n := strings.Count(logs.String(), "keeping the certificates already loaded"); n != 1 {
		t.Fatalf("a broken rotation warned %d times over 3 handshakes, want once:\n%s", n, logs.String())
	}
}

// TestTLSFilesCheck: incomplete or unreadable TLS configurations stop the server at
// start with the reason.
func TestTLSFilesCheck(t *testing.T) {
	ca := testpki.NewCA(t, "kiln-ca")
	cert, key := ca.Server(t, "server")
	for _, f := range []TLSFiles{{Cert: cert}, {Key: key}, {ClientCA: ca.Cert}} {
		if err := f.Check(); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%+v: %v, want INVALID_ARGUMENT", f, err)
		}
	}
	for _, f := range []TLSFiles{{Cert: cert, Key: ca.Cert}, {Cert: cert, Key: key, ClientCA: key}, {Cert: cert, Key: key + ".missing"}} {
		if _, err := ServerTLS(f, slog.New(slog.DiscardHandler)); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%+v: %v, want INVALID_ARGUMENT", f, err)
		}
	}
}

// replace puts a copy of src at dst by rename, as certificate rotation tools do.
func replace(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

func mustPair(t *testing.T, cert, key string) []tls.Certificate {
	t.Helper()
	kp, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return []tls.Certificate{kp}
}
