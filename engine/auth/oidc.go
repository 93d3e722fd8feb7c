package auth

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/kilnbuild/kiln/internal/clock"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Issuer is one trusted OIDC issuer and the audience its tokens must name to be
// accepted here (one audience per issuer: the name of this kiln deployment).
type Issuer struct {
	URL      string
	Audience string
}

// VerifierConfig configures a Verifier.
type VerifierConfig struct {
	Issuers []Issuer
	// MaxTTL refuses tokens that live longer (exp minus iat, or nbf without iat);
	// 0 accepts any lifetime.
	MaxTTL time.Duration
	// Skew is the clock skew allowed on exp, nbf and iat; default DefaultSkew.
	Skew time.Duration
	// RefreshInterval is the least time between two JWKS fetches of one issuer
	// prompted by a token with an unknown key id; default DefaultRefreshInterval.
	RefreshInterval time.Duration
	// KeysMaxAge is how long fetched keys are used before they are fetched again;
	// default DefaultKeysMaxAge.
	KeysMaxAge time.Duration
	// HTTPClient fetches discovery documents and key sets; default one with a timeout.
	HTTPClient *http.Client
	Clock      clock.Clock // default: the system clock
	Logger     *slog.Logger
}

// Defaults of VerifierConfig.
const (
	DefaultSkew            = 30 * time.Second
	DefaultRefreshInterval = 30 * time.Second
	DefaultKeysMaxAge      = time.Hour
)

// Limits on what an issuer or a client sends.
const (
	maxTokenSize    = 16 << 10
	maxDocumentSize = 1 << 20
	tokenCacheLimit = 10000
	minRSAKeyBits   = 2048
	fetchTimeout    = 10 * time.Second
	discoveryPath   = "/.well-known/openid-configuration"
)

// allowedAlgorithms are the asymmetric JWS algorithms accepted: "none" and the HMAC
// algorithms are refused before any key is looked at, so a token "signed" with an
// issuer's public key as an HMAC secret never verifies.
var allowedAlgorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512,
	jose.ES256, jose.ES384, jose.ES512, jose.EdDSA,
}

// Verifier verifies OIDC bearer tokens of several issuers against their published keys
// (discovery document, then JWKS), fetched on first use, cached, and fetched again when
// a token names an unknown key id (at most once per RefreshInterval) or when they are
// older than KeysMaxAge. Verified tokens are remembered until they expire, so a client
// that sends the same token on every call pays for its signature once.
type Verifier struct {
	cfg     VerifierConfig
	issuers map[string]*issuerKeys

	mu     sync.Mutex
	tokens map[[32]byte]cachedToken
}

type cachedToken struct {
	id  Identity
	nbf time.Time
}

// issuerKeys is the key cache of one issuer.
type issuerKeys struct {
	Issuer
	mu      sync.Mutex // held while fetching, so one fetch serves every waiting caller
	keys    []jose.JSONWebKey
	fetched time.Time // of the last fetch that succeeded
	tried   time.Time // of the last fetch attempt
	lastErr error     // of the last fetch attempt
}

// NewVerifier checks the configuration: issuers are https URLs (http only on a
// loopback host, for tests and local issuers), each named once, each with an audience.
func NewVerifier(cfg VerifierConfig) (*Verifier, error) {
	if len(cfg.Issuers) == 0 {
		return nil, status.Error(codes.InvalidArgument, "oidc: no issuer")
	}
	if cfg.Skew == 0 {
		cfg.Skew = DefaultSkew
	}
	if cfg.RefreshInterval == 0 {
		cfg.RefreshInterval = DefaultRefreshInterval
	}
	if cfg.KeysMaxAge == 0 {
		cfg.KeysMaxAge = DefaultKeysMaxAge
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: fetchTimeout, CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 5 {
				return errors.New("too many redirects")
			}
			return checkFetchURL(req.URL.String()) // no redirect down to plain http
		}}
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.System()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxTTL < 0 || cfg.Skew < 0 {
		return nil, status.Error(codes.InvalidArgument, "oidc: negative --oidc-max-ttl or skew")
	}
	v := &Verifier{cfg: cfg, issuers: map[string]*issuerKeys{}, tokens: map[[32]byte]cachedToken{}}
	for _, is := range cfg.Issuers {
		if err := checkFetchURL(is.URL); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "oidc issuer %q: %v", is.URL, err)
		}
		if is.Audience == "" {
			return nil, status.Errorf(codes.InvalidArgument, "oidc issuer %q: no audience (--oidc-audience): tokens minted for other services would be accepted", is.URL)
		}
		if _, dup := v.issuers[is.URL]; dup {
			return nil, status.Errorf(codes.InvalidArgument, "oidc issuer %q named twice (one audience per issuer)", is.URL)
		}
		v.issuers[is.URL] = &issuerKeys{Issuer: is}
	}
	return v, nil
}

// checkFetchURL accepts https URLs, and http URLs of a loopback host.
func checkFetchURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	if u.Host == "" || u.Fragment != "" || u.RawQuery != "" || u.User != nil {
		return errors.New("want https://host[/path], without query, fragment or user")
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopbackHost(u.Hostname()) {
			return nil
		}
	}
	return errors.New("not https (plain http is accepted only on a loopback host)")
}

// IsLoopback reports whether host (or host:port) names a loopback address.
func IsLoopback(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	return isLoopbackHost(host)
}

func isLoopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// Issuers returns the configured issuers.
func (v *Verifier) Issuers() []Issuer { return v.cfg.Issuers }

// Trusts reports whether url is a configured issuer.
func (v *Verifier) Trusts(url string) bool { _, ok := v.issuers[url]; return ok }

// Warm fetches every issuer's keys, so the first call does not wait for them; an
// issuer that cannot be reached is an error (its tokens are refused until it can).
func (v *Verifier) Warm(ctx context.Context) error {
	var errs []error
	for _, ik := range v.issuers {
		ik.mu.Lock()
		err := v.fetch(ctx, ik)
		ik.mu.Unlock()
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// unauthenticated is the error of a token that does not verify.
func unauthenticated(format string, args ...any) error {
	return status.Errorf(codes.Unauthenticated, "bearer token: "+format, args...)
}

// Verify checks a raw token (a JWS in compact form) and returns the identity it proves.
// Every refusal is UNAUTHENTICATED with the reason.
func (v *Verifier) Verify(ctx context.Context, raw string) (Identity, error) {
	if len(raw) > maxTokenSize {
		return Identity{}, unauthenticated("%d bytes, over the %d-byte limit", len(raw), maxTokenSize)
	}
	now := v.cfg.Clock.Now()
	sum := sha256.Sum256([]byte(raw))
	if id, ok := v.cached(sum, now); ok {
		return id, nil
	}
	tok, err := jwt.ParseSigned(raw, allowedAlgorithms)
	if err != nil {
		return Identity{}, unauthenticated("not a JWT signed with an asymmetric algorithm: %v", err)
	}
	if len(tok.Headers) != 1 {
		return Identity{}, unauthenticated("want exactly one signature, found %d", len(tok.Headers))
	}
	hdr := tok.Headers[0]
	var unverified jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return Identity{}, unauthenticated("claims: %v", err)
	}
	ik, ok := v.issuers[unverified.Issuer]
	if !ok {
		return Identity{}, unauthenticated("issuer %q is not trusted by this server", unverified.Issuer)
	}
	var std jwt.Claims
	all := map[string]any{}
	if err := v.verifySignature(ctx, ik, tok, hdr, now, &std, &all); err != nil {
		return Identity{}, err
	}
	if err := std.ValidateWithLeeway(jwt.Expected{Issuer: ik.URL, AnyAudience: jwt.Audience{ik.Audience}, Time: now}, v.cfg.Skew); err != nil {
		switch {
		case errors.Is(err, jwt.ErrInvalidAudience):
			return Identity{}, unauthenticated("audience %v does not include %q", []string(std.Audience), ik.Audience)
		case errors.Is(err, jwt.ErrExpired):
			return Identity{}, unauthenticated("expired at %s", std.Expiry.Time().UTC().Format(time.RFC3339))
		case errors.Is(err, jwt.ErrNotValidYet):
			return Identity{}, unauthenticated("not valid before %s", std.NotBefore.Time().UTC().Format(time.RFC3339))
		case errors.Is(err, jwt.ErrIssuedInTheFuture):
			return Identity{}, unauthenticated("issued in the future (%s)", std.IssuedAt.Time().UTC().Format(time.RFC3339))
		}
		return Identity{}, unauthenticated("%v", err)
	}
	if std.Expiry == nil {
		return Identity{}, unauthenticated("no exp claim: kiln accepts only tokens that expire")
	}
	if std.Subject == "" {
		return Identity{}, unauthenticated("no sub claim")
	}
	if max := v.cfg.MaxTTL; max > 0 {
		start := std.IssuedAt
		if start == nil {
			start = std.NotBefore
		}
		if start == nil {
			return Identity{}, unauthenticated("neither iat nor nbf: its lifetime is unknown and --oidc-max-ttl %v is set", max)
		}
		if ttl := std.Expiry.Time().Sub(start.Time()); ttl > max {
			return Identity{}, unauthenticated("lives %v, longer than --oidc-max-ttl %v", ttl, max)
		}
		if left := std.Expiry.Time().Sub(now); left > max+v.cfg.Skew {
			return Identity{}, unauthenticated("valid for %v more, longer than --oidc-max-ttl %v", left.Round(time.Second), max)
		}
	}
	id := Identity{Kind: OIDC, Issuer: ik.URL, Name: std.Subject, Claims: all, Expiry: std.Expiry.Time()}
	var nbf time.Time
	if std.NotBefore != nil {
		nbf = std.NotBefore.Time()
	}
	v.remember(sum, cachedToken{id: id, nbf: nbf}, now)
	return id, nil
}

// verifySignature finds the issuer's keys for hdr and decodes the claims with the
// first that verifies the signature.
func (v *Verifier) verifySignature(ctx context.Context, ik *issuerKeys, tok *jwt.JSONWebToken, hdr jose.Header, now time.Time, dst ...any) error {
	cands, err := v.keysFor(ctx, ik, hdr, now)
	if err != nil {
		return err
	}
	var last error
	for _, k := range cands {
		if last = tok.Claims(k.Key, dst...); last == nil {
			return nil
		}
	}
	return unauthenticated("signature does not verify with the keys of issuer %q: %v", ik.URL, last)
}

// keysFor returns the issuer's keys usable for hdr, fetching them when they are
// missing or stale, or again for an unknown key id (the issuer may have rotated its
// keys); fetches are at most one per RefreshInterval, so neither a down issuer nor a
// client sending made-up key ids makes every call wait for one.
func (v *Verifier) keysFor(ctx context.Context, ik *issuerKeys, hdr jose.Header, now time.Time) ([]jose.JSONWebKey, error) {
	ik.mu.Lock()
	defer ik.mu.Unlock()
	mayFetch := now.Sub(ik.tried) >= v.cfg.RefreshInterval
	if (ik.fetched.IsZero() || now.Sub(ik.fetched) > v.cfg.KeysMaxAge) && mayFetch {
		if err := v.fetch(ctx, ik); err != nil && len(ik.keys) > 0 {
			v.cfg.Logger.Warn("oidc: keeping the keys already fetched", "issuer", ik.URL, "err", err)
		}
		mayFetch = false
	}
	if len(ik.keys) == 0 {
		return nil, unauthenticated("the keys of issuer %q are unavailable (last attempt %v ago: %v)", ik.URL, now.Sub(ik.tried).Round(time.Second), ik.lastErr)
	}
	cands := candidates(ik.keys, hdr)
	if len(cands) == 0 && hdr.KeyID != "" {
		if !mayFetch {
			return nil, unauthenticated("unknown key id %q of issuer %q (keys fetched %v ago; the next fetch is allowed in %v)",
				hdr.KeyID, ik.URL, now.Sub(ik.tried).Round(time.Second), (v.cfg.RefreshInterval - now.Sub(ik.tried)).Round(time.Second))
		}
		if err := v.fetch(ctx, ik); err != nil {
			return nil, unauthenticated("unknown key id %q, and the keys of issuer %q could not be fetched again: %v", hdr.KeyID, ik.URL, err)
		}
		cands = candidates(ik.keys, hdr)
	}
	if len(cands) == 0 {
		return nil, unauthenticated("no key of issuer %q matches key id %q and algorithm %s", ik.URL, hdr.KeyID, hdr.Algorithm)
	}
	return cands, nil
}

// candidates are the issuer's signing keys usable for hdr: of an asymmetric type that
// fits the algorithm, with the key id (any key when the token names none), and with a
// matching "alg" when the key declares one.
func candidates(keys []jose.JSONWebKey, hdr jose.Header) []jose.JSONWebKey {
	var out []jose.JSONWebKey
	for _, k := range keys {
		if hdr.KeyID != "" && k.KeyID != hdr.KeyID {
			continue
		}
		if k.Use != "" && k.Use != "sig" || k.Algorithm != "" && k.Algorithm != hdr.Algorithm {
			continue
		}
		if keyFits(k.Key, jose.SignatureAlgorithm(hdr.Algorithm)) {
			out = append(out, k)
		}
	}
	return out
}

// keyFits reports whether key is a public key of the algorithm's family.
func keyFits(key any, alg jose.SignatureAlgorithm) bool {
	switch k := key.(type) {
	case *rsa.PublicKey:
		return strings.HasPrefix(string(alg), "RS") || strings.HasPrefix(string(alg), "PS")
	case *ecdsa.PublicKey:
		return strings.HasPrefix(string(alg), "ES")
	case ed25519.PublicKey:
		return alg == jose.EdDSA && len(k) == ed25519.PublicKeySize
	}
	return false // symmetric ("oct") and private keys are never used to verify
}

// fetch fetches the issuer's keys and records the attempt. Caller holds ik.mu.
func (v *Verifier) fetch(ctx context.Context, ik *issuerKeys) error {
	ik.tried = v.cfg.Clock.Now()
	ik.lastErr = v.fetchKeys(ctx, ik)
	return ik.lastErr
}

// fetchKeys reads the discovery document and the key set. Caller holds ik.mu.
func (v *Verifier) fetchKeys(ctx context.Context, ik *issuerKeys) error {
	// Not the caller's cancellation: the fetch serves every caller, and one that
	// hangs up must not leave the issuer without keys until the next allowed fetch.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
	defer cancel()
	var disc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := v.getJSON(ctx, strings.TrimSuffix(ik.URL, "/")+discoveryPath, &disc); err != nil {
		return fmt.Errorf("discovery: %w", err)
	}
	if disc.Issuer != ik.URL {
		return fmt.Errorf("discovery document names issuer %q, not %q", disc.Issuer, ik.URL)
	}
	if err := checkFetchURL(disc.JWKSURI); err != nil {
		return fmt.Errorf("jwks_uri %q: %v", disc.JWKSURI, err)
	}
	var set jose.JSONWebKeySet
	if err := v.getJSON(ctx, disc.JWKSURI, &set); err != nil {
		return fmt.Errorf("jwks: %w", err)
	}
	var keys []jose.JSONWebKey
	for _, k := range set.Keys {
		if !k.IsPublic() || !k.Valid() {
			continue
		}
		if rk, ok := k.Key.(*rsa.PublicKey); ok && rk.N.BitLen() < minRSAKeyBits {
			continue
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return fmt.Errorf("jwks %s holds no usable public signing key", disc.JWKSURI)
	}
	ik.keys, ik.fetched = keys, v.cfg.Clock.Now()
	v.cfg.Logger.Info("oidc: issuer keys fetched", "issuer", ik.URL, "keys", len(keys))
	v.forget(ik.URL)
	return nil
}

// getJSON fetches url and decodes its JSON body into dst.
func (v *Verifier) getJSON(ctx context.Context, url string, dst any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := v.cfg.HTTPClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxDocumentSize+1))
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	if len(b) > maxDocumentSize {
		return fmt.Errorf("GET %s: over %d bytes", url, maxDocumentSize)
	}
	if err := json.Unmarshal(b, dst); err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	return nil
}

// cached returns a token verified before if it is still within its validity.
func (v *Verifier) cached(sum [32]byte, now time.Time) (Identity, bool) {
	v.mu.Lock()
	c, ok := v.tokens[sum]
	v.mu.Unlock()
	if !ok || now.After(c.id.Expiry.Add(v.cfg.Skew)) || !c.nbf.IsZero() && now.Add(v.cfg.Skew).Before(c.nbf) {
		return Identity{}, false // expired or not yet valid: verify again, for the error
	}
	return c.id, true
}

// remember caches a verified token; a full cache drops its expired entries first,
// then everything.
func (v *Verifier) remember(sum [32]byte, c cachedToken, now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.tokens) >= tokenCacheLimit {
		for k, t := range v.tokens {
			if now.After(t.id.Expiry.Add(v.cfg.Skew)) {
				delete(v.tokens, k)
			}
		}
		if len(v.tokens) >= tokenCacheLimit {
			clear(v.tokens)
		}
	}
	v.tokens[sum] = c
}

// forget drops the cached tokens of an issuer whose keys changed: a key the issuer
// withdrew no longer vouches for anything.
func (v *Verifier) forget(issuer string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for k, t := range v.tokens {
		if t.id.Issuer == issuer {
			delete(v.tokens, k)
		}
	}
}
