package auth

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/internal/testoidc"
	"google.golang.org/grpc/codes"
)

// TestTokenFile: a client (a worker, kiln rebuild --remote) sends the token in its file
// on every call and picks up a replaced file at its next call, without reconnecting.
func TestTokenFile(t *testing.T) {
	is := testoidc.New(t)
	v, err := NewVerifier(VerifierConfig{Issuers: []Issuer{{URL: is.URL, Audience: aud}}})
	if err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, New(Config{Verifier: v, RequireIdentity: true}), nil)
	file := filepath.Join(t.TempDir(), "token")
	write := func(tok string) {
		tmp := file + ".new"
		if err := os.WriteFile(tmp, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, file); err != nil {
			t.Fatal(err)
		}
	}
	write(is.Token(t, is.Claims("worker-1", aud, 10*time.Minute)))
	tf, err := NewTokenFile(file, true)
	if err != nil {
		t.Fatal(err)
	}
	c := dialCreds(t, srv.addr, tf)
	if err := c.read(); err != nil {
		t.Fatalf("with the token file: %v", err)
	}
	expired := is.Claims("worker-1", aud, -time.Minute)
	expired["iat"] = time.Now().Add(-time.Hour).Unix()
	write(is.Token(t, expired))
	wantCode(t, "after the file was replaced by an expired token", c.read(), codes.Unauthenticated, "expired")
	write(is.Token(t, is.Claims("worker-1", aud, 10*time.Minute)))
	if err := c.read(); err != nil {
		t.Fatalf("after the file was replaced by a fresh token: %v", err)
	}
	write("two tokens")
	if err := c.read(); err == nil {
		t.Fatal("a token file holding two words was sent")
	}
	if _, err := NewTokenFile(filepath.Join(t.TempDir(), "missing"), true); err == nil {
		t.Fatal("a missing token file was accepted at start")
	}
	write(is.Token(t, is.Claims("worker-1", aud, 10*time.Minute)))
	if tf, err := NewTokenFile(file, false); err != nil || !tf.RequireTransportSecurity() {
		t.Fatalf("plaintext not allowed: %v, transport security required: %v", err, tf != nil && tf.RequireTransportSecurity())
	}
}
