package auth

import (
	"context"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/kilnbuild/kiln/internal/clock"
	"github.com/kilnbuild/kiln/internal/testoidc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const aud = "kiln.example"

func newVerifier(t *testing.T, is *testoidc.Issuer, clk *clock.Fake, mod func(*VerifierConfig)) *Verifier {
	t.Helper()
	cfg := VerifierConfig{Issuers: []Issuer{{URL: is.URL, Audience: aud}}, Clock: clk}
	if mod != nil {
		mod(&cfg)
	}
	v, err := NewVerifier(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// refused checks that err is UNAUTHENTICATED and mentions want.
func refused(t *testing.T, what string, err error, want string) {
	t.Helper()
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), want) {
		t.Errorf("%s: %v, want UNAUTHENTICATED mentioning %q", what, err, want)
	}
}

// TestVerifyTokens: a token of a trusted issuer for this audience, within its validity,
// is accepted with its claims; every way of being wrong is UNAUTHENTICATED with the
// reason.
func TestVerifyTokens(t *testing.T) {
	ctx := context.Background()
	is, other := testoidc.New(t), testoidc.New(t)
	clk := clock.NewFake(time.Now())
	v := newVerifier(t, is, clk, func(c *VerifierConfig) { c.MaxTTL = time.Hour })

	claims := is.Claims("repo:acme/app:ref:refs/heads/main", aud, 10*time.Minute)
	claims["repository"] = "acme/app"
	id, err := v.Verify(ctx, is.Token(t, claims))
	if err != nil {
		t.Fatalf("valid token: %v", err)
	}
	if id.Kind != OIDC || id.Issuer != is.URL || id.Name != "repo:acme/app:ref:refs/heads/main" || id.Claims["repository"] != "acme/app" {
		t.Fatalf("identity %+v", id)
	}
	if want := "oidc:" + is.URL + "#repo:acme/app:ref:refs/heads/main"; id.String() != want {
		t.Fatalf("String() = %q, want %q", id.String(), want)
	}

	with := func(mod func(map[string]any)) map[string]any {
		c := is.Claims("repo:acme/app", aud, 10*time.Minute)
		mod(c)
		return c
	}
	now := time.Now()
	for _, c := range []struct {
		name, token, want string
	}{
		{"expired", is.Token(t, with(func(c map[string]any) {
			c["iat"], c["nbf"], c["exp"] = now.Add(-20*time.Minute).Unix(), now.Add(-20*time.Minute).Unix(), now.Add(-2*time.Minute).Unix()
		})), "expired"},
		{"not yet valid", is.Token(t, with(func(c map[string]any) { c["nbf"] = now.Add(5 * time.Minute).Unix() })), "not valid before"},
		{"issued in the future", is.Token(t, with(func(c map[string]any) { c["iat"] = now.Add(5 * time.Minute).Unix() })), "issued in the future"},
		{"wrong audience", is.Token(t, with(func(c map[string]any) { c["aud"] = "another-service" })), "audience"},
		{"audience list without ours", is.Token(t, with(func(c map[string]any) { c["aud"] = []string{"a", "b"} })), "audience"},
		{"untrusted issuer", other.Token(t, other.Claims("repo:acme/app", aud, 10*time.Minute)), "not trusted"},
		{"trusted issuer's name, another issuer's key", other.Token(t, with(func(map[string]any) {})), "signature does not verify"},
		{"alg none", is.Unsigned(t, with(func(map[string]any) {})), `algorithm "none"`},
		{"HS256 with the public key", is.HMACWithPublicKey(t, with(func(map[string]any) {})), `algorithm "HS256"`},
		{"lives longer than --oidc-max-ttl", is.Token(t, with(func(c map[string]any) { c["exp"] = now.Add(2 * time.Hour).Unix() })), "--oidc-max-ttl"},
		{"no iat or nbf under --oidc-max-ttl", is.Token(t, with(func(c map[string]any) { delete(c, "iat"); delete(c, "nbf") })), "lifetime is unknown"},
		{"no exp", is.Token(t, with(func(c map[string]any) { delete(c, "exp") })), "no exp"},
		{"no sub", is.Token(t, with(func(c map[string]any) { delete(c, "sub") })), "no sub"},
		{"not a JWT", "not.a.jwt", "not a JWT"},
		{"oversized", strings.Repeat("a", maxTokenSize+1), "limit"},
	} {
		_, err := v.Verify(ctx, c.token)
		refused(t, c.name, err, c.want)
	}
	// A signature altered in one byte.
	tok := is.Token(t, is.Claims("repo:acme/app", aud, 10*time.Minute))
	tampered := tok[:len(tok)-4] + flip(tok[len(tok)-4]) + tok[len(tok)-3:]
	_, err = v.Verify(ctx, tampered)
	refused(t, "tampered signature", err, "signature")
	// Claims altered after signing (the payload of one token, the signature of another).
	other2 := is.Token(t, is.Claims("repo:acme/admin", aud, 10*time.Minute))
	parts, parts2 := strings.Split(tok, "."), strings.Split(other2, ".")
	_, err = v.Verify(ctx, parts[0]+"."+parts2[1]+"."+parts[2])
	refused(t, "swapped payload", err, "signature")
}

func flip(b byte) string {
	if b == 'A' {
		return "B"
	}
	return "A"
}

// TestVerifyKeyRotation: a token signed with a key the issuer has not published yet is
// refused; the JWKS is fetched again for the unknown key id at most once per refresh
// interval (a flood of made-up key ids costs one fetch); once the issuer publishes the
// key, the next allowed fetch finds it. A key the issuer withdraws stops vouching at the
// next fetch, even for tokens verified before.
func TestVerifyKeyRotation(t *testing.T) {
	ctx := context.Background()
	is := testoidc.New(t)
	clk := clock.NewFake(time.Now())
	v := newVerifier(t, is, clk, func(c *VerifierConfig) { c.RefreshInterval = 30 * time.Second; c.KeysMaxAge = 10 * time.Minute })
	old := is.Token(t, is.Claims("worker-1", aud, 30*time.Minute))
	if _, err := v.Verify(ctx, old); err != nil {
		t.Fatal(err)
	}
	if n := is.Fetches(); n != 1 {
		t.Fatalf("%d JWKS fetches after the first token, want 1", n)
	}
	k2 := is.NewKey(t, jose.ES256)
	rotated := is.TokenWith(t, k2, is.Claims("worker-1", aud, 30*time.Minute))
	for i := 0; i < 50; i++ {
		_, err := v.Verify(ctx, rotated)
		refused(t, "unpublished key, within the refresh interval", err, "unknown key id")
	}
	if n := is.Fetches(); n != 1 {
		t.Fatalf("%d JWKS fetches after 50 tokens with an unknown key id within the interval, want 1", n)
	}
	clk.Advance(31 * time.Second)
	_, err := v.Verify(ctx, rotated)
	refused(t, "unpublished key after a refresh", err, "no key of issuer")
	if n := is.Fetches(); n != 2 {
		t.Fatalf("%d JWKS fetches, want 2 (one refresh for the unknown key id)", n)
	}
	is.Publish(k2)
	_, err = v.Verify(ctx, rotated)
	refused(t, "published key, before the next allowed fetch", err, "unknown key id")
	clk.Advance(31 * time.Second)
	if id, err := v.Verify(ctx, rotated); err != nil || id.Name != "worker-1" {
		t.Fatalf("rotated key after a refresh: %+v %v", id, err)
	}
	if n := is.Fetches(); n != 3 {
		t.Fatalf("%d JWKS fetches, want 3", n)
	}
	// The issuer withdraws the old key; once the keys are fetched again, the old
	// token (verified and cached before) is refused.
	is.Withdraw(k2)
	clk.Advance(11 * time.Minute)
	if _, err := v.Verify(ctx, rotated); err != nil {
		t.Fatalf("token of the current key: %v", err)
	}
	_, err = v.Verify(ctx, old)
	refused(t, "token of a withdrawn key", err, "key id")
}

// TestVerifyCache: a token verified once is answered from the cache until it expires,
// then refused as expired.
func TestVerifyCache(t *testing.T) {
	ctx := context.Background()
	is := testoidc.New(t)
	clk := clock.NewFake(time.Now())
	v := newVerifier(t, is, clk, nil)
	tok := is.Token(t, is.Claims("ci", aud, 5*time.Minute))
	for i := 0; i < 3; i++ {
		if _, err := v.Verify(ctx, tok); err != nil {
			t.Fatal(err)
		}
	}
	clk.Advance(6 * time.Minute)
	_, err := v.Verify(ctx, tok)
	refused(t, "cached token past its expiry", err, "expired")
}

// TestVerifyIssuerDown: an issuer that cannot be reached makes its tokens
// UNAUTHENTICATED, without a fetch per call; the keys come once it is back and the
// refresh interval has passed.
func TestVerifyIssuerDown(t *testing.T) {
	ctx := context.Background()
	dead := httptest.NewServer(nil)
	url := dead.URL
	dead.Close()
	clk := clock.NewFake(time.Now())
	v, err := NewVerifier(VerifierConfig{Issuers: []Issuer{{URL: url, Audience: aud}}, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Warm(ctx); err == nil {
		t.Fatal("Warm of a dead issuer: no error")
	}
	is := testoidc.New(t)
	claims := is.Claims("x", aud, time.Minute)
	claims["iss"] = url
	_, err = v.Verify(ctx, is.Token(t, claims))
	refused(t, "issuer down", err, "unavailable")
}

// TestVerifierConfig: plain http beyond loopback, an issuer without an audience, and an
// issuer named twice are refused at start.
func TestVerifierConfig(t *testing.T) {
	for name, is := range map[string][]Issuer{
		"http beyond loopback": {{URL: "http://issuer.example", Audience: aud}},
		"no audience":          {{URL: "https://issuer.example"}},
		"twice":                {{URL: "https://issuer.example", Audience: "a"}, {URL: "https://issuer.example", Audience: "b"}},
		"not a URL":            {{URL: "issuer.example", Audience: aud}},
		"query":                {{URL: "https://issuer.example/?x=1", Audience: aud}},
		"none":                 nil,
	} {
		if _, err := NewVerifier(VerifierConfig{Issuers: is}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", name, err)
		}
	}
	for _, ok := range []string{"https://token.actions.githubusercontent.com", "http://127.0.0.1:5556/dex", "http://localhost:8080"} {
		if _, err := NewVerifier(VerifierConfig{Issuers: []Issuer{{URL: ok, Audience: aud}}}); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}
