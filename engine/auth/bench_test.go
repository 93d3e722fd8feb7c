package auth

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/kilnbuild/kiln/internal/testoidc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
)

// BenchmarkAuthenticate is the per-call cost of the interceptor with a warm JWKS: for
// an anonymous caller on a server without authentication (the baseline every call
// pays), and for a token caller (policy on a claim, revocation check by a stat of a
// real list file), with the token already verified once (what a client that sends one
// token on every call sees), and with its signature verified on every call; beside
// them, as peers on the same machine, one bare signature check of each algorithm
// (timings on a shared machine are only comparable within one run).
//
//	go test ./engine/auth -run '^$' -bench Authenticate -count 10
func BenchmarkAuthenticate(b *testing.B) {
	is := testoidc.New(b)
	es := is.NewKey(b, jose.ES256)
	is.Publish(es)
	v, err := NewVerifier(VerifierConfig{Issuers: []Issuer{{URL: is.URL, Audience: aud}}})
	if err != nil {
		b.Fatal(err)
	}
	if err := v.Warm(context.Background()); err != nil {
		b.Fatal(err)
	}
	pf := filepath.Join(b.TempDir(), "authz.json")
	os.WriteFile(pf, []byte(`{"rules": [{"issuer": "`+is.URL+`", "claims": {"repository": "acme/*"}, "allow": ["read", "write", "execute"]}]}`), 0o644)
	p, err := LoadPolicy(pf)
	if err != nil {
		b.Fatal(err)
	}
	// A revocation list file with one entry, stat'ed on every call as kiln serve does.
	rf := filepath.Join(b.TempDir(), "revocations.json")
	os.WriteFile(rf, []byte(`{"revocations": [{"identity": "oidc:x#y"}]}`), 0o644)
	revoked := func(Identity) error { _, err := os.Stat(rf); return err }
	claims := is.Claims("repo:acme/app:ref:refs/heads/main", aud, time.Hour)
	claims["repository"] = "acme/app"
	ctxFor := func(tok string) context.Context {
		ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}})
		if tok == "" {
			return ctx
		}
		return metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+tok))
	}
	run := func(b *testing.B, a *Authenticator, ctx context.Context, each func()) {
		b.ReportAllocs()
		for b.Loop() {
			if each != nil {
				each()
			}
			if _, _, err := a.Authenticate(ctx, find); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("peer-RS256-signature", func(b *testing.B) {
		k, _ := rsa.GenerateKey(rand.Reader, 2048)
		h := sha256.Sum256([]byte("signed"))
		sig, _ := rsa.SignPKCS1v15(rand.Reader, k, crypto.SHA256, h[:])
		for b.Loop() {
			if rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, h[:], sig) != nil {
				b.Fatal("bad signature")
			}
		}
	})
	b.Run("peer-ES256-signature", func(b *testing.B) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		h := sha256.Sum256([]byte("signed"))
		sig, _ := ecdsa.SignASN1(rand.Reader, k, h[:])
		for b.Loop() {
			if !ecdsa.VerifyASN1(&k.PublicKey, h[:], sig) {
				b.Fatal("bad signature")
			}
		}
	})
	b.Run("anonymous", func(b *testing.B) {
		run(b, New(Config{Revoked: revoked}), ctxFor(""), nil)
	})
	for _, k := range []*testoidc.Key{is.Signing(), es} {
		tok := is.TokenWith(b, k, claims)
		a := New(Config{Verifier: v, Policy: p, RequireIdentity: true, Revoked: revoked})
		b.Run("token-cached-"+string(k.Alg), func(b *testing.B) {
			run(b, a, ctxFor(tok), nil)
		})
		b.Run("token-verified-"+string(k.Alg), func(b *testing.B) {
			run(b, a, ctxFor(tok), func() { v.forget(is.URL) })
		})
	}
}
