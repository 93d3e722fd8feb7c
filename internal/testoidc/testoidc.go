// Package testoidc is an OIDC issuer for tests: a real HTTP server on loopback that
// publishes a discovery document and a JWKS, mints signed tokens, rotates its keys,
// and forges the tokens a verifier must refuse (alg none, HMAC with the public key).
package testoidc

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Key is one signing key of the issuer.
type Key struct {
	ID  string
	Alg jose.SignatureAlgorithm
	Pub crypto.PublicKey
	key crypto.Signer
}

// Issuer is a running test issuer.
type Issuer struct {
	URL string
	srv *httptest.Server

	mu        sync.Mutex
	published []*Key // in the JWKS
	signing   *Key   // what Token signs with
	fetches   atomic.Int64
	n         int
}

// New starts an issuer on 127.0.0.1 with one published RS256 key; it stops when t ends.
func New(t testing.TB) *Issuer {
	t.Helper()
	i := &Issuer{}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{
			"issuer": i.URL, "jwks_uri": i.URL + "/jwks",
			"id_token_signing_alg_values_supported": []string{"RS256", "ES256"},
		})
	})
	mux.HandleFunc("/jwks", func(w http.ResponseWriter, r *http.Request) {
		i.fetches.Add(1)
		i.mu.Lock()
		var set jose.JSONWebKeySet
		for _, k := range i.published {
			set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.Pub, KeyID: k.ID, Algorithm: string(k.Alg), Use: "sig"})
		}
		i.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(set)
	})
	i.srv = httptest.NewServer(mux)
	i.URL = i.srv.URL
	t.Cleanup(i.srv.Close)
	k := i.NewKey(t, jose.RS256)
	i.Publish(k)
	i.SignWith(k)
	return i
}

// NewKey makes a key (RS256 or ES256) without publishing it.
func (i *Issuer) NewKey(t testing.TB, alg jose.SignatureAlgorithm) *Key {
	t.Helper()
	i.mu.Lock()
	i.n++
	id := "key-" + strconv.Itoa(i.n)
	i.mu.Unlock()
	var s crypto.Signer
	var err error
	switch alg {
	case jose.RS256:
		s, err = rsa.GenerateKey(rand.Reader, 2048)
	case jose.ES256:
		s, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		t.Fatalf("testoidc: algorithm %s", alg)
	}
	if err != nil {
		t.Fatal(err)
	}
	return &Key{ID: id, Alg: alg, Pub: s.Public(), key: s}
}

// Publish adds k to the JWKS.
func (i *Issuer) Publish(k *Key) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.published = append(i.published, k)
}

// Withdraw removes every key but k from the JWKS.
func (i *Issuer) Withdraw(keep *Key) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.published = []*Key{keep}
}

// SignWith makes k the key Token signs with.
func (i *Issuer) SignWith(k *Key) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.signing = k
}

// Signing returns the key Token signs with.
func (i *Issuer) Signing() *Key {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.signing
}

// Fetches counts the JWKS requests served.
func (i *Issuer) Fetches() int { return int(i.fetches.Load()) }

// Claims returns the usual claims of a token for subject and audience, issued now and
// valid for ttl.
func (i *Issuer) Claims(sub, aud string, ttl time.Duration) map[string]any {
	now := time.Now()
	return map[string]any{"iss": i.URL, "sub": sub, "aud": aud, "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(ttl).Unix()}
}

// Token signs claims with the signing key.
func (i *Issuer) Token(t testing.TB, claims map[string]any) string {
	t.Helper()
	return i.TokenWith(t, i.Signing(), claims)
}

// TokenWith signs claims with k.
func (i *Issuer) TokenWith(t testing.TB, k *Key, claims map[string]any) string {
	t.Helper()
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: k.Alg, Key: k.key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", k.ID))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(s).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Unsigned forges a token with "alg": "none" and no signature.
func (i *Issuer) Unsigned(t testing.TB, claims map[string]any) string {
	t.Helper()
	return forge(t, map[string]any{"alg": "none", "typ": "JWT"}, claims, nil)
}

// HMACWithPublicKey forges an HS256 token whose HMAC key is the signing key's public
// key (its PKIX DER and its JWK modulus are both tried by attackers; this uses the
// JWK form the JWKS publishes).
func (i *Issuer) HMACWithPublicKey(t testing.TB, claims map[string]any) string {
	t.Helper()
	k := i.Signing()
	jwk, err := json.Marshal(jose.JSONWebKey{Key: k.Pub, KeyID: k.ID})
	if err != nil {
		t.Fatal(err)
	}
	return forge(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": k.ID}, claims, jwk)
}

func forge(t testing.TB, hdr, claims map[string]any, hmacKey []byte) string {
	t.Helper()
	h, _ := json.Marshal(hdr)
	c, _ := json.Marshal(claims)
	in := b64(h) + "." + b64(c)
	if hmacKey == nil {
		return in + "."
	}
	m := hmac.New(sha256.New, hmacKey)
	m.Write([]byte(in))
	return in + "." + b64(m.Sum(nil))
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
